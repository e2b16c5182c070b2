"""The monitored value: model selection (`best.pt`) and early stopping.

One value is watched after each evaluation: `train.early_stop_monitor` (val_acc or val_loss) with a
validation split, test_acc without one (selection only: early stopping needs a validation split and never
looks at the test set). `best.pt` follows every improvement of it. Early stopping, as Lightning's
EarlyStopping: an evaluation that does not beat the reference by `train.early_stop_min_delta` counts
against the patience; one that does becomes the new reference; after `train.early_stop_patience` such
evaluations in a row the run stops. The values come from all-reduced sums, so every rank stops after the
same evaluation. The counter is checkpointed (key `monitor`): a resumed run stops where the uninterrupted
one would.
"""
from __future__ import annotations

import math

from ..config import Config

MINIMISED = ("val_loss", "test_loss")


class Monitor:
    def __init__(self, key: str, patience: int = 0, min_delta: float = 0.0):
        self.key, self.patience, self.min_delta = key, patience, min_delta
        self.sign = -1.0 if key in MINIMISED else 1.0  # compare sign * value: larger is better
        self.best: float | None = None  # the best value seen (best.pt)
        self.best_epoch: int | None = None
        self.reference: float | None = None  # the last value that improved by min_delta
        self.waited = 0  # evaluations since then
        self.stop_epoch: int | None = None

    @classmethod
    def from_config(cls, cfg: Config, has_val: bool) -> "Monitor":
        t = cfg.train
        if not has_val:
            return cls("test_acc")
        return cls(t.early_stop_monitor.value, t.early_stop_patience, t.early_stop_min_delta)

    @property
    def stopped(self) -> bool:
        return self.stop_epoch is not None

    def update(self, record: dict, epoch: int) -> bool:
        """Take this epoch's evaluation (none if the value was not evaluated); whether it is the best yet."""
        value = record.get(self.key)
        if value is None:
            return False
        v = self.sign * value
        improved = self.best is None or v > self.sign * self.best
        if improved:
            self.best, self.best_epoch = value, epoch
        if self.reference is None or v > self.sign * self.reference + self.min_delta:
            self.reference, self.waited = value, 0
        else:
            self.waited += 1
        if self.patience and self.waited >= self.patience:
            self.stop_epoch = epoch
        return improved

    def explain(self) -> str:
        return (f"stopped early after epoch {self.stop_epoch}: {self.key} has not improved by "
                f"train.early_stop_min_delta={self.min_delta:g} for {self.waited} evaluations "
                f"(train.early_stop_patience={self.patience}); best {self.best:.4f} at epoch {self.best_epoch} "
                "(best.pt)")

    def summary(self) -> dict:
        return {"monitor": self.key, "monitor_best": self.best, "monitor_best_epoch": self.best_epoch,
                "stopped_early": self.stopped, "stop_epoch": self.stop_epoch}

    def state_dict(self) -> dict:
        # best_acc: the key every checkpoint has held since format 1 (the monitored best; -1 before any)
        return {"best_acc": -1.0 if self.best is None else self.best,
                "monitor": {"key": self.key, "best": self.best, "best_epoch": self.best_epoch,
                            "reference": self.reference, "waited": self.waited, "stop_epoch": self.stop_epoch}}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        m = state.get("monitor")
        if m is None or m["key"] != self.key:  # an older checkpoint: its best accuracy, no early stopping yet
            best = state.get("best_acc", -1.0)
            self.best = None if best is None or best < 0 or math.isinf(best) else best
            self.reference = self.best
            return
        self.best, self.best_epoch, self.reference = m["best"], m["best_epoch"], m["reference"]
        self.waited, self.stop_epoch = m["waited"], m["stop_epoch"]
