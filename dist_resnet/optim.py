"""SGD (or Muon for the filters) with no weight decay on BatchNorm/bias and per-layer LRs, per-step LR schedules,
EMA and lookahead."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig, OptimizerName, Schedule
from .models import parameter_depths
from .muon import MuonSGD, is_filter


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def build_optimizer(model: nn.Module, cfg: OptimConfig, group=None) -> torch.optim.Optimizer:
    """SGD over the trainable parameters, in groups of one LR multiplier and one weight decay (`param_groups`);
    with `optim.name=muon`, Muon for the conv filters instead (dist_resnet.muon.MuonSGD: `group` is the
    process group whose ranks share its Newton-Schulz work)."""
    muon = cfg.name == OptimizerName.muon
    groups = param_groups(model, cfg, skip=is_filter if muon else lambda p: False)
    if not muon:
        if not groups:
            raise ValueError("no parameter trains: model.freeze leaves nothing to train")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    filters = [p for p in model.parameters() if is_filter(p)]
    if not filters:
        raise ValueError("optim.name=muon trains conv filters, and model.freeze leaves none to train: use optim.name=sgd")
    groups.append({"params": filters, "lr": cfg.muon_lr, "muon": True})  # no weight decay: Muon fixes their norm
    return MuonSGD(groups, cfg.momentum, cfg.nesterov, cfg.muon_momentum, cfg.muon_ns_steps, group)


def param_groups(model: nn.Module, cfg: OptimConfig, skip) -> list[dict]:
    """The trainable parameters but those `skip` names, grouped by LR multiplier and weight decay:

    - weight decay on weights (ndim > 1); on normalisation parameters only with `norm_bias_decay`, then as
      torch weight_decay = wd / norm_bias_lr_scale, so they shrink per step as much as the weights (airbench);
      on other biases only with `bias_decay`; with `decay_by_lr`, every group's decay is divided by its LR
      multiplier, so every group shrinks as much per step (airbench94_muon);
    - `norm_bias_lr_scale` for the trainable parameters of normalisation layers;
    - `head_lr_scale` for the head; `layer_decay`: stage d of the model's S stages (input first) gets
      layer_decay ** (S - d), the head 1 (models.parameter_depths)."""
    depth, n_stages = parameter_depths(model)
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    groups: dict[tuple[int, float], dict] = {}
    for p in model.parameters():
        if not p.requires_grad or skip(p):
            continue
        d = depth.get(id(p), n_stages)  # the head, and anything outside the stages, counts as the top
        scaled = cfg.norm_bias_lr_scale != 1.0 and id(p) in norm_params
        kind = 2 if scaled else (0 if p.ndim > 1 else 1)  # decayed weights, other parameters, scaled norms
        mult = cfg.layer_decay ** (n_stages - d) * (cfg.head_lr_scale if d == n_stages else 1.0)
        mult *= cfg.norm_bias_lr_scale if scaled else 1.0
        if kind == 0:
            decay = cfg.weight_decay
        elif id(p) in norm_params:  # scaled: the same shrink per step as the weights (airbench)
            decay = cfg.weight_decay / (cfg.norm_bias_lr_scale if scaled else 1.0) if cfg.norm_bias_decay else 0.0
        else:
            decay = cfg.weight_decay if cfg.bias_decay else 0.0
        if cfg.decay_by_lr and decay:
            decay = cfg.weight_decay / mult
        group = groups.setdefault((kind, mult, decay), {"params": [], "lr": cfg.lr * mult, "weight_decay": decay})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_factor(step: int, total: int, warmup: int, schedule: Schedule, start: float = 0.0, end: float = 0.0) -> float:
    """Multiplier of the peak LR at `step` of `total`: linear warm-up from `start` to 1, then decay to `end`."""
    if step < warmup:
        return start + (1.0 - start) * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - frac if schedule == Schedule.onecycle else 0.5 * (1.0 + math.cos(math.pi * frac))
    return end + (1.0 - end) * shape


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int,
                    total: int | None = None):
    """The per-step LR over `total` steps (default: all epochs; train.max_steps ends the run earlier)."""
    total = total or steps_per_epoch * epochs
    warmup = min(total, max(1, round(cfg.warmup_epochs * steps_per_epoch)))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.schedule, cfg.lr_start, cfg.lr_end))


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
        self.lerp(min(self.decay, (1 + step) / (10 + step)))

    def lerp(self, d: float) -> None:
        """average <- d * average + (1 - d) * model."""
        if self._float:
            torch._foreach_lerp_([e for e, _ in self._float], [m for _, m in self._float], 1.0 - d)
        if self._other:
            torch._foreach_copy_([e for e, _ in self._other], [m for _, m in self._other])

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the model's current weights (an EMA switched on at a resume)."""
        self.lerp(0.0)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class Lookahead(EMA):
    """Lookahead (Zhang et al., 2019) on a slow moving average, as in hlb-CIFAR10/airbench.

    Every `every` optimizer steps the slow copy moves toward the model with decay
    d(t) = decay**every * (t / total)**3 (so early on it just follows the model), then the
    model is reset to it. After the last step (`final`) the model becomes the slow copy.
    """

    def __init__(self, model: nn.Module, decay: float, every: int, total_steps: int):
        super().__init__(model, decay)
        self.every, self.total = every, total_steps

    @torch.no_grad()
    def step(self, t: int, final: bool = False) -> None:
        """Call after optimizer step `t` (1-based); `final` after the run's last step."""
        if t % self.every and not final:
            return
        if t % self.every == 0:
            self.lerp(self.decay ** self.every * min(1.0, t / self.total) ** 3)
        if self._float:
            torch._foreach_copy_([m for _, m in self._float], [e for e, _ in self._float])
