"""fastnet: a narrow net for time-to-accuracy (configs/fast.yaml), after airbench94 (Jordan, 2024).

A frozen 2x2 patch-whitening stem fitted to the training images (`init_from_data`), then three
stages of widths w, 4w, 4w: conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU, airbench's shape (with
`residual`, a residual around the second conv, this net's earlier shape), identity-initialised convs, BN
without scale. About 0.71 GFLOP per training image (ResNet-18: 3.33).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Residual


class WhiteningStem(nn.Conv2d):
    """A 2x2 conv whose frozen filters whiten image patches: +/- the eigenvectors of the patch
    covariance scaled by 1/sqrt(eigenvalue + eps), fitted once on training images. The bias trains;
    freezing it later is the optimizer's business (dist_resnet.engine.warmup.WhitenBias), so the forward
    never changes: DDP sees its gradient at every step and a compiled net never recompiles. The conv runs
    in fp32 outside autocast: whitening amplifies low-variance directions up to ~45x."""

    def __init__(self, cin: int = 3, kernel: int = 2, eps: float = 5e-4):
        super().__init__(cin, 2 * cin * kernel * kernel, kernel, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.float(), self.weight.float(), self.bias.float())

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
    """conv -> max-pool -> BN -> GELU, then conv -> BN -> GELU (with `residual`: x + that)."""

    def __init__(self, cin: int, cout: int, residual: bool = False):
        super().__init__()
        self.down = nn.Sequential(_identity_conv(cin, cout), nn.MaxPool2d(2), _scale_free_bn(cout), nn.GELU())
        second = (_identity_conv(cout, cout), _scale_free_bn(cout), nn.GELU())
        if residual:  # named as before the option existed, so older checkpoints load
            self.residual = Residual(*second)
        else:
            self.second = nn.Sequential(*second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return self.residual(x) if hasattr(self, "residual") else self.second(x)


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, logit_scale: float = 1 / 9, residual: bool = False):
        super().__init__()
        self.stem = WhiteningStem()
        widths = [self.stem.out_channels, width, 4 * width, 4 * width]
        self.stages = nn.Sequential(*[FastStage(a, b, residual) for a, b in zip(widths, widths[1:])])
        self.pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    def init_from_data(self, images: torch.Tensor) -> None:
        """Fit the whitening stem to normalised training images (N, 3, 32, 32)."""
        self.stem.fit(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.gelu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale

    def stage_modules(self) -> list[tuple[str, list[nn.Module]]]:
        """stem (whitening), stage1..3; the head is `fc`."""
        return [("stem", [self.stem])] + [(f"stage{i + 1}", [s]) for i, s in enumerate(self.stages)]
