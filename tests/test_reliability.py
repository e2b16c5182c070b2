"""Faults, injected for real: SIGKILL at random points, NaN losses, stop requests at awkward moments,
ranks that disagree or hang, damaged data and checkpoints, and bad settings. Every test here is a row
of docs/RELIABILITY.md.

Runs are tiny (1,000 images, resnet9 at width 8, 10 steps per epoch) and started by tests/launch.py's
forkserver, so that the suite can afford the dozens of real trainer processes these tests need."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_resnet.checkpoint import load
from tests.conftest import TINY
from tests.launch import Ranks, launch
from tests.runs import assert_same_run, metrics, relative_distance

STEPS_PER_EPOCH = 10  # 1,000 tiny train images / batch 100


def argv(betons: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [*TINY, f"data.dir={betons}", f"run.dir={run_dir}", "train.timeout_s=60", *overrides]


def train(betons, run_dir, *overrides, nproc=1, env=None, probe=None, log=None) -> tuple[list[int], str]:
    """Exit codes and the combined log of one launch of `nproc` ranks."""
    log = log or run_dir.with_name(run_dir.name + ".log")
    log.unlink(missing_ok=True)
    module, args = ("tests.probes", [probe, *argv(betons, run_dir, *overrides)]) if probe else \
        ("dist_resnet.train", argv(betons, run_dir, *overrides))
    codes = launch(module, args, log, nproc, env)
    return codes, log.read_text()










# ---------------------------------------------------------------- kill -9 anywhere
KILL_EPOCHS = 3
# lookahead (every 3 steps, so kills fall between syncs) and the derandomised flip: the state easiest to lose;
# Muon with its Newton-Schulz work split between the 2 ranks (SGD resumes in tests/test_distributed.py)
KILL_OPTS = [f"train.epochs={KILL_EPOCHS}", "train.resume=true", "optim.lookahead_every=3",
             "data.flip_alternate=true", "train.stop_check_every=3", "optim.name=muon"]


@pytest.fixture(scope="module")
def kill_reference(tiny_betons, tmp_path_factory):
    d = tmp_path_factory.mktemp("kill_ref") / "run"
    codes, out = train(tiny_betons, d, *KILL_OPTS, nproc=2)
    assert codes == [0, 0], out
    return d


def kill_plan(seed: int, kills: int) -> list[tuple[str, int, int]]:
    """`kills` (point, n, rank) drawn from the seed: always one inside a step, one in an evaluation and
    one during a checkpoint save, then any. n counts from the start of each launch: a step within the first
    epoch of a launch, which every launch but the last reaches (a kill can leave one epoch to go)."""
    rng = random.Random(seed)
    draws = {"step": lambda: (rng.randint(1, STEPS_PER_EPOCH), rng.randrange(2)),
             "eval": lambda: (rng.randint(1, 2), rng.randrange(2)),  # 2 test batches per rank and evaluation
             "write": lambda: (rng.randint(2, 6), 0),  # rank 0 writes config.yaml, then metrics and checkpoints
             "link": lambda: (rng.randint(1, 2), 0)}   # a checkpoint is written, last.pt not yet pointed at it
    points = ["step", "eval", rng.choice(["write", "link"])]
    points += [rng.choice(list(draws)) for _ in range(kills - len(points))]
    rng.shuffle(points)
    return [(p, *draws[p]()) for p in points]


def kill_and_resume(betons, run_dir, plan) -> int:
    """Launch with each planned fault in turn, then once more without; the number of kills that hit."""
    hits = 0
    for point, n, rank in plan:
        codes, out = train(betons, run_dir, *KILL_OPTS, nproc=2, env={"DIST_RESNET_FAULT": f"{point}:{n}@{rank}"})
        if codes[rank] == -signal.SIGKILL:
            hits += 1
            other = codes[1 - rank]
            assert other in (1, -signal.SIGKILL) or other == 0 and point in ("write", "link"), (point, codes, out)
        else:
            assert codes == [0, 0], out  # the run ended before the point came
    codes, out = train(betons, run_dir, *KILL_OPTS, nproc=2)
    assert codes == [0, 0], out
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]  # what the kills left was cleaned
    return hits


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_at_random_points_then_resume_is_bit_identical(tiny_betons, kill_reference, tmp_path, seed):
    plan = kill_plan(seed, 3)
    hits = kill_and_resume(tiny_betons, tmp_path / "run", plan)
    print(f"seed {seed}: {hits} of {len(plan)} kills hit ({plan}); final weights bit-identical")
    assert hits >= 2
    assert_same_run(kill_reference, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 9))
def test_sigkill_at_random_points_long(tiny_betons, kill_reference, tmp_path, seed):
    plan = kill_plan(seed, 6)
    hits = kill_and_resume(tiny_betons, tmp_path / "run", plan)
    print(f"seed {seed}: {hits} of {len(plan)} kills hit; final weights bit-identical")
    assert_same_run(kill_reference, tmp_path / "run")


# ---------------------------------------------------------------- stop requests
@pytest.fixture(scope="module")
def tiny_reference(tiny_betons, tmp_path_factory):
    """An uninterrupted 1-rank run of 2 epochs."""
    d = tmp_path_factory.mktemp("tiny_ref") / "run"
    codes, out = train(tiny_betons, d, "train.epochs=2")
    assert codes == [0], out
    return d


def test_a_stop_in_an_epoch_shorter_than_the_check_interval_is_honoured(tiny_betons, tiny_reference, tmp_path):
    """10 steps per epoch, a check every 50 steps: the stop comes at the epoch's end, exits 75, removes the
    STOP file, and the resumed run equals the uninterrupted one, history included."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    codes, out = train(tiny_betons, run_dir, "train.epochs=2", "train.stop_check_every=50")
    assert codes == [75], out
    assert "stopped (stop file" in out and "after epoch 1" in out and not (run_dir / "STOP").exists()
    assert metrics(run_dir)["stopped"] and load(run_dir / "last.pt")["epoch"] == 1
    codes, out = train(tiny_betons, run_dir, "train.epochs=2", "train.stop_check_every=50", "train.resume=true")
    assert codes == [0], out
    assert_same_run(tiny_reference, run_dir)


