"""The Slurm job scripts on a real one-node Slurm (tests/slurm.py: munge, slurmctld and slurmd started
for this module): sbatch, `scancel -s USR1 -b` (what --signal=B:USR1@T sends), `scancel`, requeue and a
SIGKILL, delivered by Slurm to every process of a job step as on a cluster. Tiny data, narrow models.

- slurm/train.sh: USR1 -> checkpoint -> requeue -> resume, bit-identical to an uninterrupted run; scancel
  ends the job, checkpointed, without a requeue.
- slurm/sweep.sh: USR1 mid-trial -> the trial is queued, the task requeued, the trial resumed and completed
  once; scancel queues the trial; a hard-killed worker's trial is retried by the next worker.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from dist_resnet import rundir, sweep
from dist_resnet.checkpoint import load
from tests.conftest import RESUME, ROOT, TINY
from tests.launch import free_port
from tests.runs import assert_same_run, metrics
from tests.slurm import ended

# a sweep's trials: the tiny data with a 20 % validation split
SWEEP = [*TINY[2:], "data.val_fraction=0.2", "train.stop_check_every=2"]


@pytest.fixture(scope="module")
def slurm():
    from tests.slurm import cluster

    with cluster() as c:
        yield c


def test_every_srun_in_the_job_scripts_passes_the_cpus_per_task():
    """srun does not inherit sbatch's --cpus-per-task on every Slurm version (from 22.05 it reads
    SRUN_CPUS_PER_TASK instead): without it a job step may get 1 CPU for all its data workers."""
    for script in sorted(ROOT.glob("slurm/*.sh")):
        calls = [line for line in script.read_text().splitlines() if line.lstrip().startswith("srun ")]
        assert calls, script
        for line in calls:
            assert '--cpus-per-task="${SLURM_CPUS_PER_TASK' in line, (script.name, line)


# ---------------------------------------------------------------- slurm/train.sh
def submit_train(slurm, tmp_path, tiny_betons, name: str, *args: str) -> str:
    """sbatch slurm/train.sh as a user would, with 2 CPU ranks instead of GPUs."""
    env = {"CONFIG": TINY[1], "DATA_DIR": str(tiny_betons), "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    return slurm.sbatch(ROOT / "slurm" / "train.sh", *RESUME, *args, options=(f"--job-name={name}",),
                        env=env, cwd=tmp_path)


def output_has(path: Path, text: str):
    return lambda: path.exists() and text in path.read_text(errors="replace")


@pytest.mark.slow  # tests/test_multinode.py does the same on two nodes, bit for bit against the same reference
def test_slurm_script_checkpoints_requeues_and_resumes(slurm, tiny_betons, reference_2rank, tmp_path):
    """The time-limit warning as Slurm sends it (--signal=B:USR1: `scancel -s USR1 -b`, the batch shell
    only): the ranks checkpoint, the script requeues the job, Slurm restarts it with the same job id,
    and it resumes to the same bits as an uninterrupted run."""
    t0 = time.time()
    job = submit_train(slurm, tmp_path, tiny_betons, "cifar")
    out = tmp_path / f"slurm-cifar-{job}.out"
    slurm.await_file(job, output_has(out, "epoch   1 train loss"), "epoch 1")
    slurm.run("scancel", "-s", "USR1", "-b", job)
    slurm.requeued(job)
    rec = slurm.wait(job, ended, what="the end of the requeued job")
    log = out.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", (rec, log)
    assert f"requeueing job {job}" in log and "(restart 1)" in log and "resumed from" in log, log
    assert_same_run(reference_2rank, tmp_path / "runs" / f"cifar-{job}")  # derived from the job id
    print(f"real Slurm: job {job} {rec['JobState']}, {rec['Restarts']} requeue, {time.time() - t0:.1f} s")


def test_scancel_checkpoints_and_does_not_requeue(slurm, tiny_betons, tmp_path):
    """scancel sends TERM to the batch shell and to every process of the job step, torchrun included:
    the ranks checkpoint and the job ends, cancelled. Only USR1, the time-limit warning, requeues."""
    job = submit_train(slurm, tmp_path, tiny_betons, "cancel", "train.epochs=40")
    out = tmp_path / f"slurm-cancel-{job}.out"
    slurm.await_file(job, output_has(out, "epoch   1 train loss"), "epoch 1")
    slurm.run("scancel", job)
    rec = slurm.wait(job, ended)
    assert "not requeueing" in out.read_text(), out.read_text()
    assert rec["JobState"] == "CANCELLED" and rec["Restarts"] == "0", rec
    assert 1 <= load(tmp_path / "runs" / f"cancel-{job}" / "last.pt")["epoch"] < 40


def folder_state(run_dir: Path) -> dict:
    """Every file of a run folder with its size and modification time."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run_dir.iterdir()) if p.is_file()}


