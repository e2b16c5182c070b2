"""Distributed behaviour on CPU with gloo: DDP equals one big batch, exact sharded eval, and the
launchers (torchrun, elastic restart, accelerate; slurm/*.sh on a real Slurm: tests/test_slurm.py).

Runs that are about what the ranks compute start through tests/launch.py (the same environment
torchrun exports, without its start-up cost); runs that are about a launcher use that launcher."""
from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from dist_resnet.checkpoint import load
from tests.conftest import ROOT, resume_argv, run
from tests.launch import free_port, launch
from tests.runs import assert_same_run, children, finish, metrics, read_until, relative_distance, start

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# the cpu preset at half its width: these tests are about what the ranks do, not the accuracy
COMMON = ["--config", str(ROOT / "configs" / "cpu.yaml"), "run.progress=false", "train.stop_check_every=2",
          "model.width=8", "train.precision=fp32"]
def train_argv(betons, run_dir, *overrides) -> list[str]:
    return [*COMMON, f"data.dir={betons}", f"run.dir={run_dir}", *overrides]


# ---------------------------------------------------------------- DDP equivalence
@pytest.fixture(scope="module")
def equivalence_runs(betons, tmp_path_factory):
    """4 steps of a global batch of 1024 with GroupNorm (CPU has no SyncBatchNorm):
    1 rank x 1024, 2 ranks x 512, and 1 rank x 2 micro-batches of 512. A small learning rate
    keeps training out of its chaotic phase: at lr 0.4 even a 1e-7 weight perturbation grows
    to a 1e-3 relative difference in 4 steps, which would hide any real discrepancy."""
    d = tmp_path_factory.mktemp("equiv")
    opts = ["train.epochs=1", "model.norm=group", "train.batch_size=1024", "optim.lr=0.02"]
    for name, nproc, extra in (("w1", 1, []), ("w2", 2, []), ("accum", 1, ["train.accum_steps=2"])):
        codes = launch("dist_resnet.train", train_argv(betons, d / name, *opts, *extra), d / f"{name}.log", nproc)
        assert codes == [0] * nproc, (d / f"{name}.log").read_text()
    return d


@pytest.mark.parametrize("other", ["w2", "accum"])
def test_two_ranks_and_accumulation_equal_one_big_batch(equivalence_runs, other):
    rel = relative_distance(equivalence_runs / "w1", equivalence_runs / other)
    print(f"{other} vs 1 rank: relative L2 {rel:.1e}")
    assert rel < 5e-5, rel  # measured: ~6e-6 for both; fp32 reduction order over different batch splits
    ma, mb = metrics(equivalence_runs / "w1")["history"][0], metrics(equivalence_runs / other)["history"][0]
    assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-5)
    assert ma["test_count"] == mb["test_count"] == 1000
    assert metrics(equivalence_runs / other)["world_size"] == (2 if other == "w2" else 1)


# ---------------------------------------------------------------- exact eval
@pytest.fixture(scope="module")
def single_process_eval(equivalence_runs, betons) -> dict:
    from dist_resnet import evaluate

    return evaluate.main([str(equivalence_runs / "w1" / "last.pt"), f"data.dir={betons}"])  # the CLI, in-process


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_eval_counts_each_image_once_and_matches_one_process(equivalence_runs, single_process_eval, betons,
                                                                       tmp_path, world):
    import json

    ckpt, one = str(equivalence_runs / "w1" / "last.pt"), single_process_eval
    codes = launch("dist_resnet.evaluate", [ckpt, f"data.dir={betons}", "--out", str(tmp_path / "r.json")],
                   tmp_path / "log", world)
    assert codes == [0] * world, (tmp_path / "log").read_text()
    many = json.loads((tmp_path / "r.json").read_text())
    assert one["test_count"] == many["test_count"] == 1000 and many["world_size"] == world
    assert many["test_acc"] == one["test_acc"]
    assert many["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert (tmp_path / "log").read_text().count('"test_acc"') == 1  # only rank 0 prints


def test_evaluating_ema_weights_of_a_run_without_ema_is_a_clear_error(equivalence_runs, betons, capsys):
    from dist_resnet import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main([str(equivalence_runs / "w1" / "last.pt"), f"data.dir={betons}", "--ema"])
    assert e.value.code == 2 and "holds no EMA weights" in capsys.readouterr().err


# ---------------------------------------------------------------- launchers: torchrun, Slurm, accelerate
def test_two_gloo_ranks_train_and_count_every_test_image_once(reference_2rank):
    m = metrics(reference_2rank)
    assert m["world_size"] == 2 and m["completed"] and m["test_count"] == 200
    assert all(r["test_count"] == 200 for r in m["history"])


def test_signal_mid_epoch_then_resume_is_bit_exact(tiny_betons, reference_2rank, tmp_path):
    """torchrun's workers get SIGUSR1 during epoch 2 or at the end of epoch 1 (then the epoch-end
    check takes it): the run stops with a checkpoint, exits 75, and resumes (here without torchrun,
    whose restart is the next tests' subject) to the same bits."""
    cmd = [*TORCHRUN, "--nproc_per_node=2", "-m", "dist_resnet.train",
           *resume_argv(tiny_betons, tmp_path, "train.resume=true")]
    p = start(cmd)
    read_until(p, "epoch   1 train loss")
    for pid in children(p.pid):  # the workers; torchrun itself must not get USR1
        os.kill(pid, signal.SIGUSR1)
    out = finish(p)
    assert p.returncode != 0 and "exitcode  : 75" in out, out  # "stopped with a checkpoint", not "finished"
    assert "stopped (SIGUSR1) at epoch" in out or "stopped (SIGUSR1) after epoch" in out, out
    position = load(tmp_path / "last.pt")["position"]
    codes = launch("dist_resnet.train", cmd[cmd.index("dist_resnet.train") + 1:], tmp_path.with_name("log"), 2)
    out = tmp_path.with_name("log").read_text()
    assert codes == [0, 0] and "resumed from" in out and (position is None or f"after its step {position['step']} " in out)
    assert_same_run(reference_2rank, tmp_path)


def test_shellcheck_is_clean_on_every_launch_script():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p) for p in [*ROOT.glob("launch/*.sh"), *ROOT.glob("slurm/*.sh")])
    assert scripts
    run(["shellcheck", *scripts])


def test_torchrun_restarts_a_killed_worker_group_from_the_last_checkpoint(tiny_betons, reference_2rank, tmp_path):
    cmd = [*TORCHRUN, "--nproc_per_node=2", "--max-restarts=1", "-m", "dist_resnet.train",
           *resume_argv(tiny_betons, tmp_path, "train.resume=true")]
    p = start(cmd)
    read_until(p, "epoch   1 train loss")
    os.kill(children(p.pid)[-1], signal.SIGKILL)
    out = finish(p)
    assert p.returncode == 0, out
    assert "resumed from" in out
    assert_same_run(reference_2rank, tmp_path)


def test_accelerate_launch_runs_the_trainer(tiny_betons, tmp_path):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate is not installed (pip install accelerate)")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # --multi_gpu launches through torchrun; with no GPU the trainer picks gloo on CPU
    run([accelerate, "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
         "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port", str(free_port()),
         "-m", "dist_resnet.train", *resume_argv(tiny_betons, tmp_path, "train.epochs=1")], timeout=300)
    m = metrics(tmp_path)
    assert m["world_size"] == 2 and m["test_count"] == 200