def test_checkpoint_every_saves_inside_epochs_and_a_kill_resumes_from_the_last_one(tiny_betons, tiny_reference,
                                                                                     tmp_path):
    """train.checkpoint_every=4 on 2 epochs of 10 steps: checkpoints after steps 4 and 8 of each epoch, beside
    the epoch ends. A SIGKILL after step 17 loses only steps 17 back to 16: the resume starts at step 16 (epoch
    2, after its step 6) and ends bit-identical to an uninterrupted run without checkpoint_every (a
    checkpoint reads the sums, it changes nothing)."""
    run_dir = tmp_path / "run"
    codes, out = train(tiny_betons, run_dir, "train.epochs=2", "train.checkpoint_every=4",
                       env={"DIST_RESNET_FAULT": "step:17"})
    assert codes == [-9], out
    assert load(run_dir / "last.pt")["step"] == 16 and load(run_dir / "last.pt")["position"]["step"] == 6
    codes, out = train(tiny_betons, run_dir, "train.epochs=2", "train.checkpoint_every=4", "train.resume=true")
    assert codes == [0] and "inside epoch 2, after its step 6 " in out, out
    assert_same_run(tiny_reference, run_dir)
    steps = sorted(load(p)["step"] for p in run_dir.glob("ckpt-*.pt"))
    assert steps == [16, 20], steps  # train.keep_last=2 counts the checkpoints inside epochs too


@pytest.mark.parametrize("hook", ["powersgd", pytest.param("bf16", marks=pytest.mark.slow)])
def test_a_compressing_comm_hook_resumes_bit_exactly(tiny_betons, tmp_path, hook):
    """train.comm_hook on 2 ranks, killed after step 13 (checkpoint at step 12, inside epoch 2): the resumed
    run equals the uninterrupted one. PowerSGD's per-rank state (error feedback, warm-start factors, step,
    RNG) is gathered into the checkpoint and each rank takes its own back. DDP re-orders its buckets after its
    first step, and PowerSGD's state is in that order: the warm-up (train.warmup_steps >= 2, required) makes
    both runs train with the re-ordered buckets from their first real step."""
    opts = ["train.epochs=2", f"train.comm_hook={hook}", "train.powersgd_start=3", "train.powersgd_rank=1",
            "train.checkpoint_every=4", "train.warmup_steps=2"]
    codes, out = train(tiny_betons, tmp_path / "ref", *opts, nproc=2, probe="held_after_save",
                       env={"PROBE_OUT": str(tmp_path / "held")})
    assert codes == [0, 0], out
    # the states are gathered to rank 0 alone, which writes them and lets them go: every other rank used to keep
    # world_size copies of them after each checkpoint (all-gathered, cleared on rank 0 only)
    held = [json.loads((tmp_path / f"held.{rank}").read_text()) for rank in range(2)]
    assert held == [[0] * 6, [0] * 6], held  # the checkpoints after steps 4, 8, 10 (epoch 1), 12, 16 and 20
    run_dir = tmp_path / "run"
    codes, out = train(tiny_betons, run_dir, *opts, nproc=2, env={"DIST_RESNET_FAULT": "step:13"})
    assert codes == [-9, -9], out
    saved = load(run_dir / "last.pt")
    assert saved["step"] == 12
    if hook == "powersgd":
        ranks = saved["comm_hook"]["ranks"]
        assert len(ranks) == 2 and ranks[0]["iter"] == ranks[1]["iter"] > 3 and ranks[0]["error_dict"]
        assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["error_dict"].values(),
                                                         ranks[1]["error_dict"].values()))  # per rank
    codes, out = train(tiny_betons, run_dir, *opts, "train.resume=true", nproc=2)
    assert codes == [0, 0], out
    assert_same_run(tmp_path / "ref", run_dir)


