"""Batch augmentation on the training device, seeded per step.

FFCV's own flip/translate/cutout draw from numba's unseeded per-thread RNGs, so
two runs with the same seed would differ. Here every random choice comes from a
generator seeded by (seed, epoch, step); the draws are made per global batch and each rank
takes its rows, so the same seed gives the same run on any world size,
and a resume at any step sees the same augmentations as an uninterrupted run.
The same code serves the FFCV pipeline and the device-resident one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys; different keys give independent streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Normalize:
    """uint8-valued images (any float dtype) -> (x / 255 - mean) / std."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, dtype: torch.dtype):
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(device, dtype)
        self.shift = (-torch.tensor(mean) / std_t).view(1, 3, 1, 1).to(device, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class Augment:
    """Random flip, translate (padding with zeros = the mean after normalisation, or reflected) and cutout."""

    def __init__(self, flip: bool, translate: int, cutout: int, device: torch.device, pad: str = "zeros"):
        self.flip, self.translate, self.cutout, self.pad = flip, translate, cutout, pad
        self.generator = torch.Generator(device=device)
        self.device = device

    @property
    def enabled(self) -> bool:
        return self.flip or self.translate > 0 or self.cutout > 0

    def __call__(self, x: torch.Tensor, seed: int, offset: int = 0, total: int | None = None,
                 flips: torch.Tensor | None = None) -> torch.Tensor:
        """Augment `x`, the rows [offset, offset + len(x)) of a global batch of `total` samples.

        The random draws are made for the whole global batch and sliced, so a sample gets the
        same augmentation whichever rank or micro-batch it lands in: runs agree across world sizes.
        `flips` (bool, one per row) replaces the random flip draw (see AlternateFlips).
        """
        if not self.enabled:
            return x
        g = self.generator.manual_seed(seed)
        n, c, h, w = x.shape
        total = n if total is None else total
        rows_ = slice(offset, offset + n)

        def draw(high: int, shape: tuple) -> torch.Tensor:
            return torch.randint(0, high, (total, *shape), device=self.device, generator=g)[rows_]

        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 else torch.contiguous_format
        if self.flip:
            flip = draw(2, (1, 1, 1)).bool() if flips is None else flips.view(n, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        if self.translate > 0:
            p = self.translate
            padded = F.pad(x, (p, p, p, p), mode="reflect" if self.pad == "reflect" else "constant")
            dy, dx = draw(2 * p + 1, (1,)), draw(2 * p + 1, (1,))
            rows = (dy + torch.arange(h, device=self.device)).view(n, 1, h, 1)
            cols = (dx + torch.arange(w, device=self.device)).view(n, 1, 1, w)
            ni = torch.arange(n, device=self.device).view(n, 1, 1, 1)
            ci = torch.arange(c, device=self.device).view(1, c, 1, 1)
            x = padded[ni, ci, rows, cols]
        if self.cutout > 0:
            half = self.cutout // 2
            cy, cx = draw(h, (1, 1, 1)), draw(w, (1, 1, 1))
            r = torch.arange(h, device=self.device).view(1, 1, h, 1)
            s = torch.arange(w, device=self.device).view(1, 1, 1, w)
            top, left = cy - half, cx - half  # a cutout x cutout square around (cy, cx), clipped at the border
            hole = (r >= top) & (r < top + self.cutout) & (s >= left) & (s < left + self.cutout)
            x = x.masked_fill(hole, 0)
        return x.contiguous(memory_format=fmt)


class AlternateFlips:
    """Derandomised flip (airbench): sample i is flipped in epoch e iff base_i XOR (e mod 2),
    with base_i a fair coin from the seed. Every image is seen both ways in any two epochs."""

    def __init__(self, seed: int, n: int, device: torch.device):
        g = torch.Generator().manual_seed(derive_seed(seed, 0xF11B))
        self.base = torch.randint(0, 2, (n,), generator=g, dtype=torch.bool).to(device)

    def epoch(self, epoch: int, order: torch.Tensor) -> torch.Tensor:
        """Flip bits of the samples in `order` (a device tensor of sample indices) for `epoch`."""
        return self.base[order] ^ bool(epoch % 2)
