"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) on the device, per batch, as timm's `Mixup`
in its default batch mode: one draw per step, from (train.seed, step) (the global step: it fixes the epoch
too), decides whether the step mixes (`data.mix_prob`), which of the two (`data.switch_prob` picks CutMix
when both are on), the weight lam ~ Beta(alpha, alpha) and CutMix's box.

Each image is mixed with its neighbour in the global batch (positions 2k and 2k + 1 swap): every rank's
and micro-batch's rows start at an even position, so the pairs, and the run, are the same on any world
size; a resume at any step draws what the uninterrupted run drew. The loss is lam x the loss of the
image's label + (1 - lam) x that of its partner's, each with `optim.label_smoothing`: exactly the soft
target timm builds (smoothing is linear in the target). Train accuracy counts a prediction as right
when it is the dominant label (lam >= 0.5: the image's own; else its partner's).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .augment import derive_seed

MIX_STREAM = 0x313  # derive_seed key of the mixing draws


@dataclass
class Plain:
    """The targets of an unmixed batch."""

    y: torch.Tensor

    def loss(self, criterion: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return criterion(logits, self.y)

    @property
    def label(self) -> torch.Tensor:
        return self.y


@dataclass
class Mixed:
    """The targets of a mixed batch: lam of each image's label, 1 - lam of its partner's."""

    y: torch.Tensor
    partner: torch.Tensor
    lam: float

    def loss(self, criterion: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return self.lam * criterion(logits, self.y) + (1.0 - self.lam) * criterion(logits, self.partner)

    @property
    def label(self) -> torch.Tensor:
        return self.y if self.lam >= 0.5 else self.partner


def no_mix(x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, Plain]:
    """Mixing off: the batch and its labels as they are."""
    return x, Plain(y)


def pair_swap(t: torch.Tensor) -> torch.Tensor:
    """Rows 2k and 2k + 1 exchanged, in `t`'s memory format."""
    fmt = torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else None
    out = t.unflatten(0, (-1, 2)).flip(1).flatten(0, 1)
    return out.contiguous(memory_format=fmt) if fmt is not None else out


class Mixer:
    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, seed: int):
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob = mixup_alpha, cutmix_alpha, prob, switch_prob
        self.seed = seed

    def draw(self, step: int, h: int, w: int) -> tuple[float, tuple[int, int, int, int] | None] | None:
        """The step's mix: None (unmixed), or (lam, CutMix's box (top, bottom, left, right) or None for Mixup)."""
        rng = np.random.default_rng(derive_seed(self.seed, MIX_STREAM, step))
        if rng.random() >= self.prob:
            return None
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        lam = float(rng.beta(*(2 * [self.cutmix_alpha if cutmix else self.mixup_alpha])))
        if not cutmix:
            return lam, None
        ratio = np.sqrt(1.0 - lam)  # timm's rand_bbox: a box of (1 - lam) of the area around a random centre
        ch, cw = int(h * ratio), int(w * ratio)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        top, bottom = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        left, right = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        box = (int(top), int(bottom), int(left), int(right))
        return 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / (h * w), box  # lam of the box actually cut

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, Plain | Mixed]:
        drawn = self.draw(step, x.shape[-2], x.shape[-1])
        if drawn is None:
            return x, Plain(y)
        lam, box = drawn
        other = pair_swap(x)
        if box is None:
            mixed = x.lerp(other, 1.0 - lam)
        else:
            top, bottom, left, right = box
            mixed = x.clone()
            mixed[..., top:bottom, left:right] = other[..., top:bottom, left:right]
        return mixed, Mixed(y, pair_swap(y), lam)