def test_runs_that_cannot_succeed_end_without_a_requeue(slurm, tiny_betons, tmp_path):
    """torchrun turns every rank's exit into its own 1; the trainer's recorded outcome tells the script what it
    was. Three jobs, one rank each, side by side: a run that diverges (exit 3), a bad input that --check cannot
    see (another trainer takes the folder after the check passed: exit 2), and a user's `touch RUN_DIR/STOP`
    (exit 75). None is requeued (Restarts 0); the first two end FAILED with their code, the stop COMPLETED with
    its checkpoint; and nothing touches the run folders after the end."""
    env = {"CONFIG": TINY[1], "DATA_DIR": str(tiny_betons), "NPROC_PER_NODE": "1"}
    runs = {name: tmp_path / "runs" / name for name in ("diverged", "busy", "stopped")}
    extra = {"diverged": ["optim.lr=1e12"], "busy": [], "stopped": ["train.epochs=40"]}
    jobs = {name: slurm.sbatch(ROOT / "slurm" / "train.sh", *RESUME, *extra[name], options=(f"--job-name={name}",
                                                                                          "--cpus-per-task=1"),
                               env={**env, "RUN_DIR": str(runs[name]), "MASTER_PORT": str(free_port())}, cwd=tmp_path)
            for name in runs}
    out = {name: tmp_path / f"slurm-{name}-{job}.out" for name, job in jobs.items()}
    slurm.await_file(jobs["busy"], output_has(out["busy"], "(restart 0)"), "the end of its check")
    held = rundir.lock(runs["busy"])  # the folder taken between the check and the trainer's start
    try:
        slurm.await_file(jobs["stopped"], output_has(out["stopped"], "epoch   1 train loss"), "epoch 1")
        rundir.request_stop(runs["stopped"])
        recs = {name: slurm.wait(job, ended, what=f"the end of the {name} job") for name, job in jobs.items()}
    finally:
        held.close()
    ends = {name: folder_state(run) for name, run in runs.items()}
    logs = {name: out[name].read_text() for name in jobs}
    time.sleep(3)  # a requeue would be PENDING by now, and a requeued attempt would write into its folder
    states = {name: (slurm.job(job)["JobState"], slurm.job(job)["Restarts"], slurm.job(job)["ExitCode"])
              for name, job in jobs.items()}
    print(f"real Slurm, outcomes: {states}")
    assert states == {"diverged": ("FAILED", "0", "3:0"), "busy": ("FAILED", "0", "2:0"),
                      "stopped": ("COMPLETED", "0", "0:0")}, (states, logs)
    assert all(rec["Restarts"] == "0" for rec in recs.values()), recs
    assert "training diverged" in logs["diverged"] and "not requeueing" in logs["diverged"], logs["diverged"]
    assert "is in use by" in logs["busy"] and "bad input" in logs["busy"], logs["busy"]
    assert "stopped on request (stop file" in logs["stopped"], logs["stopped"]
    assert "requeueing job" not in "".join(logs.values()), logs
    assert {name: folder_state(run) for name, run in runs.items()} == ends  # untouched after the end
    stopped = metrics(runs["stopped"])
    assert stopped["stopped"] and stopped["stop_reason"].startswith("stop file") and not stopped["completed"]
    assert 1 <= load(runs["stopped"] / "last.pt")["epoch"] < 40 and not (runs["stopped"] / "STOP").exists()
    assert not (runs["diverged"] / "last.pt").exists() and not list(runs["busy"].glob("*.pt"))


# ---------------------------------------------------------------- slurm/sweep.sh
def submit_sweep(slurm, tmp_path, tiny_betons, study: str, *args: str) -> str:
    """sbatch slurm/sweep.sh: a 1-point grid, 4 epochs, in tmp_path/sweeps/STUDY (journal storage)."""
    env = {"CONFIG": TINY[1], "DATA_DIR": str(tiny_betons), "STUDY": study, "SWEEP_DIR": f"sweeps/{study}"}
    return slurm.sbatch(ROOT / "slurm" / "sweep.sh", "--trials", "1", "--sampler", "grid", "--space",
                        "optim.lr=[0.4]", *(args or [*SWEEP, "train.epochs=4"]), options=(f"--job-name={study}",),
                        env=env, cwd=tmp_path)


def job_output(folder: Path, study: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"slurm-{study}-*.out")))


def trial_states(sweep_dir: Path, study: str) -> list[tuple[str, str, str]]:
    optuna = pytest.importorskip("optuna", reason="sweeps need optuna (pip install 'dist_resnet[sweep]')")

    s = optuna.load_study(study_name=study, storage=sweep.make_storage(None, sweep_dir, 60))
    return [(t.state.name, t.user_attrs.get("run_dir", ""), t.user_attrs.get("error", "").split(":")[0]) for t in s.trials]


