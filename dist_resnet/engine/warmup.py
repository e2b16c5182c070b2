"""Epoch hooks and the untimed warm-up.

- `TrainMode` and `WhitenBias` run at the start of every epoch (and `WhitenBias` freezes fastnet's
  whitening bias after `model.whiten_bias_epochs`: the optimizer skips it; the forward never changes).
- `WarmUp` (train.warmup_steps): torch.compile, cuDNN autotuning and the loader's first-use costs, paid
  before the timed run as the record scripts do: steps and an evaluation forward on throw-away data,
  after which the whole state and the RNGs are restored exactly.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from ..config import TTA, Config
from ..data import sizes
from ..data.loader import Feed
from ..data.manifest import Betons
from ..distributed import DistEnv
from ..precision import Amp
from .evaluation import predict
from .report import Clock
from .state import Checkpointer, RunState
from .step import Step


class TrainMode:
    """Every epoch starts with the model in training mode (an evaluation left it in eval mode)."""

    def __init__(self, net: nn.Module):
        self.net = net

    def start_epoch(self, epoch: int) -> None:
        self.net.train()

    def warm_up(self, i: int) -> None:
        self.net.train()


class TrainSide:
    """Progressive resizing (data.res_end): says the train side at the first epoch trained and whenever it changes."""

    def __init__(self, d, say: Callable):
        self.d, self.say, self.last = d, say, None

    def start_epoch(self, epoch: int) -> None:
        side = sizes.train_side(self.d, epoch)
        if side != self.last:
            self.say(f"epoch {epoch + 1}: train side {side} px" + ("" if self.last is None else f" (was {self.last} px)"))
            self.last = side

    def warm_up(self, i: int) -> None:
        pass


class WhitenBias:
    """fastnet's whitening bias trains for the first `epochs` epochs, then stays as it is: a pre-hook of the
    optimizer's step drops its gradient, so SGD (momentum, weight decay) leaves it alone. The forward is the
    same in both phases: under DDP the bias still gets its (all-reduced) gradient at every step, as
    `find_unused_parameters=False` requires (a detached bias crashed the first step after the switch),
    and a compiled net has one graph for both."""

    def __init__(self, stem: nn.Module, epochs: int, optimizer: torch.optim.Optimizer):
        self.bias, self.epochs, self.frozen = stem.bias, epochs, False
        optimizer.register_step_pre_hook(self.drop_gradient)

    def drop_gradient(self, optimizer, args, kwargs) -> None:
        if self.frozen:
            self.bias.grad = None  # SGD skips a parameter without a gradient

    def start_epoch(self, epoch: int) -> None:
        self.frozen = epoch >= self.epochs

    def warm_up(self, i: int) -> None:
        self.frozen = False


def no_warm_up(state: RunState) -> None:
    """train.warmup_steps=0: the first steps of the run pay for compile and autotuning."""


def example_batch(cfg: Config, env: DistEnv, betons: Betons, feed: Feed):
    """The warm-up's throw-away micro-batch, shaped, typed and laid out as the loader's (at a train `side`,
    the test side with `test`)."""
    micro = cfg.train.batch_size // env.world_size // cfg.train.accum_steps
    fmt = torch.channels_last if feed.channels_last else torch.contiguous_format
    train_hw, test_hw = sizes.shapes(cfg.data, betons)

    def make(g: torch.Generator, n: int = micro, test: bool = False,
             side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hw = test_hw if test else ((side, side) if side else train_hw)
        x = torch.randn((n, 3, *hw), generator=g, device=env.device)
        y = torch.randint(0, len(betons.classes), (n,), generator=g, device=env.device)
        return x.to(feed.dtype).contiguous(memory_format=fmt), y

    return make


class WarmUp:
    """`steps` training steps on a seeded random batch shaped like the loader's (at each train side, with
    progressive resizing), and an evaluation forward
    (and the evaluation's attacks) at every batch size the evaluations will see (`eval_sizes`: the full
    batch and each split's last, partial one; a compiled model would recompile at each new one inside
    the timed run), then the checkpoint state and the RNGs restored as they were."""

    def __init__(self, steps: int, step: Step, forward: nn.Module, hooks: list, checkpointer: Checkpointer,
                 clock: Clock, example: Callable[..., tuple[torch.Tensor, torch.Tensor]], accum: int,
                 amp: Amp, tta: TTA, say: Callable, eval_sizes: list[int] = (), attacks: list = (),
                 sides: list[int] = ()):
        self.steps, self.step, self.forward, self.hooks = steps, step, forward, hooks
        self.checkpointer, self.clock, self.example, self.accum = checkpointer, clock, example, accum
        self.amp, self.tta, self.say, self.eval_sizes, self.attacks = amp, tta, say, list(eval_sizes), list(attacks)
        self.sides = list(sides)  # progressive resizing: every train side the run will see

    def __call__(self, state: RunState) -> None:
        t0 = time.perf_counter()
        saved = self.checkpointer.snapshot()
        device = self.amp.device
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        for side in self.sides or [None]:
            x, y = self.example(torch.Generator(device=device).manual_seed(0), side=side)
            for i in range(self.steps):
                for hook in self.hooks:
                    hook.warm_up(i)
                self.step([(x, y)] * self.accum, state.step)
        with torch.no_grad(), self.amp.autocast():
            self.forward.eval()
            for n in self.eval_sizes or [len(x)]:
                xe, ye = self.example(torch.Generator(device=device).manual_seed(n), n, True)
                predict(self.forward, xe, self.tta)
                for attack in self.attacks:  # the evaluation's attacks: an input that needs its gradient
                    attack(self.forward, xe, ye, 0)
            self.forward.train()
        self.checkpointer.restore_snapshot(saved, "the warm-up's copy")
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        self.clock.sync()
        self.clock.warmup_s = time.perf_counter() - t0
        self.say(f"warm-up: {self.steps} steps and an evaluation forward on throw-away data in "
                 f"{self.clock.warmup_s:.1f}s (compile, autotune), untimed; the state is restored")
