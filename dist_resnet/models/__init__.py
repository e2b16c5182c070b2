"""Models, built by name with `build_model(name, num_classes, width, norm)`.

- `cifar`: resnet18/34/50 for 32x32 inputs, and resnet9 (DAWNBench).
- `fastnet`: the time-to-accuracy net of configs/fast.yaml.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..checkpoint import CheckpointError
from .cifar import BasicBlock, Bottleneck, CifarResNet, ResNet9
from .fastnet import FastNet
from .layers import NORMS, Norm, Residual

__all__ = ["MODELS", "build_model", "check_model", "load_weights", "Residual"]


MODELS: dict[str, Callable[[int, int, Norm], nn.Module]] = {
    "resnet9": lambda classes, width, norm: ResNet9(classes, width, norm),
    "fastnet": lambda classes, width, norm: FastNet(classes, width),
    "resnet18": lambda classes, width, norm: CifarResNet(BasicBlock, [2, 2, 2, 2], classes, width, norm),
    "resnet34": lambda classes, width, norm: CifarResNet(BasicBlock, [3, 4, 6, 3], classes, width, norm),
    "resnet50": lambda classes, width, norm: CifarResNet(Bottleneck, [3, 4, 6, 3], classes, width, norm),
}


BATCH_NORM_ONLY = {"fastnet"}  # built around scale-free BatchNorm


def check_model(name: str, norm: str) -> None:
    """ValueError unless `name` and `norm` make a model (the config checks with this too)."""
    if name not in MODELS:
        raise ValueError(f"bad value for 'model.name': '{name}'. Valid: {', '.join(MODELS)}")
    if norm not in NORMS:
        raise ValueError(f"bad value for 'model.norm': '{norm}'. Valid: {', '.join(NORMS)}")
    if name in BATCH_NORM_ONLY and norm != "batch":
        raise ValueError(f"model.name={name} is built around scale-free BatchNorm; use model.norm=batch")


def build_model(name: str, num_classes: int = 10, width: int = 64, norm: str = "batch") -> nn.Module:
    """`norm`: "batch" (BatchNorm2d) or "group" (GroupNorm, independent of the batch)."""
    check_model(name, norm)
    return MODELS[name](num_classes, width, NORMS[norm])


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """Load `state` into `model` exactly; a CheckpointError naming `source` and the first mismatches
    (another model, width or class count) instead of torch's page-long RuntimeError."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and getattr(state[k], "shape", None) != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shapes differ ({', '.join(shapes[:2])}{', ...' if len(shapes) > 2 else ''})")
    if missing:
        problems.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if problems:
        raise CheckpointError(f"{source} holds weights for another model than the one configured: "
                              f"{'; '.join(problems)}")
    model.load_state_dict(state)
