"""The sweep's workers: one thread per slot (a GPU or K GPUs each, or the CPU), each asking Optuna for a
trial at a time until the study holds --trials counted trials or a stop is requested."""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from ..config import ConfigError, load_config
from .space import Param, SweepError
from .folds import Folds
from .trials import TrialFailed, TrialInterrupted, TrialRun, counts, judged, stale


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
    def __init__(self, args, params: list[Param], storage):
        self.args, self.params, self.storage = args, params, storage
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
            trial.set_user_attr("error", "unstarted: the sweep was asked to stop before this trial started")
            raise TrialInterrupted("stopped before the start")
        if self.surplus(trial):
            trial.set_user_attr("error", f"surplus: the study already holds --trials {self.args.trials} trials")
            raise TrialInterrupted("surplus")
        run_dir = self.folder_of(trial)
        values = {p.key: p.suggest(trial) for p in self.params}
        overrides = [*self.args.overrides, *(f"{k}={v}" for k, v in values.items())]
        trial.set_user_attr("run_dir", run_dir.name)
        try:
            folds = [f"data.folds={self.args.folds}", "data.fold=0"] if self.args.folds else []  # as fold 0 runs
            cfg = load_config(self.args.config, [*overrides, *folds, f"run.dir={run_dir}"])
        except ConfigError as e:
            trial.set_user_attr("error", f"config: {e}")
            raise TrialFailed(str(e)) from None
        argv = [*(["--config", self.args.config] if self.args.config else []), *overrides, f"run.dir={run_dir}",
                "run.progress=false", "train.resume=true"]
        if self.args.folds:
            return judged(trial, run_dir, values, lambda: Folds(self, trial, run_dir, argv, values, cfg).run())
        gpus = self.slots.get()
        try:
            run = TrialRun(trial, run_dir, argv, gpus, cfg, self.stop)
            return judged(trial, run_dir, values, lambda: recorded(run, run.outcome(run.watch(), values)))
        finally:
            self.slots.put(gpus)

    def remaining(self, study) -> int:
        return self.args.trials - sum(counts(t) for t in study.get_trials(deepcopy=False))

    def unvisited(self, study) -> int:
        """Grid points no counted trial has trained yet (--sampler grid)."""
        import itertools

        grid = set(itertools.product(*(q.values for q in self.params)))
        seen = {tuple(t.params.get(q.key) for q in self.params) for t in study.get_trials(deepcopy=False) if counts(t)}
        return len(grid - seen)

    def surplus(self, trial) -> bool:
        """Whether `trial` started after the study was full: slots and workers that checked the count at
        once each started one. The lowest-numbered trials keep their place."""
        earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number and counts(t)]
        return len(earlier) >= self.args.trials

    def reap(self, study) -> None:
        """Journal storage has no heartbeat: a RUNNING trial whose worker is gone (killed, out of memory, its
        node lost) would stay RUNNING forever, counted and never finished. Such a trial is marked failed as
        stale, which does not count, and queued to resume from its checkpoint. (RDB storage: Optuna's
        heartbeat does this, with RetryHeartbeatStaleTrialCallback.)"""
        from optuna.storages import RDBStorage
        from optuna.trial import TrialState

        if isinstance(self.storage, RDBStorage):
            return
        study_id = self.storage.get_study_id_from_name(study.study_name)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            folder = self.dir / t.user_attrs.get("run_dir", f"trial-{t.number:04d}")
            why = stale(folder, 2 * self.args.heartbeat, t.datetime_start.timestamp())
            if why is None:
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            try:
                self.storage.set_trial_user_attr(trial_id, "error", f"stale: {why}; retried from its checkpoint")
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except Exception:  # noqa: BLE001 - another worker reaped it first
                continue
            study.enqueue_trial(t.params, user_attrs={"resume_of": int(folder.name.split("-")[1])})
            print(f"trial {t.number} ({folder.name}) is stale: {why}; queued to resume from its checkpoint",
                  flush=True)

    def work(self, study) -> None:
        """One slot's loop: a trial at a time, until the study holds --trials trials or a stop."""
        try:
            while not self.stop.is_set():
                self.reap(study)  # a peer that died meanwhile
                if self.remaining(study) <= 0:
                    break
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


def recorded(run: TrialRun, value: float) -> float:
    run.record()
    return value
