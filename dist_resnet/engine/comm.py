"""DDP communication hooks (train.comm_hook): what a gradient bucket becomes before it goes on the wire.

- `none`: DDP's own all-reduce of fp32 gradients.
- `bf16` / `fp16`: torch's `bf16_compress_hook` / `fp16_compress_hook`: the bucket is cast, all-reduced
  (half the bytes), divided by the world size and cast back. Stateless.
- `powersgd`: torch's PowerSGD (Vogels et al., 2019): after `train.powersgd_start` steps of plain all-reduce,
  each matrix-shaped gradient is sent as two rank-`train.powersgd_rank` factors, with error feedback and a
  warm start. Its state (each rank's error feedback, the factors it warm-starts from, its step and RNG) is
  per rank: a checkpoint gathers every rank's to rank 0 (only) for its file, and each rank takes its own back, so a
  resumed run is bit-exact. At another world size the state cannot map to the ranks: it starts afresh (said).

One object per choice, made once in engine.build; the checkpoint key is `comm_hook` (None without state).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist


class NoHook:
    """DDP's own all-reduce (or bf16/fp16 compression, stateless): nothing to checkpoint."""

    def __init__(self, name: str = "none"):
        self.name = name

    def gather(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"comm_hook": None}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        pass


def compress(ddp, name: str) -> NoHook:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp.register_comm_hook(None, {"bf16": default_hooks.bf16_compress_hook,
                                  "fp16": default_hooks.fp16_compress_hook}[name])
    return NoHook(name)


def _rng_state(rng: np.random.RandomState) -> dict:
    kind, keys, pos, has_gauss, gauss = rng.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _set_rng(rng: np.random.RandomState, s: dict) -> None:
    rng.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


class PowerSGD(NoHook):
    """torch's PowerSGD hook on `ddp`, and its per-rank state in the checkpoint."""

    MEMORY = ("error_dict", "p_memory_dict", "q_memory_dict")

    def __init__(self, ddp, rank: int, start: int, seed: int, world: int, my_rank: int, device: torch.device,
                 say: Callable):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        super().__init__("powersgd")
        self.state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                                 start_powerSGD_iter=start, random_seed=seed)
        ddp.register_comm_hook(self.state, powerSGD_hook.powerSGD_hook)
        self.world, self.rank, self.device, self.say = world, my_rank, device, say
        self.gathered: list | None = None  # every rank's state, on its way into a checkpoint

    def local(self) -> dict:
        s = self.state
        return {"iter": s.iter, "rng": _rng_state(s.rng),
                **{k: {i: t.detach().cpu() for i, t in getattr(s, k).items()} for k in self.MEMORY}}

    def gather(self) -> None:
        """Every rank's state to rank 0, which writes the checkpoint and lets them go in `state_dict` (a collective:
        the checkpointer calls it on all ranks); the other ranks hold nothing after it."""
        self.gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object(self.local(), self.gathered, dst=0)

    def state_dict(self) -> dict:
        ranks, self.gathered = self.gathered, None
        return {"comm_hook": {"kind": "powersgd", "ranks": ranks, "local": None if ranks else self.local()}}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        saved = state.get("comm_hook")
        if not saved:
            return
        if saved["ranks"] is None:  # an in-memory snapshot (the warm-up): this rank's own
            mine = saved["local"]
        elif len(saved["ranks"]) == self.world:
            mine = saved["ranks"][self.rank]
        else:
            self.say(f"note: PowerSGD's state of {len(saved['ranks'])} ranks does not map to {self.world}: its error "
                     "feedback and warm start begin afresh")
            return
        s = self.state
        s.iter = mine["iter"]
        _set_rng(s.rng, mine["rng"])
        for k in self.MEMORY:
            getattr(s, k).clear()
            getattr(s, k).update({i: t.to(self.device) for i, t in mine[k].items()})


def comm_hook(cfg, env, ddp, say: Callable) -> NoHook:
    """The hook `train.comm_hook` asks for, on the DDP model (none with one process: nothing is sent)."""
    name = cfg.train.comm_hook.value
    if name == "none" or not env.distributed:
        if name != "none":
            say(f"note: train.comm_hook={name} compresses what ranks send each other; with one process there is "
                "nothing to send, so it is off")
        return NoHook()
    if name in ("bf16", "fp16"):
        return compress(ddp, name)
    return PowerSGD(ddp, cfg.train.powersgd_rank, cfg.train.powersgd_start, cfg.train.seed, env.world_size, env.rank,
                    env.device, say)
