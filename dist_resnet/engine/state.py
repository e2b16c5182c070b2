"""Where a run is and how it gets back there: the run state, the resume point every rank agrees on,
the Checkpointer that gathers each component's state into one file, and what a non-finite loss does.

The checkpoint's keys are fixed (`KEYS`, with `checkpoint.FORMAT_VERSION`): each component owns some
of them through its `state_dict()`/`load_state_dict(state, source)`, and the Checkpointer writes them
all, in this order, whichever components a run has.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from .. import checkpoint
from ..checkpoint import load_latest, unwrap
from ..config import Config, ConfigError, load_config, resume_changes
from ..data.manifest import Betons
from ..distributed import EXIT_DIVERGED, DistEnv, JobExit, spread
from ..models import load_weights, widths

KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "position", "best_acc", "history", "ema",
        "lookahead", "rollbacks", "config", "world_size", "best_robust", "collapses", "data", "classes", "normalize",
        "image_shape", "monitor", "comm_hook", "precision", "distill", "widths")  # monitor, comm_hook, precision,
# distill, widths: since early stopping, PowerSGD, the precision record, distillation and pruning; older checkpoints,
# without them, resume too
OPTIONAL = {"ema": None, "lookahead": None, "comm_hook": None}  # features a run may not have: None in its checkpoints


class Stateful(Protocol):
    def state_dict(self) -> dict: ...  # its checkpoint keys and their values

    def load_state_dict(self, state: dict, source: str = "") -> None: ...  # from a whole checkpoint


class Keyed:
    """An object with torch's state_dict/load_state_dict, stored under one checkpoint key."""

    def __init__(self, key: str, obj):
        self.key, self.obj = key, obj

    def state_dict(self) -> dict:
        return {self.key: self.obj.state_dict()}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        self.obj.load_state_dict(state[self.key])


class ModelWeights:
    """The unwrapped model's weights ("model") and every layer's width ("widths": a pruned model's shape),
    loaded with a clear error for another model's."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        net = unwrap(self.model)
        return {"model": net.state_dict(), "widths": widths.record(net)}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        load_weights(self.model, state["model"], source)


@dataclass
class RunState:
    """Where the run is: completed epochs, optimizer steps taken, the position inside a stopped epoch,
    the per-epoch history, the precision each stretch of steps ran in; and where it ends (`total_steps`: the
    last epoch may end early, train.max_steps)."""

    steps_per_epoch: int
    epochs: int
    total_steps: int
    precision: dict = field(default_factory=dict)  # what this process runs in: {"precision", "why"}
    epoch: int = 0
    step: int = 0
    position: dict | None = None  # {"step", "stats", "elapsed"} of a stopped epoch
    history: list = field(default_factory=list)
    # [{"from_step", "precision", "why"}]: train.precision=auto resumed on another machine may resolve otherwise
    segments: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.segments = self.segments or [{"from_step": 0, **self.precision}]

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs

    def epoch_end(self, epoch: int) -> int:
        """The step (within `epoch`) at which the epoch ends."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def take_position(self) -> dict:
        """Where the next epoch starts (a stopped epoch's position, once), else its beginning."""
        pos, self.position = self.position or {"step": 0, "stats": [0.0, 0.0, 0.0], "elapsed": 0.0}, None
        return pos

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "position": self.position, "history": self.history,
                "precision": self.segments}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        self.epoch, self.step, self.position = state["epoch"], state["step"], state.get("position")
        self.history = state["history"]
        self.segments = [dict(s) for s in state.get("precision") or  # a checkpoint from before the record
                         [{"from_step": 0, "precision": None, "why": "not recorded"}]]
        if self.segments[-1]["precision"] != self.precision.get("precision"):  # resumed on another machine
            self.segments.append({"from_step": self.step, **self.precision})


# ---------------------------------------------------------------- the resume point
def agreed_checkpoint(run_dir: Path, env: DistEnv, say: Callable) -> tuple[Path, dict] | None:
    """The newest checkpoint in run.dir that loads, found by every rank alike (ranks that see
    different files, e.g. a run.dir that is not shared between nodes, are a clear error)."""
    found = load_latest(run_dir) if run_dir.is_dir() else None
    if found is not None:
        for note in found[2]:
            say(f"warning: {note}; falling back to an older checkpoint")
    mark = [-1.0, -1.0] if found is None else [float(found[1]["epoch"]), float(found[1]["step"])]
    lo, hi = spread(mark, env.control_group)
    if lo != hi:
        raise ConfigError(
            f"the ranks see different checkpoints in run.dir={run_dir} (epoch, step from {lo} to {hi}; "
            "-1 = none): run.dir must be one folder that every node shares")
    return None if found is None else found[:2]