def test_a_stop_request_during_the_final_evaluation_is_cleared(tiny_betons, tmp_path):
    codes, out = train(tiny_betons, tmp_path / "run", "train.epochs=1", probe="stop_in_final_eval")
    assert codes == [0], out  # the run had finished: nothing to stop, and nothing left to stop the next run
    assert metrics(tmp_path / "run")["completed"] and not (tmp_path / "run" / "STOP").exists()


# ---------------------------------------------------------------- divergence
def test_a_real_divergence_ends_with_exit_3_and_saves_nothing(tiny_betons, tmp_path):
    codes, out = train(tiny_betons, tmp_path / "run", "train.epochs=2", "optim.lr=1e5")
    assert codes == [3], out
    assert "training diverged: the loss became NaN or inf between steps" in out and "lower optim.lr" in out
    m = metrics(tmp_path / "run")
    assert m["failure"]["kind"] == "nonfinite_loss" and not list((tmp_path / "run").glob("*.pt"))


def test_a_nan_on_one_rank_stops_every_rank_and_keeps_the_good_checkpoint(tiny_betons, tmp_path):
    run_dir = tmp_path / "run"
    codes, out = train(tiny_betons, run_dir, "train.epochs=2", nproc=2, probe="nan",
                       env={"PROBE_STEP": "15", "PROBE_RANK": "1"})
    assert codes == [3, 3], out  # both ranks saw the all-reduced NaN at the same sync
    assert out.count("between steps 11 and 15 (epoch 2)") == 1  # rank 0 reports; rank 1 exits with it
    last = load(run_dir / "last.pt")
    assert last["step"] == 10 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-00000010.pt"]
    assert metrics(run_dir)["failure"]["steps"] == [11, 15]


def test_rollback_reloads_the_last_good_checkpoint_with_half_the_lr_on_every_rank(tiny_betons, tmp_path):
    run_dir = tmp_path / "run"
    codes, out = train(tiny_betons, run_dir, "train.epochs=2", "train.nonfinite=rollback", nproc=2, probe="nan",
                       env={"PROBE_STEP": "15", "PROBE_RANK": "1"})
    assert codes == [0, 0], out
    assert "rolled back to" in out and "(step 10) with optim.lr=0.2 (rollback 1 of" in out
    m, last = metrics(run_dir), load(run_dir / "last.pt")
    assert m["completed"] and m["rollbacks"] == [{"diverged_steps": [11, 15], "to_step": 10, "lr": 0.2}]
    assert last["scheduler"]["base_lrs"][0] == pytest.approx(0.2) and last["step"] == 20
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------- resume that refuses what it cannot continue
@pytest.fixture(scope="module")
def stopped_run(tiny_betons, tmp_path_factory):
    """A run stopped after epoch 1 of 2 (exit 75), copied fresh for each test."""
    d = tmp_path_factory.mktemp("stopped") / "run"
    d.mkdir()
    (d / "STOP").touch()
    codes, out = train(tiny_betons, d, "train.epochs=2", "train.stop_check_every=50")
    assert codes == [75], out
    return d


