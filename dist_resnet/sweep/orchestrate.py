"""The sweep's workers: one thread per slot (a GPU or K GPUs each, or the CPU), each asking Optuna for a
trial at a time until the study holds --trials counted trials or a stop is requested."""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from ..config import ConfigError, load_config
from .space import Param, SweepError
from .trials import TrialFailed, TrialInterrupted, TrialRun


def visible_gpus() -> list[str]:
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        n = 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in env.split(",") if d] if env else [str(i) for i in range(n)]
    return ids[:n]


class Sweep:
    def __init__(self, args, params: list[Param]):
        self.args, self.params = args, params
        self.dir = Path(args.out)
        self.stop = threading.Event()
        self.slots: queue.Queue = queue.Queue()
        gpus = visible_gpus()
        k = args.gpus_per_trial
        if gpus and k > len(gpus):
            raise SweepError(f"--gpus-per-trial {k} but only {len(gpus)} GPUs are visible")
        for i in range(max(1, len(gpus) // k) if gpus else 1):
            self.slots.put(gpus[i * k:(i + 1) * k] if gpus else [])
        self.parallel = self.slots.qsize()

    def folder_of(self, trial) -> Path:
        """The trial's folder: its own, or the one of the trial it resumes (a stopped or stale trial)."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        origin = trial.user_attrs.get("resume_of")
        if origin is None:  # a stale trial of a dead worker, retried: its number is in the frozen record
            frozen = trial.study.get_trials(deepcopy=False)[trial.number]
            origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        return self.dir / f"trial-{(trial.number if origin is None else origin):04d}"

    def objective(self, trial) -> float:
        if self.stop.is_set():
            raise TrialInterrupted("the sweep was asked to stop before this trial started")
        run_dir = self.folder_of(trial)
        values = {p.key: p.suggest(trial) for p in self.params}
        overrides = [*self.args.overrides, *(f"{k}={v}" for k, v in values.items())]
        trial.set_user_attr("run_dir", run_dir.name)
        try:
            cfg = load_config(self.args.config, [*overrides, f"run.dir={run_dir}"])
        except ConfigError as e:
            trial.set_user_attr("error", f"config: {e}")
            raise TrialFailed(str(e)) from None
        argv = [*(["--config", self.args.config] if self.args.config else []), *overrides, f"run.dir={run_dir}",
                "run.progress=false", "train.resume=true"]
        gpus = self.slots.get()
        try:
            run = TrialRun(trial, run_dir, argv, gpus, cfg, self.stop)
            return run.outcome(run.watch(), values)
        finally:
            self.slots.put(gpus)

    def remaining(self, study) -> int:
        from optuna.trial import TrialState

        counted = [t for t in study.get_trials(deepcopy=False)
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                   or (t.state == TrialState.FAIL and "interrupted" not in str(t.user_attrs.get("error", "")))]
        return self.args.trials - len(counted)

    def work(self, study) -> None:
        """One slot's loop: a trial at a time, until the study holds --trials trials or a stop."""
        try:
            while not self.stop.is_set() and self.remaining(study) > 0:
                study.optimize(self.objective, n_trials=1, catch=(TrialFailed, TrialInterrupted),
                               gc_after_trial=False, show_progress_bar=False)
        except BaseException as e:  # noqa: BLE001 - a bug, or the storage gone: stop every slot, report it
            self.errors.append(e)
            self.stop.set()

    def optimize(self, study) -> None:
        self.errors: list[BaseException] = []
        threads = [threading.Thread(target=self.work, args=(study,), daemon=True) for _ in range(self.parallel)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
        if self.errors:
            raise self.errors[0]
