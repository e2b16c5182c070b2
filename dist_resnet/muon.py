"""Muon (Jordan et al., 2024) for the convolution filters, SGD with Nesterov for everything else, as
airbench94_muon trains: one optimizer, so that the LR schedule, the loss scales, the rollback and the
checkpoint (`momentum_buffer` per parameter, torch's own layout) treat it as they treat SGD.

A Muon step on a filter W (out x in x kh x kw, viewed as the matrix out x (in kh kw)):

    B <- mu B + G;  U <- G + mu B (Nesterov);  W <- W * sqrt(out) / |W|_F;  W <- W - lr NS(U)

where NS is the quintic Newton-Schulz iteration that maps U's singular values near 1 (torch.optim.Muon's
coefficients and iteration, in bf16 on a GPU, fp32 on a CPU). The rescale of W to norm sqrt(out) before each
step is airbench's: BatchNorm follows every filter, so only W's direction matters, and the fixed norm fixes
the step's relative size. The update is scale-free in G, so a mean or a sum loss trains alike.

Why not torch.optim.Muon (torch >= 2.9) as it is: it takes 2-D parameters only (these are 4-D), has no
rescale of the weights, and decays them (decoupled) where airbench does not; its momentum is torch's lerp
form, which is this one's scaled by (1 - mu), the same after NS. Its Newton-Schulz iteration is what is
used here, written out because it is private to torch and absent below 2.9 (this project supports 2.4);
tests/test_muon.py checks the two agree where torch has it.

Distributed (`group` with several ranks): every rank holds the same gradients (after DDP's all-reduce) and
every momentum buffer (cheap: elementwise), but each orthogonalises only its share of the matrices, balanced
by their cost, and the results are all-gathered. The update is bit-identical to one process's, since each
matrix goes through the same kernels on the rank that owns it.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's): steepest slope at zero


def newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16, coefficients=NS_COEFFICIENTS,
                  eps: float = 1e-7) -> torch.Tensor:
    """The quintic Newton-Schulz iteration on the matrix g, in `dtype` (bf16 as torch and airbench compute it
    on a GPU): U S' V^T for g = U S V^T, with S' roughly in [0.7, 1.2] after 5 steps (airbench takes 3:
    wider, and as good for training)."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def is_filter(p: torch.Tensor) -> bool:
    """What Muon trains: a trainable convolution filter."""
    return p.ndim == 4 and p.requires_grad


def owners(shapes: list[torch.Size], world: int) -> list[int]:
    """The rank that orthogonalises each matrix: the costliest first, each to the least loaded rank
    (deterministic, so every rank computes the same assignment)."""
    def cost(s: torch.Size) -> float:
        m, n = s[0], math.prod(s[1:])
        return m * n * min(m, n)

    load, owner = [0.0] * world, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-cost(shapes[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + cost(shapes[i])
    return owner


class MuonSGD(torch.optim.Optimizer):
    """Groups with `muon=True` take Muon steps (lr, momentum, ns_steps; no weight decay), the others SGD
    (lr, momentum, nesterov, weight_decay) as torch.optim.SGD computes it. `group`: the process group whose
    ranks share the Newton-Schulz work (None: this process does it all)."""

    def __init__(self, groups: list[dict], momentum: float, nesterov: bool, muon_momentum: float,
                 ns_steps: int, group=None):
        defaults = {"momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, "muon": False,
                    "muon_momentum": muon_momentum, "ns_steps": ns_steps}
        super().__init__(groups, defaults)
        self.process_group = group
        cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        # on a GPU the iteration is compiled, as airbench does: a graph per filter shape (built in the warm-up
        # steps), instead of ~15 kernel launches per filter and step. On a CPU it runs in fp32: bf16 matmuls
        # are emulated where the CPU lacks them (AVX2: the cpu preset's epoch took 98 s instead of 65)
        self.newton_schulz = torch.compile(newton_schulz, dynamic=False) if cuda else partial(newton_schulz,
                                                                                                dtype=torch.float32)

    def _buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return [self.state[p]["momentum_buffer"] for p in params]

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MuonSGD takes no closure"
        filters = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["muon"]:
                filters += self._muon_directions(group, params)
            elif params:
                self._sgd(group, params)
        if filters:
            self._muon_step(filters)

    def _sgd(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch.optim.SGD's update (dampening 0): its first step's buffer is the gradient, as here."""
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        bufs, m = self._buffers(params), group["momentum"]
        if m:
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, grads)
            grads = torch._foreach_add(grads, bufs, alpha=m) if group["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-group["lr"])

    def _muon_directions(self, group: dict, params: list[torch.Tensor]) -> list[tuple]:
        """Momentum and Nesterov for a Muon group: (parameter, its update before NS, lr, ns_steps)."""
        bufs, m = self._buffers(params), group["muon_momentum"]
        grads = [p.grad for p in params]
        torch._foreach_mul_(bufs, m)
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=m)
        return [(p, u, group["lr"], group["ns_steps"]) for p, u in zip(params, updates)]

    def _muon_step(self, filters: list[tuple]) -> None:
        ortho = self._orthogonalise([u.reshape(len(u), -1) for _, u, _, _ in filters], [f[3] for f in filters])
        for (p, _, lr, _), o in zip(filters, ortho):
            p.mul_(math.sqrt(len(p)) / p.norm())  # airbench: the filter's norm fixed at sqrt(output channels)
            p.add_(o.view_as(p).to(p.dtype), alpha=-lr)

    def _orthogonalise(self, matrices: list[torch.Tensor], steps: list[int]) -> list[torch.Tensor]:
        g = self.process_group
        world = dist.get_world_size(g) if g is not None else 1
        if world == 1:
            return [self.newton_schulz(m, s) for m, s in zip(matrices, steps)]
        rank, owner = dist.get_rank(g), owners([m.shape for m in matrices], world)
        mine = [self.newton_schulz(m, s).float() for i, (m, s) in enumerate(zip(matrices, steps)) if owner[i] == rank]
        sizes = [sum(m.numel() for i, m in enumerate(matrices) if owner[i] == r) for r in range(world)]
        flat = torch.zeros(max(sizes), device=matrices[0].device)  # fp32: gloo and NCCL both gather it
        if mine:
            flat[:sizes[rank]] = torch.cat([o.reshape(-1) for o in mine])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat, group=g)
        out, offset = [], [0] * world
        for i, m in enumerate(matrices):
            r, n = owner[i], m.numel()
            out.append(gathered[r][offset[r]:offset[r] + n].view(m.shape))  # fp32 holds bf16 exactly
            offset[r] += n
        return out
