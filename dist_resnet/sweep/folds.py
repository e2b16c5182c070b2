"""--folds K: a trial is K runs, fold i in trial-NNNN/fold-i (`data.folds=K data.fold=i`), each a normal
run that checkpoints and resumes on its own. The trial's value is the mean of its folds' validation accuracy,
each at the epoch its best.pt holds (dist_resnet.rundir.selected).

The folds run in the trial's slot one after another, and in parallel on any slot that is free when one
starts (another GPU; on one device they queue). After each fold, the mean of the folds done so far goes to
Optuna at step = the number done, and the pruner may stop the trial there: pruning uses the folds that
are done. A failed fold fails the trial with its reason; a stopped one (the sweep's stop, Slurm's signal)
interrupts it, to be resumed, with the folds already done kept; so does a stop that comes between two
folds (the trial never completes on the mean of some of its folds).
"""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from .trials import TrialFailed, TrialInterrupted, TrialRun


class Folds:
    def __init__(self, sweep, trial, folder: Path, argv: list[str], values: dict, cfg):
        self.sweep, self.trial, self.folder, self.values, self.cfg = sweep, trial, folder, values, cfg
        self.argv = [a for a in argv if not a.startswith("run.dir=")]
        self.k = sweep.args.folds
        self.pending, self.done = list(range(self.k)), {}
        self.errors: list[tuple[int, BaseException]] = []
        self.pruned = False
        self.lock = threading.Lock()

    def run(self) -> float:
        import optuna

        t0 = time.time()
        own = self.sweep.slots.get()
        helpers = []
        for _ in range(self.k - 1):  # any other slot that is free now takes folds too
            try:
                gpus = self.sweep.slots.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty: none is free
                break
            helpers.append(threading.Thread(target=self.runner, args=(gpus, True), daemon=True))
        for t in helpers:
            t.start()
        self.runner(own, True)
        for t in helpers:
            t.join()
        self.trial.set_user_attr("folds", [self.done.get(i, (None,))[0] for i in range(self.k)])
        self.trial.set_user_attr("seconds", round(time.time() - t0, 1))  # all folds (each run set its own)
        if self.errors:
            i, e = min(self.errors, key=lambda x: (not isinstance(x[1], TrialFailed), x[0]))  # a failure first
            raise type(e)(f"fold {i}: {e}") if isinstance(e, TrialFailed) else e
        if self.pruned:
            raise optuna.TrialPruned(f"pruned after {len(self.done)} of {self.k} folds")
        if len(self.done) < self.k:  # the sweep's stop came between two folds: resume, never a partial mean
            raise TrialInterrupted(f"interrupted: {len(self.done)} of {self.k} folds done")
        accs = [acc for acc, _ in self.done.values()]
        self.trial.set_user_attr("folds", [self.done[i][0] for i in range(self.k)])
        self.trial.set_user_attr("fold_std", statistics.stdev(accs) if len(accs) > 1 else 0.0)
        self.trial.set_user_attr("fold_epochs_needed", [self.done[i][1] for i in range(self.k)])
        self.trial.set_user_attr("epochs_needed", round(statistics.fmean(self.done[i][1] for i in range(self.k))))
        return statistics.fmean(accs)

    def fold_keys(self, i: int) -> list[str]:
        return [f"data.folds={self.k}", f"data.fold={i}"]

    def next_fold(self) -> int | None:
        with self.lock:
            if not self.pending or self.errors or self.pruned or self.sweep.stop.is_set():
                return None
            return self.pending.pop(0)

    def runner(self, gpus: list[str], give_back: bool) -> None:
        """Folds, one after another in this slot, until none is left or the trial ends."""
        try:
            while (i := self.next_fold()) is not None:
                run_dir = self.folder / f"fold-{i}"
                argv = [*self.argv, *self.fold_keys(i), f"run.dir={run_dir}"]
                run = FoldRun(self.trial, run_dir, argv, gpus, self.cfg, self.sweep.stop, self.folder)
                try:
                    acc = run.outcome(run.watch(), self.values)
                except (TrialFailed, TrialInterrupted) as e:
                    with self.lock:
                        self.errors.append((i, e))
                    return
                self.fold_done(i, acc, run.needed)
        finally:
            if give_back:
                self.sweep.slots.put(gpus)

    def fold_done(self, i: int, acc: float, needed: int) -> None:
        with self.lock:
            self.done[i] = (acc, needed)
            n = len(self.done)
            self.trial.report(statistics.fmean(a for a, _ in self.done.values()), n)
            if n < self.k and self.trial.should_prune():
                self.pruned = True


class FoldRun(TrialRun):
    """One fold's run: its epochs are not reported to Optuna (the trial reports per fold)."""

    def report(self, done: bool) -> None:
        pass
