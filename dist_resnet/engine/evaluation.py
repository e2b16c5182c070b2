"""Evaluation: logits with test-time augmentation, the loss/accuracy/confusion of a whole split counted
once across ranks, when evaluations are due, the model selection (best.pt), robust evaluation, and
the collapse check of adversarial training.

Every evaluation first gives each rank rank 0's BatchNorm statistics (`broadcast_buffers`): DDP syncs
the weights, but each rank updates its own running statistics, and what is evaluated must be what is
checkpointed.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import RobustEval
from ..config import TTA
from ..data.loader import TestData
from ..distributed import all_reduce_sum, broadcast_buffers
from ..faults import fault_point
from ..precision import Amp
from .monitor import Monitor


def predict(model: nn.Module, x: torch.Tensor, tta: TTA = TTA.none) -> torch.Tensor:
    """fp32 logits of `x`, averaged over the test-time augmented views."""
    def mirrored(v: torch.Tensor) -> torch.Tensor:
        # cloned: a model compiled with CUDA graphs (compile_mode=reduce_overhead) returns the same output
        # buffer at every call, and an fp32 output's .float() is that buffer, which the second call overwrites
        first = model(v).float().clone()
        return 0.5 * (first + model(v.flip(3)).float())

    if tta == TTA.none:
        return model(x).float()
    logits = mirrored(x)
    if tta == TTA.flip_translate:  # the image shifted 1 px up-left and down-right, borders reflected
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        logits = 0.5 * logits + 0.25 * sum(mirrored(v.contiguous(memory_format=fmt)) for v in shifted)
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, data: TestData, amp: Amp, tta: TTA = TTA.none, prefix: str = "test",
             attack: RobustEval | None = None) -> dict:
    """Loss, accuracy and the confusion matrix (rows: true class, columns: predicted) over the whole
    split, each image counted once across ranks. Everything stays on the device until the end.
    With `attack`, also the accuracy under it (`<prefix>_robust_acc`, of the model without TTA)."""
    was_training = model.training
    model.eval()
    c, device = data.num_classes, data.device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct, count, correct under attack
    confusion = torch.zeros(c * c, dtype=torch.float64, device=device)
    with amp.autocast():
        for i, (x, y) in enumerate(data):
            fault_point("eval")
            logits = predict(model, x, tta)
            pred = logits.argmax(1)
            totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
            totals[1] += (pred == y).sum()
            totals[2] += y.numel()
            confusion.scatter_add_(0, y * c + pred, torch.ones_like(y, dtype=torch.float64))  # no sync
            if attack is not None:
                totals[3] += attack(model, x, y, i).sum()
    model.train(was_training)
    loss_sum, correct, count, robust = all_reduce_sum(totals).tolist()
    if int(count) != data.count:  # each image exactly once across ranks
        raise RuntimeError(f"evaluated {int(count)} images, expected {data.count}")
    matrix = all_reduce_sum(confusion).view(c, c).long().tolist()
    return {f"{prefix}_loss": loss_sum / count, f"{prefix}_acc": correct / count, f"{prefix}_count": int(count),
            **({f"{prefix}_robust_acc": robust / count} if attack is not None else {}), "confusion": matrix}


def per_class(confusion: list[list[int]], classes: list[str]) -> dict:
    """Per-class accuracy (recall) from a confusion matrix."""
    return {name: (row[i] / sum(row) if sum(row) else None) for i, (name, row) in enumerate(zip(classes, confusion))}


def with_rank0_buffers(modules: list[nn.Module]) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics) before an evaluation."""
    for module in modules:
        broadcast_buffers(module)


