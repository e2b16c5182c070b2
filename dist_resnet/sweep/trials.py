"""One trial = one training run in its own folder, started as a process and watched: its validation
accuracy goes to Optuna after every epoch (read from metrics.json, dist_resnet.rundir), the pruner's or
the sweep's stop becomes a STOP file, and its exit becomes a value, a prune, an interruption or a failure."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import rundir
from ..config import Config, Pipeline
from ..distributed import EXIT_BAD_INPUT, EXIT_DIVERGED, STOP_SIGNALS, stop_signals_blocked
from ..fileio import alive, write_json

_forkserver = None


class TrialFailed(Exception):
    pass


class TrialInterrupted(Exception):
    pass


# Failed trials that do not count against --trials, by the start of their note: stopped by the sweep and
# queued to resume, found with a dead worker and retried; or never trained: started after the study was
# full, or as the sweep was stopping
NOT_COUNTED = ("interrupted", "stale", "surplus", "unstarted")


def counts(t) -> bool:
    """Whether a trial counts against --trials: it ran, runs, or failed for a reason of its own."""
    from optuna.trial import TrialState

    note = str(t.user_attrs.get("error", ""))
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or (
        t.state == TrialState.FAIL and not note.startswith(NOT_COUNTED))


def _die_with_parent() -> None:
    """SIGTERM when the forkserver ends, as it does when the sweep dies (Ctrl-C, OOM, a kill): the trainer
    checkpoints and stops instead of training on, orphaned, in a folder that a retry will resume."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _train_in_child(argv: list[str], env: dict, log: str) -> None:
    _die_with_parent()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.update(env)  # before anything touches CUDA: the forkserver never did
    from .. import train

    train.main(argv)