def resume_in_process(tiny_betons, run_dir, *overrides, capsys):
    from dist_resnet import train as train_module

    with pytest.raises(SystemExit) as e:
        train_module.main(argv(tiny_betons, run_dir, "train.epochs=2", "train.resume=true", *overrides))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("changes", [
    ["optim.lr=0.2", "train.seed=3"],
    ["train.epochs=5"],
    ["model.width=16"],
    ["data.translate=4", "train.batch_size=200"],
    ["optim.lookahead_every=5"],
])
def test_resume_refuses_changes_that_alter_the_run(tiny_betons, stopped_run, tmp_path, changes, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    before = (run_dir / "last.pt").stat().st_mtime_ns
    code, err = resume_in_process(tiny_betons, run_dir, *changes, capsys=capsys)
    assert code == 2 and "cannot resume from" in err and len(err.strip().splitlines()) == 1
    old = load(run_dir / "last.pt")["config"]
    for change in changes:
        key, new = change.split("=")
        if key != "train.epochs":
            section, name = key.split(".")
            assert f"{key}: {old[section][name]} -> {new}" in err
    if "train.epochs=5" in changes:
        assert "train.epochs: 2 -> 5" in err and "the LR schedule is planned over the epochs a run starts with" in err
    assert (run_dir / "last.pt").stat().st_mtime_ns == before


def test_resume_refuses_other_data_but_follows_moved_data(tiny_betons, betons, stopped_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    from dist_resnet import train as train_module

    with pytest.raises(SystemExit) as e:
        train_module.main(argv(betons, run_dir, "train.epochs=2", "train.resume=true"))
    assert e.value.code == 2 and "data.dir (beton sha256)" in capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.copytree(tiny_betons, moved)
    summary = train_module.main(argv(moved, run_dir, "train.epochs=2", "train.resume=true", "train.log_every=3",
                                     "data.num_workers=2", "train.eval_every=2", "model.compile=false"))
    assert summary["completed"]


def test_ema_switched_on_at_resume_starts_from_the_restored_weights(tiny_betons, stopped_run, tmp_path):
    from dist_resnet.config import load_config
    from dist_resnet.distributed import DistEnv
    from dist_resnet.train import Trainer

    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    cfg = load_config(TINY[1], argv(tiny_betons, run_dir, "train.epochs=2", "train.resume=true", "train.ema=true")[2:])
    trainer = Trainer(cfg, DistEnv(0, 1, 0, 1, torch.device("cpu")))
    try:
        restored = load(run_dir / "last.pt")["model"]
        ema = trainer.step.hooks[0].ema  # the EMA hook: the only after-step hook of this run
        for k, v in ema.module.state_dict().items():
            assert torch.equal(v, restored[k]), k  # not the random initial weights
    finally:
        trainer.finish(stopped=True)


def test_ranks_that_see_different_checkpoints_fail_clearly(tiny_betons, stopped_run, tmp_path):
    """run.dir on a node-local disk: rank 0 finds the checkpoint, rank 1 finds none."""
    shared = tmp_path / "run"
    shutil.copytree(stopped_run, shared)
    log = tmp_path / "log"
    ranks = [argv(tiny_betons, shared, "train.epochs=2", "train.resume=true"),
             argv(tiny_betons, tmp_path / "local", "train.epochs=2", "train.resume=true")]
    codes = Ranks("dist_resnet.train", ranks, log, nproc=2).wait(120)
    assert codes == [2, 2]
    assert "the ranks see different checkpoints" in log.read_text() and "every node shares" in log.read_text()




def test_a_run_stopped_on_two_ranks_resumes_on_one(tiny_betons, tmp_path):
    """A requeued Slurm job may come back on fewer nodes. With GroupNorm (batch-independent), 2 ranks x 50
    and 1 rank x 100 are the same computation up to fp32 rounding; the resumed run must be no further
    from the uninterrupted 2-rank run than an uninterrupted 1-rank run is (the fp32 noise floor)."""
    opts = ["train.epochs=1", "model.norm=group", "optim.lr=0.02", "train.resume=true", "train.stop_check_every=3"]
    for name, nproc in (("ref2", 2), ("ref1", 1)):
        codes, out = train(tiny_betons, tmp_path / name, *opts, nproc=nproc)
        assert codes == [0] * nproc, out
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    codes, out = train(tiny_betons, run_dir, *opts, nproc=2)
    assert codes == [75, 75] and "stopped (stop file" in out and "at epoch 1 step 3/10" in out, out
    codes, out = train(tiny_betons, run_dir, *opts, nproc=1)
    assert codes == [0] and "resuming a run of 2 ranks on 1" in out and "inside epoch 1, after its step 3 " in out, out
    floor, rel = relative_distance(tmp_path / "ref2", tmp_path / "ref1"), relative_distance(tmp_path / "ref2", run_dir)
    print(f"vs 2 ranks uninterrupted: resumed on 1 rank {rel:.1e}, 1 rank uninterrupted {floor:.1e} (fp32 noise)")
    assert floor < 1e-3 and rel <= 2 * floor + 1e-7
    m = metrics(run_dir)
    assert m["test_count"] == 200 and m["world_size"] == 1 and m["completed"]


# ---------------------------------------------------------------- hangs and dead ranks
def test_a_hung_rank_ends_the_run_within_the_timeout_and_the_run_resumes(tiny_betons, tmp_path):
    """SIGSTOP one worker under torchrun: the other gives up after train.timeout_s with a clear error,
    torchrun reports the failure, and the run resumes from its checkpoint."""
    from tests.runs import children, finish, read_until, start
    from tests.test_distributed import TORCHRUN

    run_dir = tmp_path / "run"
    cmd = [*TORCHRUN, "--nproc_per_node=2", "-m", "dist_resnet.train",
           *argv(tiny_betons, run_dir, "train.epochs=2", "train.resume=true", "train.timeout_s=10")]
    p = start(cmd)
    read_until(p, "epoch   1 train loss")
    stopped = children(p.pid)[-1]
    os.kill(stopped, signal.SIGSTOP)
    t0 = time.time()
    out = read_until(p, "a collective failed", timeout=60)
    waited = time.time() - t0
    os.kill(stopped, signal.SIGCONT)  # torchrun's SIGTERM to it is pending; let it act on it
    out += finish(p, timeout=120)
    assert p.returncode != 0 and "train.timeout_s bounds the wait" in out
    assert waited < 40, waited  # 10 s of timeout, plus the rest of the epoch
    codes, out = train(tiny_betons, run_dir, "train.epochs=2", "train.resume=true", nproc=2)
    assert codes == [0, 0] and "resumed from" in out, out


def test_a_decode_error_on_one_rank_ends_every_rank_with_that_error(tiny_betons, tmp_path):
    from tests.test_loader import corrupt_sample_pointer

    data = tmp_path / "damaged"
    shutil.copytree(tiny_betons, data)
    corrupt_sample_pointer(data / "train.beton", 500)
    codes, out = train(data, tmp_path / "run", "train.epochs=1", "data.pipeline=ffcv", nproc=2, probe="boundscheck")
    assert sorted(codes) == [1, 2], out  # the failing rank: its own error; the other: a failed collective
    assert out.count("failed in FFCV's decode thread") == 2, out  # ... which names the first rank's error


# ---------------------------------------------------------------- files that must not run code
def test_a_crafted_checkpoint_never_runs_through_any_entry_point(tiny_betons, stopped_run, tmp_path, capsys):
    from dist_resnet import evaluate
    from tests.test_checkpoint import crafted_checkpoint

    marker = tmp_path / "PWNED"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(evil), f"data.dir={tiny_betons}"])
    assert e.value.code == 2 and "could run code" in capsys.readouterr().err
    run_dir = tmp_path / "run"  # train.resume=true on a run folder whose checkpoints were replaced
    shutil.copytree(stopped_run, run_dir)
    for p in run_dir.glob("*.pt"):
        p.unlink()
        shutil.copy(evil, p)
    code, err = resume_in_process(tiny_betons, run_dir, capsys=capsys)
    assert code == 2 and "no checkpoint in" in err and "could run code" in err
    from dist_resnet import export, predict
    from dist_resnet import train as train_module

    for main, args in ((train_module.main, argv(tiny_betons, tmp_path / "ft", f"model.pretrained={evil}")),
                       (predict.main, [str(evil), str(tmp_path)]),
                       (export.main, [str(evil), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "could run code" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


# ---------------------------------------------------------------- one trainer per run folder
def test_a_second_trainer_in_a_run_folder_in_use_stops_and_writes_nothing(tiny_betons, tmp_path, capsys):
    """What a sweep's retry of a trial whose trainer still runs would do (an RDB heartbeat outage): the
    folder is held by its trainer (a flock, released when that process ends), so the second one fails
    at once, naming the holder, and leaves the folder as it was."""
    from dist_resnet import train as train_module

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dist_resnet import rundir; "
                               f"held = rundir.lock({str(run_dir)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            train_module.main(argv(tiny_betons, run_dir, "train.epochs=1", "train.resume=true"))
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"is in use by pid {holder.pid} on " in err and "one trainer writes to a run folder at a time" in err
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    train_module.main(argv(tiny_betons, run_dir, "train.epochs=1", "train.resume=true"))  # free again
    assert metrics(run_dir)["completed"]


# ---------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize("bad, message", [
    ("train.seed=-1", "'train.seed': -1; it must be >= 0"),
    ("adv.eval_every=-1", "'adv.eval_every': -1; it must be >= 0 (0 = at the end only)"),
    ("optim.momentum=0", "optim.nesterov=true needs optim.momentum > 0"),
    ("train.device=cuda", "train.device=cuda but CUDA is not available here; use train.device=cpu"),
])
def test_bad_settings_get_one_line_and_exit_2(tiny_betons, tmp_path, bad, message, capsys):
    if bad == "train.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from dist_resnet import train as train_module

    with pytest.raises(SystemExit) as e:
        train_module.main(argv(tiny_betons, tmp_path / "run", bad))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_for_another_model_or_classes_is_refused_by_evaluate(tiny_betons, stopped_run, subset_dir,
                                                                           tmp_path, capsys):
    from dist_resnet import evaluate
    from dist_resnet.data.prepare import prepare
    from tests.conftest import CLASSES, image_folder

    ckpt = str(stopped_run / "last.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main([ckpt, f"data.dir={tiny_betons}", "model.name=resnet18"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds a resnet9 (width 8, batch norm) for 10 classes" in err
    assert "make a resnet18" in err and len(err.strip().splitlines()) == 1
    three = image_folder(tmp_path / "src", subset_dir, {"train": 4, "test": 2}, CLASSES[:3])
    prepare(str(three), tmp_path / "three", workers=1)
    with pytest.raises(SystemExit) as e:
        evaluate.main([ckpt, f"data.dir={tmp_path / 'three'}"])
    assert e.value.code == 2 and "make a resnet9 (width 8, batch norm) for 3 classes" in capsys.readouterr().err


def test_cuda_out_of_memory_names_the_batch_and_the_way_out(tiny_betons, tmp_path, capsys, monkeypatch):
    """The GPU path, driven on CPU: the error torch raises, caught where the trainer runs a step."""
    from dist_resnet import train as train_module

    def oom(self, epoch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module.Trainer, "train_epoch", oom)
    with pytest.raises(SystemExit) as e:
        train_module.main(argv(tiny_betons, tmp_path / "run", "train.accum_steps=2"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "CUDA out of memory with 50 images per rank and micro-batch" in err and "Raise train.accum_steps" in err


def test_a_skipped_fp16_step_advances_neither_schedule_nor_ema_nor_lookahead(tiny_betons, tmp_path):
    """fp16's loss scale skips a step whose gradients overflowed; the LR schedule, the EMA and
    lookahead count applied steps only. (The GradScaler path, run on CPU.)"""
    from dist_resnet.config import load_config
    from dist_resnet.distributed import DistEnv
    from dist_resnet.train import Trainer

    cfg = load_config(TINY[1], argv(tiny_betons, tmp_path / "run", "train.precision=fp16", "train.ema=true",
                                    "optim.lookahead_every=1")[2:])
    trainer = Trainer(cfg, DistEnv(0, 1, 0, 1, torch.device("cpu")))
    try:
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        optimizer_step, scaler = trainer.step, trainer.step.loss_scale.scaler  # the GradScaler of fp16
        ema = optimizer_step.hooks[0].ema  # hooks in order: EMA, lookahead

        def step(grad: float) -> None:
            scaler.scale(torch.ones(()))  # what the backward of each step does first
            for p in params:
                p.grad = torch.full_like(p, grad)
            optimizer_step.apply(trainer.state.step)
            trainer.state.step += 1

        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        ema_before = {k: v.clone() for k, v in ema.module.state_dict().items()}
        step(float("inf"))
        assert optimizer_step.scheduler.last_epoch == 0 and scaler.get_scale() == 2.0 ** 15  # halved from 2^16
        assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
        assert all(torch.equal(v, ema_before[k]) for k, v in ema.module.state_dict().items())
        step(1e-3)
        assert optimizer_step.scheduler.last_epoch == 1
        assert not all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    finally:
        trainer.finish(stopped=True)
