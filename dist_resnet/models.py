"""CIFAR ResNets, built by name with `build_model(name, num_classes, width)`.

- resnet18/34/50: He et al. with a 3x3 stride-1 stem and no max-pool (32x32 inputs),
  BasicBlock (expansion 1) or Bottleneck (expansion 4) with projection shortcuts.
- resnet9: the DAWNBench layout (Page, 2018): prep conv, three stages with
  max-pool, residual pairs after stages 1 and 3, max-pool head, scaled logits.
  `width` sets the base width (64 is the classic net; 16 is the CPU preset).
- fastnet: a narrow residual net for time-to-accuracy (configs/fast.yaml): a frozen
  2x2 patch-whitening stem fitted to the training images (`init_from_data`), then
  three conv-pool-BN-GELU stages of widths w, 4w, 4w, each with a residual 3x3 conv,
  identity-initialised convs, BN without scale. About 0.71 GFLOP per training image
  (ResNet-18: 3.33).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


Norm = Callable[[int], nn.Module]  # channels -> normalisation layer


def group_norm(c: int) -> nn.Module:
    return nn.GroupNorm(8 if c % 8 == 0 else 1, c)


NORMS: dict[str, Norm] = {"batch": nn.BatchNorm2d, "group": group_norm}


def conv_bn(cin: int, cout: int, norm: Norm, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), norm(cout)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, norm: Norm, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(*conv_bn(cin, planes, norm, stride), nn.ReLU(inplace=True),
                                  *conv_bn(planes, cout, norm))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Sequential(*conv_bn(cin, cout, norm, stride, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, norm: Norm, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            *conv_bn(cin, planes, norm, 1, 1), nn.ReLU(inplace=True),
            *conv_bn(planes, planes, norm, stride), nn.ReLU(inplace=True),
            *conv_bn(planes, cout, norm, 1, 1),
        )
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Sequential(*conv_bn(cin, cout, norm, stride, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


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
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: each block starts as identity
            if isinstance(m, (BasicBlock, Bottleneck)) and m.body[-1].weight is not None:
                nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


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


class WhiteningStem(nn.Conv2d):
    """A 2x2 conv whose frozen filters whiten image patches: +/- the eigenvectors of the patch
    covariance scaled by 1/sqrt(eigenvalue + eps), fitted once on training images. The bias trains."""

    def __init__(self, cin: int = 3, kernel: int = 2, eps: float = 5e-4):
        super().__init__(cin, 2 * cin * kernel * kernel, kernel, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        c, k = self.in_channels, self.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
        cov = patches.T @ patches / len(patches)  # second moment of normalised (~zero-mean) patches
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        order = eigenvalues.argsort(descending=True)
        filters = (eigenvectors[:, order] / torch.sqrt(eigenvalues[order] + self.eps)).T.reshape(-1, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))


def _scale_free_bn(c: int, momentum: float = 0.4) -> nn.BatchNorm2d:
    """BatchNorm with a fixed unit scale (only the bias trains) and fast running statistics."""
    bn = nn.BatchNorm2d(c, eps=1e-12, momentum=momentum)
    bn.weight.requires_grad_(False)
    return bn


def _identity_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
    nn.init.dirac_(conv.weight[:min(cin, cout)])  # the first min(cin, cout) filters pass their channel through
    return conv


class FastStage(nn.Module):
    """conv -> max-pool -> BN -> GELU, then a residual conv -> BN -> GELU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Sequential(_identity_conv(cin, cout), nn.MaxPool2d(2), _scale_free_bn(cout), nn.GELU())
        self.residual = Residual(_identity_conv(cout, cout), _scale_free_bn(cout), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(self.down(x))


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, logit_scale: float = 1 / 9):
        super().__init__()
        self.stem = WhiteningStem()
        widths = [self.stem.out_channels, width, 4 * width, 4 * width]
        self.stages = nn.Sequential(*[FastStage(a, b) for a, b in zip(widths, widths[1:])])
        self.pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    def init_from_data(self, images: torch.Tensor) -> None:
        """Fit the whitening stem to normalised training images (N, 3, 32, 32)."""
        self.stem.fit(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.gelu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale


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
    from .checkpoint import CheckpointError

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