class Evaluator:
    """The evaluations after an epoch: the raw model (its test split under `robust` too) and any
    averaged copy (EMA: `ema_*` keys), on the validation split and/or the test set as they are due.
    Its `monitor` selects the model (`best.pt`) and stops the run early (dist_resnet.engine.monitor); an
    early stop evaluates the test set at once, as the run's end would."""

    def __init__(self, forward: nn.Module, buffers: list[nn.Module], averages: list[tuple[str, nn.Module]],
                 val: TestData | None, test: TestData, amp: Amp, tta: TTA, robust: RobustEval | None,
                 check: "RobustnessCheck", epochs: int, every: int, test_every: int, robust_every: int = 1,
                 monitor: Monitor | None = None):
        self.forward, self.buffers, self.averages = forward, buffers, averages
        self.val, self.test, self.amp, self.tta, self.robust, self.check = val, test, amp, tta, robust, check
        self.epochs, self.every, self.test_every, self.robust_every = epochs, every, test_every, robust_every
        self.monitor = monitor or Monitor("val_acc" if val is not None else "test_acc")
        self.confusion: list[list[int]] | None = None  # of the last test evaluation: per_class.json at the end

    def due(self, epoch: int) -> tuple[bool, bool]:
        """(validation, test) after `epoch` epochs. Without a validation split the test set is evaluated
        every `every` epochs; with one, validation is, and test at the end of the run and every
        `test_every` epochs."""
        last, due = epoch == self.epochs, epoch % self.every == 0
        if self.val is None:
            return False, last or due
        return last or due, last or bool(self.test_every and epoch % self.test_every == 0)

    def run(self, val: bool = False, test: bool = True, robust: bool = True) -> dict:
        """The due splits' loss and accuracy (the test set's under attack too, with `robust`), the
        averaged copies' as `ema_*`."""
        with_rank0_buffers(self.buffers)
        result = {}
        for name, data, attack in (("val", self.val if val else None, None),
                                   ("test", self.test if test else None, self.robust if robust else None)):
            if data is None:
                continue
            r = evaluate(self.forward, data, self.amp, self.tta, prefix=name, attack=attack)
            confusion = r.pop("confusion")
            self.confusion = confusion if name == "test" else self.confusion
            result.update(r)
            for prefix, net in self.averages:
                a = evaluate(net, data, self.amp, self.tta, prefix=name)
                result.update({f"{prefix}_{name}_loss": a[f"{name}_loss"], f"{prefix}_{name}_acc": a[f"{name}_acc"]})
        return result

    def after_epoch(self, record: dict, epoch: int) -> list[str]:
        """Evaluate what is due into `record` (with its time); the links the new checkpoint gets."""
        val, test = self.due(epoch)
        robust = epoch == self.epochs or bool(self.robust_every and epoch % self.robust_every == 0)
        t0 = time.perf_counter()
        if val or test:
            record.update(self.run(val, test, robust))
        improved = self.monitor.update(record, epoch)
        if self.monitor.stopped and "test_acc" not in record:  # the run ends here: its final test evaluation
            record.update(self.run(False, True, True))
        if "test_acc" in record or "val_acc" in record:
            record["eval_time_s"] = time.perf_counter() - t0  # run() ends in a host sync
        links = self.check.after_epoch(record, epoch)
        return links + (["best.pt"] if improved else [])

    def summary(self) -> dict:
        return {"robust_eval": self.robust.describe() if self.robust is not None else None, **self.check.summary(),
                **self.monitor.summary()}

    def state_dict(self) -> dict:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict, source: str = "") -> None:
        self.monitor.load_state_dict(state, source)


class RobustnessCheck:
    """Adversarial training: PGD on fixed train images (never test) after every epoch, as "Fast is better
    than free" does to catch catastrophic overfitting, when FGSM training collapses and robust accuracy
    falls to about 0 within an epoch. The most robust epoch gets `best_robust.pt`."""

    def __init__(self, forward: nn.Module, model: nn.Module, data: TestData | None, attack: RobustEval | None,
                 amp: Amp, say):
        self.forward, self.model, self.data, self.attack, self.amp, self.say = forward, model, data, attack, amp, say
        self.best, self.collapses = -1.0, []

    def after_epoch(self, record: dict, epoch: int) -> list[str]:
        with_rank0_buffers([self.model])  # every rank attacks with rank 0's BatchNorm statistics
        r = evaluate(self.forward, self.data, self.amp, prefix="check", attack=self.attack)
        record.update({"check_acc": r["check_acc"], "check_robust_acc": r["check_robust_acc"]})
        acc, best = r["check_robust_acc"], self.best
        if acc < best - 0.2:
            self.collapses.append({"epoch": epoch, "check_robust_acc": acc, "best": best})
            self.say(f"warning: catastrophic overfitting in epoch {epoch}: PGD accuracy on the "
                     f"{self.data.count} check images fell from {best:.3f} to {acc:.3f}. best_robust.pt keeps "
                     "the most robust epoch; lower adv.alpha, or use train.adversarial=pgd")
        self.best = max(best, acc)
        return ["best_robust.pt"] if acc > best else []

    def summary(self) -> dict:
        return {"best_check_robust_acc": self.best, "collapses": self.collapses}

    def state_dict(self) -> dict:
        return {"best_robust": self.best, "collapses": self.collapses}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        self.best, self.collapses = state.get("best_robust", -1.0), state.get("collapses", [])


class NoRobustnessCheck(RobustnessCheck):
    """Standard training: no collapse check (its state is kept, so a checkpoint's keys stay the same)."""

    def __init__(self):
        self.best, self.collapses = -1.0, []

    def after_epoch(self, record: dict, epoch: int) -> list[str]:
        return []

    def summary(self) -> dict:
        return {"best_check_robust_acc": None, "collapses": self.collapses}
