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


class Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)