def test_slurm_sweep_task_stops_requeues_and_resumes_its_k_fold_trial(slurm, tiny_betons, tmp_path):
    """The time-limit warning reaches the batch shell, which passes it to srun, which delivers it to every
    process of the step: the sweep, its forkserver and the trainer. Here the trial has 2 folds (--folds 2)
    and the warning comes while fold 1 trains: the fold checkpoints, the trial is queued, the task requeues,
    and the requeued task keeps fold 0 (complete), resumes fold 1 from its own checkpoint and completes the
    trial, counted once, its value the mean of both folds."""
    job = submit_sweep(slurm, tmp_path, tiny_betons, "kf", "--folds", "2", *TINY[2:], "train.stop_check_every=2",
                       "train.epochs=3")
    trial = tmp_path / "sweeps" / "kf" / "trial-0000"
    slurm.await_file(job, (trial / "fold-1" / "ckpt-00000005.pt").exists, "fold 1's first checkpoint")
    slurm.run("scancel", "-s", "USR1", "-b", job)
    slurm.requeued(job)
    rec = slurm.wait(job, ended, what="the end of the requeued task")
    log = job_output(tmp_path, "kf")
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", (rec, log)
    assert "trials checkpointed and queued to resume; requeueing task" in log, log
    assert "2 trials: 1 complete, 0 pruned, 0 failed, 1 interrupted and resumed" in log, log  # 1 trial, 2 runs
    folds = [json.loads((trial / f"fold-{i}" / "metrics.json").read_text()) for i in range(2)]
    assert all(m["completed"] and m["epochs"] == 3 for m in folds)
    assert "already finished" in (trial / "fold-0" / "train.log").read_text()  # kept, not trained again
    fold1 = (trial / "fold-1" / "train.log").read_text()
    assert "stopped (SIGUSR1)" in fold1 and "resumed from" in fold1, fold1
    states = trial_states(tmp_path / "sweeps" / "kf", "kf")
    assert states == [("FAIL", "trial-0000", "interrupted"), ("COMPLETE", "trial-0000", "")], states
    table = sweep.main(["--report", str(tmp_path / "sweeps" / "kf")])["table"]
    assert table[-1]["val_acc"] == pytest.approx((folds[0]["val_acc"] + folds[1]["val_acc"]) / 2)
    print(f"real Slurm sweep: task {job} {rec['JobState']} after {rec['Restarts']} requeue; trials {states}; "
          f"folds {[m['val_acc'] for m in folds]}")


def test_scancel_queues_the_trial_and_a_hard_killed_worker_leaves_it_to_the_next(slurm, tiny_betons, tmp_path):
    """Three tasks of one study. 1: `scancel` (TERM to the shell and to every process of the step): the
    trial checkpoints, is queued, and the task ends without a requeue. 2: resumes it, then its processes
    are SIGKILLed (an OOM kill, a lost node, KillWait running out): the journal keeps the trial RUNNING
    with no one to finish it. 3: sees the dead worker's lease, marks that trial stale (not counted) and
    resumes it from its checkpoint to the end."""
    sweep_dir, trial = tmp_path / "sweeps" / "hk", tmp_path / "sweeps" / "hk" / "trial-0000"
    job = submit_sweep(slurm, tmp_path, tiny_betons, "hk")
    slurm.await_file(job, (trial / "ckpt-00000008.pt").exists, "epoch 1's checkpoint")
    slurm.run("scancel", job)
    rec = slurm.wait(job, ended)
    assert rec["JobState"] == "CANCELLED" and rec["Restarts"] == "0", rec
    assert trial_states(sweep_dir, "hk") == [("FAIL", "trial-0000", "interrupted"), ("WAITING", "", "")]
    job = submit_sweep(slurm, tmp_path, tiny_betons, "hk")  # another task of the study, or the same one again
    slurm.await_file(job, (trial / "ckpt-00000016.pt").exists, "epoch 2's checkpoint")  # resumed, and on
    worker = json.loads((trial / "worker.json").read_text())["pid"]  # the sweep process that watches the trial
    os.killpg(os.getpgid(worker), signal.SIGKILL)
    assert slurm.wait(job, ended)["JobState"] == "FAILED"
    assert trial_states(sweep_dir, "hk")[-1] == ("RUNNING", "trial-0000", "")
    job = submit_sweep(slurm, tmp_path, tiny_betons, "hk")
    rec = slurm.wait(job, ended, what="the end of the third task")
    log = job_output(tmp_path, "hk")
    assert rec["JobState"] == "COMPLETED", (rec, log)
    assert "trial 1 (trial-0000) is stale: its worker (pid" in log, log
    states = trial_states(sweep_dir, "hk")
    assert states == [("FAIL", "trial-0000", "interrupted"), ("FAIL", "trial-0000", "stale"),
                      ("COMPLETE", "trial-0000", "")], states
    assert (trial / "train.log").read_text().count("resumed from") == 2
    print(f"real Slurm, scancel then SIGKILL: trials {states}")
