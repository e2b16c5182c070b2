"""Checkpoints: atomic to write, safe to load, and kept N deep.

- A save writes `ckpt-<step>.pt` atomically (dist_resnet.fileio), then points `last.pt` (and
  `best.pt`) at it with a hard link, and keeps the `keep_last` newest `ckpt-*.pt`.
- Every file is loaded with `torch.load(weights_only=True)`: a file whose pickle asks for any
  Python object beyond tensors, containers, numbers and strings is refused, so a crafted
  checkpoint cannot run code. What we save is only those types.
- Every checkpoint carries `format_version`; a file that is not one of ours, is truncated, or
  comes from a newer format gets a CheckpointError that names the file.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from .faults import fault_point
from .fileio import atomic_write, link_atomic

FORMAT_VERSION = 1
CKPT = re.compile(r"^ckpt-(\d+)\.pt$")
REQUIRED = ("model", "config")


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message names it and says why."""


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP's `.module` and torch.compile's `._orig_mod`."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_atomic(obj: object, path: str | Path) -> Path:
    """torch.save `obj` to `path` so that a kill at any moment leaves the old file or the new one."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def step_of(path: Path) -> int:
    m = CKPT.match(path.name)
    return int(m.group(1)) if m else -1


def save(state: dict, run_dir: Path, keep_last: int, links: tuple[str, ...] = ()) -> Path:
    """Write `state` as run_dir/ckpt-<step>.pt, point last.pt (and each of `links`, e.g. best.pt) at it,
    prune to keep_last."""
    state = {"format_version": FORMAT_VERSION, **state}
    path = save_atomic(state, run_dir / f"ckpt-{state['step']:08d}.pt")
    fault_point("link")
    link_atomic(path, run_dir / "last.pt")
    for name in links:
        link_atomic(path, run_dir / name)
    for old in sorted(run_dir.glob("ckpt-*.pt"), key=step_of)[:-keep_last]:
        old.unlink(missing_ok=True)  # last.pt, best.pt, ... are links of their own: they survive this
    return path


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def _why(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    useful = [s for s in lines if s.startswith(("Unsupported global", "Unsupported operand", "Trying to"))]
    return (useful or lines or [type(e).__name__])[0].split(". ")[0][:200]


def load(path: str | Path, device: torch.device | str = "cpu", required: tuple[str, ...] = REQUIRED) -> dict:
    """Load a checkpoint of ours safely; CheckpointError (naming the file) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            raise CheckpointError(
                f"{path} is not a checkpoint: torch.save writes a zip archive and this file is not one")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} is not a dist_resnet checkpoint: a weights-only load refuses it ({_why(e)}). "
            "Loading it fully could run code it carries, so it is not loaded"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({type(e).__name__}: {_why(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a dist_resnet checkpoint: it holds a {type(state).__name__}, not a dict")
    version = state.get("format_version", 0)  # 0: written before versions existed (same layout)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than the {FORMAT_VERSION} this dist_resnet reads; "
            "upgrade dist_resnet to load it"
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a dist_resnet checkpoint: it has no {', '.join(missing)}")
    return state


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoints to resume from, newest first: ckpt-*.pt by step, then last.pt (each file once). A kill
    between a save and its link leaves a ckpt-*.pt newer than last.pt: that one is where the run was."""
    paths = [*sorted(run_dir.glob("ckpt-*.pt"), key=step_of, reverse=True), run_dir / "last.pt"]
    seen, out = set(), []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(p)
    return out


def adopt(path: Path, run_dir: Path) -> None:
    """Point last.pt at `path`, the checkpoint a run resumed from, if it is not already: then a run that
    ends without saving again (it was already finished) leaves last.pt at its real end."""
    last = run_dir / "last.pt"
    if path.name != last.name and not (last.exists() and os.path.samefile(path, last)):
        link_atomic(path, last)


def load_latest(run_dir: Path, device: torch.device | str = "cpu") -> tuple[Path, dict, list[str]] | None:
    """The newest checkpoint in `run_dir` that loads: (path, state, why each newer one did not).

    None when there is no checkpoint at all; CheckpointError when there are some and none loads.
    Nothing is renamed or deleted, so every rank can call this on a shared folder at once. A bad
    file with a higher step is overwritten when the resumed run saves that step again."""
    notes: list[str] = []
    for path in candidates(run_dir):
        try:
            return path, load(path, device), notes
        except CheckpointError as e:
            notes.append(str(e))
    if notes:
        raise CheckpointError(f"no checkpoint in {run_dir} loads: " + "; ".join(notes))
    return None