class Forked:
    """`python -m dist_resnet.train ARGV`, forked by a multiprocessing forkserver that has imported torch,
    dist_resnet (and FFCV, for trials that decode with it) once and never touched CUDA, with Popen's
    poll()/returncode."""

    def __init__(self, argv: list[str], env: dict, log: Path, ffcv: bool, mlflow: bool = False):
        import multiprocessing as mp

        global _forkserver
        if _forkserver is None:  # mlflow: its import takes seconds, in every trial that tracks to it
            _forkserver = mp.get_context("forkserver")
            _forkserver.set_forkserver_preload(["torch._dynamo", "torch.utils.tensorboard", "matplotlib.pyplot",
                                                *(["ffcv"] if ffcv else []), *(["mlflow.tracking"] if mlflow else []),
                                                "dist_resnet.train"])
        self.process = _forkserver.Process(target=_train_in_child, args=(argv, env, str(log)))
        with stop_signals_blocked():  # the forkserver, started now, must outlive a stop; the trainer unblocks
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()  # first, as it unblocks SIGTERM in this thread once it has started
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        """Popen.wait: the exit code, or TimeoutExpired if the process still runs after `timeout` s."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("dist_resnet.train", timeout)
        return self.process.exitcode

    @property
    def returncode(self) -> int | None:
        self.process.join()
        return self.process.exitcode


def start(argv: list[str], gpus: list[str], log: Path, ffcv: bool, mlflow: bool = False):
    """The trial's training, started: torchrun for several GPUs; else a process forked by a forkserver that
    imported torch, dist_resnet and, with `ffcv` (data.pipeline=ffcv), FFCV once (2-10 s a trial saved).
    Its output goes to `log`."""
    env = {"PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})}
    if len(gpus) <= 1:
        return Forked(argv, env, log, ffcv, mlflow)
    with open(log, "a") as f, stop_signals_blocked():  # torchrun dies of USR1: only its workers act on it
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={len(gpus)}", "-m", "dist_resnet.train", *argv],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)


LEASE = "worker.json"  # in a running trial's folder: which sweep worker watches it, renewed every second


def renew_lease(run_dir: Path) -> None:
    write_json(run_dir / LEASE, {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})


def stale(run_dir: Path, grace: float, started: float) -> str | None:
    """Why the worker of a RUNNING trial is gone (None while it lives): its process ended on this host,
    or its lease is older than `grace` seconds (or was never written, `grace` after the trial started)."""
    try:
        lease = json.loads((run_dir / LEASE).read_text())
    except (OSError, json.JSONDecodeError):
        return f"no worker has watched it since it started, {time.time() - started:.0f} s ago" \
            if time.time() - started > grace else None
    if lease["host"] == socket.gethostname() and not alive(lease["pid"]):
        return f"its worker (pid {lease['pid']} on {lease['host']}) is gone"
    age = time.time() - lease["time"]
    return f"its worker ({lease['host']}, pid {lease['pid']}) last renewed its lease {age:.0f} s ago" \
        if age > grace else None


class TrialRun:
    """A started trial's process and folder, watched until it ends (`watch`), then judged (`outcome`).
    `folder` is the trial's folder (its lease, the number a resume refers to): `run_dir` itself, or with
    --folds the folder of the fold's trial."""

    def __init__(self, trial, run_dir: Path, argv: list[str], gpus: list[str], cfg: Config, stop: threading.Event,
                 folder: Path | None = None):
        self.trial, self.run_dir, self.epochs, self.stop = trial, run_dir, cfg.train.epochs, stop
        self.folder = folder or run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        renew_lease(self.folder)
        self.t0 = time.time()
        self.proc = start(argv, gpus, run_dir / "train.log", cfg.data.pipeline == Pipeline.ffcv, bool(cfg.run.mlflow))
        self.reported: set[int] = set()
        self.pruned = self.stopping = False

    def report(self, done: bool) -> None:
        """Each new epoch's validation accuracy to Optuna; the pruner's verdict as a STOP file."""
        for epoch, acc in rundir.val_history(rundir.read_metrics(self.run_dir)):
            if epoch in self.reported:
                continue
            self.trial.report(acc, epoch)
            self.reported.add(epoch)
            if not self.pruned and epoch < self.epochs and self.trial.should_prune():
                self.pruned = True  # the same verdict however late this loop sees the epoch
                if not done:  # stop it with a checkpoint; its record stays in the trial folder
                    rundir.request_stop(self.run_dir)

    def watch(self) -> int:
        """Poll until the process ends; its exit code."""
        while True:
            done = self.proc.poll() is not None
            self.report(done)
            if self.stop.is_set() and not (self.pruned or self.stopping or done):
                self.stopping = True  # once: the trainer removes the file when it has handled it
                rundir.request_stop(self.run_dir)
            if done:
                break
            renew_lease(self.folder)
            try:  # a second, or less when the process ends sooner
                self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        if self.stopping or self.pruned:  # the trainer may have stopped on Slurm's signal before it saw the file
            rundir.withdraw_stop(self.run_dir)
        self.trial.set_user_attr("seconds", round(time.time() - self.t0, 1))
        return self.proc.returncode

    def stopped(self, metrics: dict | None) -> bool:
        """Whether this attempt ended stopped with a checkpoint (the sweep's stop, or a signal to the trainer):
        read from the run's own record, since torchrun's exit code does not say."""
        path = self.run_dir / rundir.METRICS
        return bool((metrics or {}).get("stopped")) and path.stat().st_mtime >= self.t0

    def outcome(self, code: int, values: dict) -> float:
        """The trial's value; or optuna.TrialPruned, TrialInterrupted (queued to resume) or TrialFailed."""
        import optuna

        metrics = rundir.read_metrics(self.run_dir)
        history = rundir.val_history(metrics)
        if self.pruned:
            raise optuna.TrialPruned(f"pruned at epoch {max(self.reported)}")
        if self.stopped(metrics):
            raise TrialInterrupted("interrupted")
        if code != 0 or not history:
            tail = (self.run_dir / "train.log").read_text().strip().splitlines()[-3:]
            why = {EXIT_DIVERGED: "diverged", EXIT_BAD_INPUT: "bad input"}.get(code, f"exit code {code}")
            message = f"{why}: {' | '.join(tail)[-300:]}" if tail else why
            raise TrialFailed(message)
        self.best_epoch, value, self.needed = rundir.selected(metrics)  # best.pt's epoch, not the last one
        return value

    def record(self) -> None:
        """The trial's selected epoch and the epochs it needed (for --final), as user attributes."""
        self.trial.set_user_attr("best_epoch", self.best_epoch)
        self.trial.set_user_attr("epochs_needed", self.needed)


def judged(trial, folder: Path, values: dict, outcome):
    """`outcome()`'s value; an interruption queues the trial to resume in `folder`, a failure is noted."""
    try:
        return outcome()
    except TrialInterrupted:
        trial.study.enqueue_trial(values, user_attrs={"resume_of": int(folder.name.split("-")[1])})
        trial.set_user_attr("error", "interrupted: queued to resume from its checkpoint")
        raise
    except TrialFailed as e:
        trial.set_user_attr("error", str(e))
        print(f"trial {trial.number} failed ({folder.name}): {e}", flush=True)
        raise