def refused_changes(old: Config, cfg: Config, state: dict, betons: Betons) -> tuple[dict, dict]:
    refused, numerics = resume_changes(old, cfg)
    data = state.get("data") or {}
    if any(data.get(s) not in (None, sha) for s, sha in betons.sha256.items()):
        refused["data.dir (beton sha256)"] = (old.data.dir, cfg.data.dir)
    return refused, numerics


def find_resume_point(cfg: Config, env: DistEnv, betons: Betons, amp, say: Callable) -> tuple[Path, dict] | None:
    """The checkpoint this run continues from (train.resume=true), checked against this config and this
    machine's precision (`amp`); None for a fresh run. ConfigError for a run.dir that holds one without
    train.resume, or a change it refuses."""
    run_dir = Path(cfg.run.dir)
    found = agreed_checkpoint(run_dir, env, say)
    if found is None:
        return None
    path, state = found
    if not cfg.train.resume:
        raise ConfigError(f"{path} exists: pass train.resume=true to continue that run, or choose another run.dir")
    try:
        old = load_config(None, [], base=state["config"])
    except ConfigError as e:
        raise ConfigError(f"{path}'s config does not fit this version of dist_resnet: {e}") from None
    refused, numerics = refused_changes(old, cfg, state, betons)
    if refused:
        why = "; ".join(f"{k}: {a} -> {b}" for k, a, b in ((k, *v) for k, v in refused.items()))
        epochs = (" (train.epochs: the LR schedule is planned over the epochs a run starts with, so another "
                  "count would make the LR jump; to train longer, start a new run from these weights)"
                  if "train.epochs" in refused else "")
        raise ConfigError(
            f"cannot resume from {path}: these settings differ from the checkpoint's and would change the "
            f"run: {why}{epochs}. Use the checkpoint's values ({run_dir / 'config.yaml'}) or a new run.dir")
    if numerics:
        say("note: resuming with " + "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in numerics.items())
            + ": the run continues, but no longer bit-identical to an uninterrupted one")
    was = (state.get("precision") or [{}])[-1]
    if was.get("precision") not in (None, amp.precision.value):
        say(f"note: this run trained in {was['precision']} ({was['why']}) until step {state['step']}; it goes on in "
            f"{amp.describe()}: the run continues, but no longer bit-identical to an uninterrupted one "
            "(metrics.json: precision_segments)")
    if state.get("world_size", env.world_size) != env.world_size:
        say(f"note: resuming a run of {state['world_size']} ranks on {env.world_size}: the global "
            "batch, sample order and augmentations are the same")
    return path, state


