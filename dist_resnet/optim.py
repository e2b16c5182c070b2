"""SGD with no weight decay on BatchNorm/bias, and per-step LR schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig, Schedule


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]  # BN weights/biases, biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor(step: int, total: int, warmup: int, schedule: Schedule) -> float:
    """Multiplier of the peak LR at `step` of `total`: linear warm-up, then decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == Schedule.onecycle:
        return max(0.0, 1.0 - frac)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
    total = steps_per_epoch * epochs
    warmup = min(total, max(1, round(cfg.warmup_epochs * steps_per_epoch)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.schedule))


class EMA:
    """Exponential moving average of a model's weights and BatchNorm buffers.

    The decay warms up as min(decay, (1 + t) / (10 + t)) over optimizer steps t, so
    short runs are not dominated by the random initial weights. Updates are one
    fused lerp over all floating-point tensors, with no host sync.
    """

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = [(e, m) for e, m in zip(self.module.state_dict().values(), model.state_dict().values())]
        self._float = [p for p in pairs if p[0].is_floating_point()]
        self._other = [p for p in pairs if not p[0].is_floating_point()]  # e.g. num_batches_tracked: copied

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        if self._float:
            torch._foreach_lerp_([e for e, _ in self._float], [m for _, m in self._float], 1.0 - d)
        for e, m in self._other:
            e.copy_(m)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
