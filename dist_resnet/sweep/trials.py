"""One trial = one training run in its own folder, started as a process and watched: its validation
accuracy goes to Optuna after every epoch (read from metrics.json, dist_resnet.rundir), the pruner's or
the sweep's stop becomes a STOP file, and its exit becomes a value, a prune, an interruption or a failure."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import rundir
from ..config import Config, Pipeline
from ..distributed import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STOPPED

_forkserver = None


class TrialFailed(Exception):
    pass


class TrialInterrupted(Exception):
    pass


def _train_in_child(argv: list[str], env: dict, log: str) -> None:
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

    def __init__(self, argv: list[str], env: dict, log: Path, ffcv: bool):
        import multiprocessing as mp

        global _forkserver
        if _forkserver is None:
            _forkserver = mp.get_context("forkserver")
            _forkserver.set_forkserver_preload(["torch._dynamo", "torch.utils.tensorboard", "matplotlib.pyplot",
                                                *(["ffcv"] if ffcv else []), "dist_resnet.train"])
        self.process = _forkserver.Process(target=_train_in_child, args=(argv, env, str(log)))
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


def start(argv: list[str], gpus: list[str], log: Path, ffcv: bool):
    """The trial's training, started: torchrun for several GPUs; else a process forked by a forkserver that
    imported torch, dist_resnet and, with `ffcv` (data.pipeline=ffcv), FFCV once (2-10 s a trial saved).
    Its output goes to `log`."""
    env = {"PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})}
    if len(gpus) <= 1:
        return Forked(argv, env, log, ffcv)
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={len(gpus)}", "-m", "dist_resnet.train", *argv],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)


class TrialRun:
    """A started trial's process and folder, watched until it ends (`watch`), then judged (`outcome`)."""

    def __init__(self, trial, run_dir: Path, argv: list[str], gpus: list[str], cfg: Config, stop: threading.Event):
        self.trial, self.run_dir, self.epochs, self.stop = trial, run_dir, cfg.train.epochs, stop
        run_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.proc = start(argv, gpus, run_dir / "train.log", cfg.data.pipeline == Pipeline.ffcv)
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
            try:  # a second, or less when the process ends sooner
                self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        self.trial.set_user_attr("seconds", round(time.time() - self.t0, 1))
        return self.proc.returncode

    def outcome(self, code: int, values: dict) -> float:
        """The trial's value; or optuna.TrialPruned, TrialInterrupted (queued to resume) or TrialFailed."""
        import optuna

        history = rundir.val_history(rundir.read_metrics(self.run_dir))
        if self.pruned:
            raise optuna.TrialPruned(f"pruned at epoch {max(self.reported)}")
        if code == EXIT_STOPPED and self.stop.is_set():
            self.trial.study.enqueue_trial(values, user_attrs={"resume_of": int(self.run_dir.name.split("-")[1])})
            self.trial.set_user_attr("error", "interrupted: queued to resume from its checkpoint")
            raise TrialInterrupted("interrupted")
        if code != 0 or not history:
            tail = (self.run_dir / "train.log").read_text().strip().splitlines()[-3:]
            why = {EXIT_DIVERGED: "diverged", EXIT_BAD_INPUT: "bad input"}.get(code, f"exit code {code}")
            message = f"{why}: {' | '.join(tail)[-300:]}" if tail else why
            self.trial.set_user_attr("error", message)
            print(f"trial {self.trial.number} failed ({self.run_dir.name}): {message}", flush=True)
            raise TrialFailed(message)
        return history[-1][1]