# ---------------------------------------------------------------- checkpoints
class Checkpointer:
    """Gathers every component's state into one checkpoint (the `KEYS`), saves it atomically on rank 0
    (`ckpt-<step>.pt`, `last.pt` and the links it is given, `keep_last` kept), restores it into the
    components, and snapshots it in memory (the warm-up, a rollback before the first checkpoint)."""

    def __init__(self, run_dir: Path, keep_last: int, is_main: bool, parts: list[Stateful], meta: dict,
                 state: RunState, say: Callable, every: int = 0):
        self.run_dir, self.keep_last, self.is_main = run_dir, keep_last, is_main
        self.parts, self.meta, self.state, self.say = parts, meta, state, say
        self.every = every  # train.checkpoint_every: also save every this many steps inside an epoch; 0 = never

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after global step `step` inside an epoch (the epoch's end saves anyway)."""
        return bool(self.every) and step % self.every == 0

    def state_dict(self) -> dict:
        """Everything a resume needs, in types a weights-only load accepts (tensors, containers,
        numbers, strings)."""
        gathered = {**OPTIONAL, **self.meta}
        for part in self.parts:
            gathered.update(part.state_dict())
        assert set(gathered) == set(KEYS), set(gathered) ^ set(KEYS)
        return {k: gathered[k] for k in KEYS}

    def save(self, links: tuple[str, ...] | list[str] = ()) -> None:
        """Called on every rank: a part whose state is per rank (PowerSGD's) gathers it first, then rank 0
        writes."""
        for part in self.parts:
            if hasattr(part, "gather"):
                part.gather()
        if self.is_main:
            checkpoint.save(self.state_dict(), self.run_dir, self.keep_last, tuple(links))

    def restore(self, path: Path, state: dict, quiet: bool = False) -> None:
        for part in self.parts:
            part.load_state_dict(state, str(path))
        if not quiet:
            if self.is_main:  # a kill between a save and its link left last.pt behind the file resumed from
                checkpoint.adopt(path, self.run_dir)
            pos, e = self.state.position, self.state.epoch
            where = (f"inside epoch {e + 1}, after its step {pos['step']} ({e} whole epochs done" if pos else
                     f"after epoch {e} ({e} whole epochs done")
            self.say(f"resumed from {path} {where}; global step {self.state.step})")

    def snapshot(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()

    def restore_snapshot(self, data: bytes, name: str) -> dict:
        state = torch.load(io.BytesIO(data), weights_only=True)
        self.restore(Path(name), state, quiet=True)
        return state


# ---------------------------------------------------------------- non-finite losses
class Diverged(JobExit):
    """A non-finite training loss, seen at a log or epoch-end sync; `steps` brackets where it appeared."""

    def __init__(self, message: str, steps: tuple[int, int]):
        super().__init__(EXIT_DIVERGED, message, agreed=True)  # from all-reduced loss sums
        self.steps = steps


class StopOnNonFinite:
    """train.nonfinite=stop: a NaN/inf loss, seen in an all-reduced sum (so on every rank alike, at a
    sync that happens anyway), ends the run with exit 3; nothing diverged is saved."""

    def __init__(self, state: RunState, scheduler):
        self.state, self.scheduler = state, scheduler
        self.checked_step = 0  # the last step known to have a finite loss
        self.rollbacks: list[dict] = []  # what was rolled back, and to where (train.nonfinite=rollback)
        self.failure: dict | None = None

    def check(self, loss_sum: float) -> None:
        if math.isfinite(loss_sum):
            self.checked_step = self.state.step
            return
        steps = (self.checked_step + 1, self.state.step)
        raise Diverged(
            f"error: training diverged: the loss became NaN or inf between steps {steps[0]} and {steps[1]} "
            f"(epoch {self.state.epoch + 1}) at optim.lr={self.scheduler.base_lrs[0]:g}. Nothing diverged was saved; "
            f"lower optim.lr and start again, or set train.nonfinite=rollback", steps)

    def begin(self, checkpointer: Checkpointer) -> None:
        """A fresh run starts (not a resumed one)."""

    def recover(self, d: Diverged, checkpointer: Checkpointer) -> bool:
        """Whether the run goes on after `d` (it has been put back to a good state)."""
        return False

    def fail(self, d: Diverged) -> None:
        self.failure = {"kind": "nonfinite_loss", "steps": list(d.steps), "epoch": self.state.epoch + 1,
                        "rollbacks": len(self.rollbacks)}

    def summary(self) -> dict:
        return {"failure": self.failure, "rollbacks": self.rollbacks}

    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        self.rollbacks, self.checked_step = state.get("rollbacks", []), state["step"]


class RollbackOnNonFinite(StopOnNonFinite):
    """train.nonfinite=rollback: all ranks, in lockstep (they saw the same all-reduced loss), go back to
    the newest good checkpoint (or the initial state) with half the learning rate, at most
    `max_rollbacks` times."""

    def __init__(self, state: RunState, scheduler, optimizer: torch.optim.Optimizer, max_rollbacks: int,
                 find: Callable[[], tuple[Path, dict] | None], say: Callable):
        super().__init__(state, scheduler)
        self.optimizer, self.max_rollbacks, self.find, self.say = optimizer, max_rollbacks, find, say
        self.initial: bytes | None = None  # the state before the first checkpoint

    def begin(self, checkpointer: Checkpointer) -> None:
        self.initial = checkpointer.snapshot()

    def recover(self, d: Diverged, checkpointer: Checkpointer) -> bool:
        if len(self.rollbacks) >= self.max_rollbacks:
            return False
        done = self.rollbacks + [{"diverged_steps": list(d.steps)}]
        found = self.find()
        if found is not None:
            path, state = found
            checkpointer.restore(path, state, quiet=True)
        else:
            path = Path("the initial state")
            state = checkpointer.restore_snapshot(self.initial, str(path))
        factor = 0.5 ** (len(done) - len(state.get("rollbacks", [])))
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        done[-1].update({"to_step": self.state.step, "lr": self.scheduler.base_lrs[0]})
        self.rollbacks, self.checked_step = done, self.state.step
        self.say(f"warning: the loss became NaN or inf between steps {d.steps[0]} and {d.steps[1]}: rolled back "
                 f"to {path} (step {self.state.step}) with optim.lr={self.scheduler.base_lrs[0]:g} "
                 f"(rollback {len(done)} of train.max_rollbacks={self.max_rollbacks})")
        return True
