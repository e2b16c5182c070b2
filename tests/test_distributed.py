"""Distributed behaviour on CPU with gloo: DDP equals one big batch, exact sharded eval,
exact resume after a stop signal, the Slurm script (fake srun/scontrol), elastic restart."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# the cpu preset at half its width: these tests are about what the ranks do, not the accuracy
COMMON = ["--config", str(ROOT / "configs" / "cpu.yaml"), "run.progress=false", "train.stop_check_every=2",
          "model.width=8"]
# the resume tests also carry the state that is easiest to lose: lookahead's slow weights (every 3 steps,
# so a stop falls between two syncs) and the derandomised flip
RESUME = ["train.epochs=2", "optim.lookahead_every=3", "data.flip_alternate=true", "data.translate_pad=reflect"]


def train_args(betons, run_dir, *overrides) -> list[str]:
    return ["-m", "dist_resnet.train", *COMMON, f"data.dir={betons}", f"run.dir={run_dir}", *overrides]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", weights_only=False)["model"]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "img_per_s", "eval_time_s")} for r in history]


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def start(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def read_until(p: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    out, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        out.append(line)
        if marker in line:
            return "".join(out)
    p.kill()
    raise AssertionError(f"'{marker}' never appeared:\n{''.join(out)[-4000:]}")


def finish(p: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = p.communicate(timeout=timeout)
    return out


# ---------------------------------------------------------------- DDP equivalence
@pytest.fixture(scope="module")
def equivalence_runs(betons, tmp_path_factory):
    """4 steps of a global batch of 1024 with GroupNorm (CPU has no SyncBatchNorm):
    1 rank x 1024, 2 ranks x 512, and 1 rank x 2 micro-batches of 512. A small learning rate
    keeps training out of its chaotic phase: at lr 0.4 even a 1e-7 weight perturbation grows
    to a 1e-3 relative difference in 4 steps, which would hide any real discrepancy."""
    d = tmp_path_factory.mktemp("equiv")
    opts = ["train.epochs=1", "model.norm=group", "train.batch_size=1024", "optim.lr=0.02"]
    run([sys.executable, *train_args(betons, d / "w1", *opts)])
    run([*TORCHRUN, "--nproc_per_node=2", *train_args(betons, d / "w2", *opts)])
    run([sys.executable, *train_args(betons, d / "accum", *opts, "train.accum_steps=2")])
    return d


@pytest.mark.parametrize("other", ["w2", "accum"])
def test_two_ranks_and_accumulation_equal_one_big_batch(equivalence_runs, other):
    ref, got = weights(equivalence_runs / "w1"), weights(equivalence_runs / other)
    keys = [k for k in ref if ref[k].is_floating_point()]
    a = torch.cat([ref[k].flatten() for k in keys])
    b = torch.cat([got[k].flatten() for k in keys])
    rel, worst = ((a - b).norm() / a.norm()).item(), (a - b).abs().max().item()
    print(f"{other} vs 1 rank: relative L2 {rel:.1e}, max abs {worst:.1e}")
    # measured: ~6e-6 for both; fp32 reduction order over different batch splits explains it
    assert rel < 5e-5 and worst < 5e-5, (rel, worst)
    ma, mb = metrics(equivalence_runs / "w1")["history"][0], metrics(equivalence_runs / other)["history"][0]
    assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-5)
    assert ma["test_count"] == mb["test_count"] == 1000


# ---------------------------------------------------------------- exact eval
@pytest.fixture(scope="module")
def single_process_eval(equivalence_runs, betons) -> dict:
    from dist_resnet import evaluate

    return evaluate.main([str(equivalence_runs / "w1" / "last.pt"), f"data.dir={betons}"])  # the CLI, in-process


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_eval_counts_each_image_once_and_matches_one_process(equivalence_runs, single_process_eval, betons,
                                                                       tmp_path, world):
    ckpt, one = str(equivalence_runs / "w1" / "last.pt"), single_process_eval
    p = run([*TORCHRUN, f"--nproc_per_node={world}", "-m", "dist_resnet.evaluate", ckpt, f"data.dir={betons}",
             "--out", str(tmp_path / "r.json")])
    many = json.loads((tmp_path / "r.json").read_text())
    assert one["test_count"] == many["test_count"] == 1000 and many["world_size"] == world
    assert many["test_acc"] == one["test_acc"]
    assert many["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert p.stdout.count('"test_acc"') == 1  # only rank 0 prints


def test_evaluating_ema_weights_of_a_run_without_ema_is_a_clear_error(equivalence_runs, betons, capsys):
    from dist_resnet import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main([str(equivalence_runs / "w1" / "last.pt"), f"data.dir={betons}", "--ema"])
    assert e.value.code == 2 and "holds no EMA weights" in capsys.readouterr().err


# ---------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def reference_2rank(betons, tmp_path_factory):
    """An uninterrupted 2-rank, 2-epoch run: what every interrupted run must reproduce."""
    d = tmp_path_factory.mktemp("ref2")
    run([*TORCHRUN, "--nproc_per_node=2", *train_args(betons, d, *RESUME)])
    return d


def test_two_gloo_ranks_train_and_count_every_test_image_once(reference_2rank):
    m = metrics(reference_2rank)
    assert m["world_size"] == 2 and m["completed"] and m["test_count"] == 1000
    assert all(r["test_count"] == 1000 for r in m["history"])
    assert m["test_acc"] > 0.18  # measured 0.25: 2 epochs of a width-8 net on 5,000 images; chance is 0.1


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"
    ma, mb = metrics(a), metrics(b)
    assert mb["completed"] and without_times(ma["history"]) == without_times(mb["history"])


def test_signal_mid_epoch_then_resume_is_bit_exact(betons, reference_2rank, tmp_path):
    cmd = [*TORCHRUN, "--nproc_per_node=2", *train_args(betons, tmp_path, *RESUME, "train.resume=true")]
    p = start(cmd)
    read_until(p, "epoch   1 train loss")
    for pid in children(p.pid):  # the workers; torchrun itself must not get USR1
        os.kill(pid, signal.SIGUSR1)
    out = finish(p)
    assert p.returncode == 0, out
    assert "stopped (SIGUSR1) at epoch 2 step" in out
    position = torch.load(tmp_path / "last.pt", weights_only=False)["position"]
    assert 0 < position["step"] < 19
    out = run(cmd).stdout
    assert f"step {position['step']} of epoch 2" in out
    assert_same_run(reference_2rank, tmp_path)


# ---------------------------------------------------------------- Slurm
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_slurm(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\n# fake srun: drop options, run the command\n'
                                  'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n'
                                      'if [ "$1 $2" = "show hostnames" ]; then echo localhost; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def test_slurm_script_checkpoints_requeues_and_resumes(betons, reference_2rank, tmp_path):
    log = tmp_path / "scontrol.log"
    fake_slurm(tmp_path / "bin", log)
    env = {"PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "cifar", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NNODES": "1", "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "CONFIG": str(ROOT / "configs" / "cpu.yaml"), "DATA_DIR": str(betons)}
    job = ["bash", str(ROOT / "slurm" / "train.sh"), *COMMON[2:], *RESUME]
    t0 = time.time()
    p = start(job, env, cwd=tmp_path)
    read_until(p, "epoch   1 train loss")
    p.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does: only the batch shell gets it
    out = finish(p)
    assert p.returncode == 0, out
    assert "requeueing job 4242" in out and "scontrol requeue 4242" in log.read_text()
    run_dir = tmp_path / "runs" / "cifar-4242"  # derived from the job id: stable across requeues
    assert torch.load(run_dir / "last.pt", weights_only=False)["position"] is not None
    out = run(job, env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path).stdout  # the requeued job
    assert "restart 1" in out and "step" in out and "resumed from" in out
    assert log.read_text().count("requeue") == 1
    assert_same_run(reference_2rank, run_dir)
    print(f"slurm simulation: {time.time() - t0:.1f} s")


def test_shellcheck_is_clean_on_every_launch_script():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p) for p in [*ROOT.glob("launch/*.sh"), *ROOT.glob("slurm/*.sh")])
    assert scripts
    run(["shellcheck", *scripts])


# ---------------------------------------------------------------- elastic restart
def test_torchrun_restarts_a_killed_worker_group_from_the_last_checkpoint(betons, reference_2rank, tmp_path):
    cmd = [*TORCHRUN, "--nproc_per_node=2", "--max-restarts=1",
           *train_args(betons, tmp_path, *RESUME, "train.resume=true")]
    p = start(cmd)
    read_until(p, "epoch   1 train loss")
    os.kill(children(p.pid)[-1], signal.SIGKILL)
    out = finish(p)
    assert p.returncode == 0, out
    assert "resumed from" in out and "at epoch 1" in out
    assert_same_run(reference_2rank, tmp_path)


# ---------------------------------------------------------------- accelerate
def test_accelerate_launch_runs_the_trainer(betons, tmp_path):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate is not installed (pip install accelerate)")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # --multi_gpu launches through torchrun; with no GPU the trainer picks gloo on CPU
    run([accelerate, "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
         "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port", str(free_port()),
         *train_args(betons, tmp_path, "train.epochs=1")], timeout=300)
    m = metrics(tmp_path)
    assert m["world_size"] == 2 and m["test_count"] == 1000
