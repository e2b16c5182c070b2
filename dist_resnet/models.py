"""CIFAR ResNets, built by name with `build_model(name, num_classes, width)`.

- resnet18/34/50: He et al. with a 3x3 stride-1 stem and no max-pool (32x32 inputs),
  BasicBlock (expansion 1) or Bottleneck (expansion 4) with projection shortcuts.
- resnet9: the DAWNBench layout (Page, 2018): prep conv, three stages with
  max-pool, residual pairs after stages 1 and 3, max-pool head, scaled logits.
  `width` sets the base width (64 is the classic net; 16 is the CPU preset).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(*conv_bn(cin, planes, stride), nn.ReLU(inplace=True), *conv_bn(planes, cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(*conv_bn(cin, cout, stride, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            *conv_bn(cin, planes, 1, 1), nn.ReLU(inplace=True),
            *conv_bn(planes, planes, stride), nn.ReLU(inplace=True),
            *conv_bn(planes, cout, 1, 1),
        )
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(*conv_bn(cin, cout, stride, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, width), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, n in enumerate(layers):
            planes = width * 2**i
            for j in range(n):
                stages.append(block(cin, planes, stride=2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: each block starts as identity
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _cbr(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ResNet9(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, logit_scale: float = 0.125):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _cbr(3, w),
            _cbr(w, 2 * w, pool=True),
            Residual(_cbr(2 * w, 2 * w), _cbr(2 * w, 2 * w)),
            _cbr(2 * w, 4 * w, pool=True),
            _cbr(4 * w, 8 * w, pool=True),
            Residual(_cbr(8 * w, 8 * w), _cbr(8 * w, 8 * w)),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(8 * w, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.logit_scale


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet9": lambda num_classes, width: ResNet9(num_classes, width),
    "resnet18": lambda num_classes, width: CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes, width),
    "resnet34": lambda num_classes, width: CifarResNet(BasicBlock, [3, 4, 6, 3], num_classes, width),
    "resnet50": lambda num_classes, width: CifarResNet(Bottleneck, [3, 4, 6, 3], num_classes, width),
}


def build_model(name: str, num_classes: int = 10, width: int = 64) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'. Valid: {', '.join(MODELS)}")
    return MODELS[name](num_classes, width)
