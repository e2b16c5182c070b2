"""CIFAR ResNets (32x32 inputs).

- resnet18/34/50: He et al. with a 3x3 stride-1 stem and no max-pool, BasicBlock (expansion 1) or
  Bottleneck (expansion 4) with projection shortcuts.
- resnet9: the DAWNBench layout (Page, 2018): prep conv, three stages with max-pool, residual pairs
  after stages 1 and 3, max-pool head, scaled logits. `width` sets the base width (64 is the classic
  net; 16 is the CPU preset).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import Norm, Residual, conv_bn


class Block(nn.Module):
    """relu(body(x) + shortcut(x)); the shortcut is a strided 1x1 conv + norm where the shape changes.
    A subclass gives the body's `layers` and its `expansion` (output channels per plane)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, norm: Norm, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(*self.layers(cin, planes, cout, norm, stride))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Sequential(*conv_bn(cin, cout, norm, stride, 1)))
        self.drop_path = nn.Identity()  # model.drop_path: DropPath on the branch

    @staticmethod
    def layers(cin: int, planes: int, cout: int, norm: Norm, stride: int) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.drop_path(self.body(x)) + self.shortcut(x))


class BasicBlock(Block):
    """Two 3x3 convs (ResNet-18/34)."""

    @staticmethod
    def layers(cin: int, planes: int, cout: int, norm: Norm, stride: int) -> list[nn.Module]:
        return [*conv_bn(cin, planes, norm, stride), nn.ReLU(inplace=True), *conv_bn(planes, cout, norm)]


class Bottleneck(Block):
    """1x1 down, 3x3, 1x1 up to 4x the planes (ResNet-50)."""

    expansion = 4

    @staticmethod
    def layers(cin: int, planes: int, cout: int, norm: Norm, stride: int) -> list[nn.Module]:
        return [*conv_bn(cin, planes, norm, 1, 1), nn.ReLU(inplace=True), *conv_bn(planes, planes, norm, stride),
                nn.ReLU(inplace=True), *conv_bn(planes, cout, norm, 1, 1)]


class CifarResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int,
                 width: int = 64, norm: Norm = nn.BatchNorm2d):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, width, norm), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, n in enumerate(layers):
            planes = width * 2**i
            for j in range(n):
                stages.append(block(cin, planes, norm, stride=2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.blocks_per_stage = list(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: each block starts as identity
            if isinstance(m, Block) and m.body[-1].weight is not None:
                nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))

    def stage_modules(self) -> list[tuple[str, list[nn.Module]]]:
        """stem, stage1..4 (input to output); the head is `fc`."""
        out, start = [("stem", [self.stem])], 0
        for i, n in enumerate(self.blocks_per_stage):
            out.append((f"stage{i + 1}", list(self.stages[start:start + n])))
            start += n
        return out


class PreActBlock(nn.Module):
    """He et al. 2016's pre-activation block: norm -> ReLU -> conv, twice; the shortcut (a 1x1 conv when
    the shape changes) takes the pre-activated input."""
    expansion = 1

    def __init__(self, cin: int, planes: int, norm: Norm, stride: int = 1):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.norm2, self.conv2 = norm(planes), nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, planes, 1, stride, bias=False) if stride != 1 or cin != planes else None)
        self.drop_path = nn.Identity()  # model.drop_path: DropPath on the branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.drop_path(self.conv2(torch.relu(self.norm2(out)))) + skip


class PreActResNet(CifarResNet):
    """PreAct ResNet-18 as in "Fast is better than free" (Wong et al., 2020): a bare 3x3 conv stem,
    pre-activation blocks, and a final norm + ReLU before the pool and the head."""

    def __init__(self, layers: list[int], num_classes: int, width: int = 64, norm: Norm = nn.BatchNorm2d):
        super().__init__(PreActBlock, layers, num_classes, width, norm)  # type: ignore[arg-type]
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.final = nn.Sequential(norm(width * 2 ** (len(layers) - 1)), nn.ReLU(inplace=True))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.final(self.stages(self.stem(x)))), 1))

    def stage_modules(self) -> list[tuple[str, list[nn.Module]]]:
        """stem, stage1..4 (the last with the final norm); the head is `fc`."""
        out = super().stage_modules()
        out[-1][1].append(self.final)
        return out


def _cbr(cin: int, cout: int, norm: Norm, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [norm(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ResNet9(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, norm: Norm = nn.BatchNorm2d,
                 logit_scale: float = 0.125):
        super().__init__()
        w, n = width, norm
        self.features = nn.Sequential(
            _cbr(3, w, n),
            _cbr(w, 2 * w, n, pool=True),
            Residual(_cbr(2 * w, 2 * w, n), _cbr(2 * w, 2 * w, n)),
            _cbr(2 * w, 4 * w, n, pool=True),
            _cbr(4 * w, 8 * w, n, pool=True),
            Residual(_cbr(8 * w, 8 * w, n), _cbr(8 * w, 8 * w, n)),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(8 * w, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.logit_scale

    def stage_modules(self) -> list[tuple[str, list[nn.Module]]]:
        """prep, layer1 (with its residual pair), layer2, layer3 (with its residual pair); the head is `fc`."""
        f = self.features
        return [("prep", [f[0]]), ("layer1", [f[1], f[2]]), ("layer2", [f[3]]), ("layer3", [f[4], f[5]])]
