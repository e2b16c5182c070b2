"""One optimizer step, with every choice the config makes resolved when it is built:

- the loss scale: none (bf16, fp32), a fixed one (`train.loss_scale`, no host sync) or torch's dynamic
  GradScaler (fp16: skips a step whose gradients overflowed, one host sync per step);
- the adversary (`train.adversarial`), or the identity;
- Mixup/CutMix (`data.mixup_alpha`, `data.cutmix_alpha`: dist_resnet.data.mix), or none; with it the
  targets own the loss and the label train accuracy counts;
- the reseeding of torch's generator for dropout and drop-path (`model.dropout`, `model.drop_path`), or none;
- the teacher's soft loss (`distill.teacher`: dist_resnet.engine.distill), or none;
- the after-step hooks, in order: EMA, then lookahead. They, and the LR schedule, count applied steps
  only: a step the loss scale skips advances none of them.

The step itself has no branch on the config; it returns [loss sum, correct, count] on the device.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from ..data.augment import derive_seed
from ..data.mix import no_mix
from ..optim import EMA, Lookahead
from ..precision import Amp
from .distill import no_distill


class NoLossScale:
    """bf16 and fp32: the loss as it is, the optimizer's own step."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the step; whether it was applied."""
        optimizer.step()
        return True

    def state_dict(self) -> dict:
        return {"scaler": {}}  # what a disabled GradScaler saves

    def load_state_dict(self, state: dict, source: str = "") -> None:
        pass


class FixedLossScale(NoLossScale):
    """fp16 with `train.loss_scale=S`: the loss times S, the gradients unscaled in place (no host sync);
    an overflow shows up as a non-finite loss at the next check."""

    def __init__(self, scale: float):
        self.factor = scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.factor

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.factor)
        optimizer.step()
        return True


class DynamicLossScale(NoLossScale):
    """fp16: torch's GradScaler, which skips a step whose gradients hold an inf or NaN."""

    def __init__(self, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        self.scaler.unscale_(optimizer)
        # the flags unscale_ left, read once: the one host sync per step fp16 costs. GradScaler.step would read
        # them a second time (a second sync) to decide the same thing, so the optimizer is stepped here;
        # update() takes the flags from unscale_ and changes the scale on the device
        skipped = bool(sum(v.item() for v in self.scaler._found_inf_per_device(optimizer).values()))
        if not skipped:
            optimizer.step()
        self.scaler.update()
        return not skipped

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        if state["scaler"]:  # a bf16 or fp32 start (train.precision=auto resumed where only fp16 runs) saved none:
            self.scaler.load_state_dict(state["scaler"])  # the scale starts afresh ("source state dict is empty")


def no_attack(forward: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, micro: int) -> torch.Tensor:
    """Standard training: the batch as it is (the adversary's place in the step)."""
    return x


def unseeded(step: int, micro: int) -> None:
    """A model without random layers: nothing to seed."""


class StepSeed:
    """model.dropout / model.drop_path draw their masks from torch's generator, reseeded before each
    micro-batch from (train.seed, rank, step, micro-batch): the same seed gives the same masks, and a
    resumed run draws what the uninterrupted one drew."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self, step: int, micro: int) -> None:
        torch.manual_seed(derive_seed(self.seed, 0xD209, self.rank, step, micro))


class EMAHook:
    """train.ema: after every applied step the average moves toward the weights (dist_resnet.optim.EMA)."""

    def __init__(self, ema: EMA, say: Callable):
        self.ema, self.say = ema, say

    def __call__(self, applied: int, step: int) -> None:
        self.ema.update(applied - 1)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        if state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        else:  # switched on at this resume: average from the trained weights, not the random initial ones
            self.ema.reset()
            self.say("train.ema switched on at this resume: the average starts from the restored weights")


class LookaheadHook:
    """optim.lookahead_every: every k applied steps the weights move to the slow average; the run's last
    step ends on it (dist_resnet.optim.Lookahead)."""

    def __init__(self, lookahead: Lookahead, total_steps: int):
        self.lookahead, self.total_steps = lookahead, total_steps

    def __call__(self, applied: int, step: int) -> None:
        self.lookahead.step(applied, final=step + 1 == self.total_steps)

    def state_dict(self) -> dict:
        return {"lookahead": self.lookahead.state_dict()}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        self.lookahead.load_state_dict(state["lookahead"])  # a change of lookahead is refused at resume


def unmarked(name: str):
    """The step's parts unlabelled: a training run (bench profile labels them: torch.profiler.record_function)."""
    return _NULL


_NULL = nullcontext()


class Step:
    """`stats = step(micro_batches, step)`: one optimizer step over this rank's micro-batches (the gradient
    all-reduce only on the last one), then the schedule and the hooks. `step` is the global step index.
    `mark(name)` labels its parts (forward, backward, optimizer) for a profiler."""

    mark = staticmethod(unmarked)

    def __init__(self, ddp: nn.Module, forward: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, loss_scale: NoLossScale, attack: Callable, hooks: list[Callable], amp: Amp,
                 distributed: bool, seed: Callable[[int, int], None] = unseeded, mix: Callable = no_mix,
                 distill: Callable = no_distill):
        self.ddp, self.forward, self.criterion = ddp, forward, criterion
        self.optimizer, self.scheduler, self.loss_scale = optimizer, scheduler, loss_scale
        self.attack, self.hooks, self.amp, self.seed, self.mix = attack, hooks, amp, seed, mix
        self.distill = distill
        self.no_sync = ddp.no_sync if distributed else nullcontext  # all-reduce once, on the last micro-batch

    def __call__(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.forward_backward(micro_batches, step)
        self.apply(step)
        return out

    def forward_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> torch.Tensor:
        """Accumulate the step's gradients; [loss sum, correct, count] on the device."""
        out = torch.zeros(3, dtype=torch.float64, device=self.amp.device)
        n = len(micro_batches)
        for i, (x, y) in enumerate(micro_batches[:-1]):
            with self.no_sync():
                self.micro_batch(x, y, step, i, n, out)
        self.micro_batch(*micro_batches[-1], step, n - 1, n, out)
        return out

    def micro_batch(self, x: torch.Tensor, y: torch.Tensor, step: int, i: int, n: int, out: torch.Tensor) -> None:
        self.seed(step, i)
        with self.mark("forward"), self.amp.autocast():
            x = self.attack(self.forward, x, y, step, i)  # its gradients are the input's only: no all-reduce
            x, target = self.mix(x, y, step)
            logits = self.ddp(x)
            loss = target.loss(self.criterion, logits)
            with self.mark("teacher"):
                loss = self.distill(x, logits, loss)  # distill.teacher's soft loss, or the loss as it is
        with self.mark("backward"):
            self.loss_scale.scale(loss / n).backward()
        k = y.numel()  # a host int: no host-to-device copy in the hot loop
        out[0] += loss.detach().double() * k
        out[1] += (logits.detach().argmax(1) == target.label).sum()  # the dominant label of a mixed image
        out[2] += k

    def apply(self, step: int) -> None:
        """The optimizer step, then the LR schedule and the hooks, which count applied steps only."""
        with self.mark("optimizer"):
            if not self.loss_scale.step(self.optimizer):
                return
            self.scheduler.step()
            applied = self.scheduler.last_epoch  # optimizer steps applied so far
            for hook in self.hooks:
                hook(applied, step)
