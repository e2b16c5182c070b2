"""L-infinity attacks (FGSM, PGD) for adversarial training and robust evaluation.

The threat model lives in pixel space: an image in [0, 1] per channel may move by at most eps/255 per
pixel and must stay in [0, 1]. Our loader normalises before the model (x = (p - mean) / std), so the
attacks work on normalised tensors with the ball and the box mapped through that normalisation:
eps / std per channel, and [(0 - mean) / std, (1 - mean) / std]. Sizes are in 0-255 pixel units, as in
the reference code of "Fast is better than free" (Wong, Rice and Kolter, ICLR 2020).

Gradients are taken with `torch.autograd.grad` with respect to the perturbation only: no parameter
gets a gradient, so an attack inside a DDP training step triggers no all-reduce (the caller runs it
on the module inside DDP). Under autocast the attack loss may be scaled (fp16); only its sign is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data.augment import derive_seed

Scale = Callable[[torch.Tensor], torch.Tensor]  # e.g. GradScaler.scale: keeps fp16 input gradients from underflowing


@dataclass
class Threat:
    """The L-infinity ball of `eps` pixel levels (of 255) around an image, in normalised units."""

    eps: torch.Tensor  # (1, C, 1, 1): eps / 255 / std
    lo: torch.Tensor  # (1, C, 1, 1): (0 - mean) / std
    hi: torch.Tensor  # (1, C, 1, 1): (1 - mean) / std
    unit: torch.Tensor  # (1, C, 1, 1): one pixel level, 1 / 255 / std

    @classmethod
    def linf(cls, eps: float, mean: list[float], std: list[float], device: torch.device | str) -> "Threat":
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return cls(eps=eps / 255 / s, lo=-m / s, hi=(1 - m) / s, unit=1 / 255 / s)

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """`delta` clipped into the ball and so that x + delta stays in the box."""
        return torch.minimum(torch.maximum(delta, -self.eps), self.eps).clamp_(self.lo - x, self.hi - x)

    def start(self, x: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
        """The point of the ball (inside the box) that `uniform` (like x, in [0, 1)) picks, or zero."""
        if uniform is None:
            return torch.zeros_like(x)
        return self.project(x, (uniform * 2 - 1) * self.eps)


def _input_grad(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor,
                scale: Scale | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d delta, logits) at x + delta, fed to the model in `dtype`; no parameter gradient is formed."""
    delta.requires_grad_(True)
    logits = model((x + delta).to(dtype))
    loss = F.cross_entropy(logits.float(), y)
    grad, = torch.autograd.grad(scale(loss) if scale is not None else loss, delta)
    delta.requires_grad_(False)
    return grad, logits.detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, alpha: float, steps: int,
        random_start: bool | torch.Generator = True, restarts: int = 1, early_stop: bool = False,
        scale: Scale | None = None, uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Projected gradient descent on the cross-entropy: `steps` signed-gradient steps of `alpha` pixel
    levels, from a random start (or zero), the best of `restarts` runs. The random start draws from
    `random_start` if it is a generator, or takes `uniform` (x's shape, in [0, 1)) for the first run.
    FGSM is pgd(steps=1); FGSM with a random start and alpha = 1.25 eps is "Fast is better than free"'s FGSM-RS.

    With `early_stop` (evaluation) an image stops moving once it is misclassified, as in the reference
    evaluation, and the returned mask says which images withstood every restart (None otherwise).
    The perturbation is computed in fp32, and the model is fed in x's dtype: a compiled model then sees one
    input dtype (under autocast its first layer casts to the AMP dtype either way), not one graph per dtype.
    Returns (x + delta detached, in x's memory format and dtype, correct-under-attack mask or None)."""
    dtype, x = x.dtype, x.float()
    step = alpha * threat.unit
    best, fooled = None, torch.zeros_like(y, dtype=torch.bool)
    generator = random_start if isinstance(random_start, torch.Generator) else None
    for r in range(restarts if early_stop else 1):  # training takes one run
        u = uniform if r == 0 and uniform is not None else (
            torch.rand(x.shape, generator=generator, device=x.device).to(memory_format=_format(x))
            if random_start is not False else None)
        delta = threat.start(x, u)
        for _ in range(steps):
            grad, logits = _input_grad(model, x, delta, y, scale, dtype)
            moved = threat.project(x, delta + step * grad.sign())
            if early_stop:  # only images still classified correctly move on
                moved = torch.where((logits.argmax(1) == y).view(-1, 1, 1, 1), moved, delta)
            delta = moved
        if not early_stop:
            return (x + delta).detach().to(dtype), None
        with torch.no_grad():
            wrong = model((x + delta).to(dtype)).argmax(1) != y
        best = delta if best is None else torch.where((wrong & ~fooled).view(-1, 1, 1, 1), delta, best)
        fooled |= wrong
    return (x + best).detach().to(dtype), ~fooled


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, alpha: float,
         random_start: bool = True, scale: Scale | None = None) -> torch.Tensor:
    """One signed-gradient step (FGSM; with a random start, FGSM-RS)."""
    return pgd(model, x, y, threat, alpha, 1, random_start, scale=scale)[0]


class Adversary:
    """The training-time attack, a component of the step: `x_adv = adversary(model, x, y, step, micro)`
    before the forward that trains. `kind` fgsm or pgd; sizes in pixel levels (0-255).

    The random start is drawn for the whole global batch from (seed, step) and each rank takes the rows
    of its micro-batch, as the augmentation does: a sample gets the same start on any world size, and a
    resumed run the same as an uninterrupted one."""

    def __init__(self, kind: str, eps: float, alpha: float, steps: int, random_start: bool, mean: list[float],
                 std: list[float], device: torch.device, seed: int, rank: int, world: int, global_batch: int,
                 scale: Scale | None = None):
        self.threat = Threat.linf(eps, mean, std, device)
        self.alpha, self.steps, self.random_start = alpha, steps if kind == "pgd" else 1, random_start
        self.seed, self.share, self.global_batch, self.scale = seed, global_batch // world, global_batch, scale
        self.rank, self.generator = rank, torch.Generator(device=device)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        uniform = None
        if self.random_start:
            g = self.generator.manual_seed(derive_seed(self.seed, 0xAD5, step))
            offset = self.rank * self.share + micro * len(x)
            u = torch.rand((self.global_batch, *x.shape[1:]), generator=g, device=x.device)[offset:offset + len(x)]
            uniform = u.contiguous(memory_format=_format(x))
        return pgd(model, x, y, self.threat, self.alpha, self.steps, False, scale=self.scale, uniform=uniform)[0]


class RobustEval:
    """The evaluation attack: PGD with early stop and restarts, `(model, x, y, batch) -> correct mask`:
    which images are classified correctly both as they are and under the attack. Random starts come
    from (seed, rank, batch), so an evaluation repeats exactly on the same world size."""

    def __init__(self, eps: float, alpha: float, steps: int, restarts: int, mean: list[float], std: list[float],
                 device: torch.device, rank: int = 0, seed: int = 0):
        self.threat = Threat.linf(eps, mean, std, device)
        self.eps, self.alpha, self.steps, self.restarts = eps, alpha, steps, restarts
        self.seed, self.rank, self.generator = seed, rank, torch.Generator(device=device)

    def describe(self) -> str:
        return f"PGD-{self.steps}, {self.restarts} restart(s), eps {self.eps:g}/255, alpha {self.alpha:g}/255"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        g = self.generator.manual_seed(derive_seed(self.seed, self.rank, batch))
        with torch.enable_grad():
            robust = pgd(model, x, y, self.threat, self.alpha, self.steps, g, self.restarts, early_stop=True)[1]
        return clean & robust


def default_alpha(kind: str, eps: float, steps: int) -> float:
    """`adv.alpha=0`: 1.25 eps for FGSM (the reference's FGSM-RS), 2.5 eps / steps for PGD (Madry et al.)."""
    return 1.25 * eps if kind == "fgsm" else 2.5 * eps / steps
