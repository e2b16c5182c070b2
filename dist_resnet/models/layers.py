"""Building blocks shared by the model families: normalisation choices, conv + norm, residual."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


Norm = Callable[[int], nn.Module]  # channels -> normalisation layer


def group_norm(c: int) -> nn.Module:
    return nn.GroupNorm(8 if c % 8 == 0 else 1, c)


NORMS: dict[str, Norm] = {"batch": nn.BatchNorm2d, "group": group_norm}


def conv_bn(cin: int, cout: int, norm: Norm, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), norm(cout)]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016; timm's DropPath): in training, each sample's residual branch is
    dropped with probability `rate` and the kept ones scaled by 1 / (1 - rate); the identity in evaluation,
    so an exported graph has no trace of it. No parameters: checkpoints are the same with or without it."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class Residual(nn.Module):
    """x + body(x); `drop_path` (model.drop_path) acts on the branch."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.body(x))
