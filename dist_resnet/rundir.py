"""The run folder's contract: what a training run writes into `run.dir` and what others may read or
write there. The trainer writes these files; the sweep and the plots read them; a sweep or a Slurm
script asks a run to stop by creating STOP.

- `config.yaml`: the resolved config.
- `metrics.json` (rewritten atomically after every epoch): `history`, one record per epoch with
  `epoch`, `train_loss`, `train_acc`, `lr`, `epoch_time_s`, `img_per_s`, and after an evaluation
  `test_loss`/`test_acc`/`test_count` (and `val_*` with a validation split, `ema_*` with EMA,
  `*_robust_acc` under an attack, `check_*` in adversarial training); then the summary: `completed`,
  `stopped` (and `stop_reason`: the stop file, or the signal), `failure`, `test_acc`, `val_acc`, `best_val_acc`,
  times, ...
- `STOP`: its existence asks the run to checkpoint and stop (exit 75); the run removes it once handled.
- `.outcome-<job id>`: slurm/train.sh's outcome record for one attempt (dist_resnet.distributed.record_outcome,
  named by $DIST_RESNET_OUTCOME), removed by the script once read.
- `.lock`: held (flock) by the one trainer that writes here, with its host, pid and start time inside.
- `last.pt`, `best.pt`, `ckpt-<step>.pt`: checkpoints (dist_resnet.checkpoint).
- `curves.png`, `confusion.png`, `per_class.json`, `split.json`, `pretrained.json`: written at the end
  or at the start of a run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import IO

CONFIG = "config.yaml"
METRICS = "metrics.json"
STOP = "STOP"
PER_CLASS = "per_class.json"
SPLIT = "split.json"
PRETRAINED = "pretrained.json"
CURVES = "curves.png"
CONFUSION = "confusion.png"
LOCK = ".lock"


class FolderBusy(RuntimeError):
    """Another trainer writes to this run folder."""


def lock(run_dir: str | Path) -> IO:
    """Hold the run folder for this process (an exclusive flock on `.lock`, released when the file is
    closed or the process ends); FolderBusy, naming the holder, if another process holds it."""
    import fcntl
    import os
    import socket
    import time

    path = Path(run_dir) / LOCK
    f = open(path, "a+")  # noqa: SIM115 - kept open for as long as the lock is held
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise FolderBusy(busy_message(run_dir, who)) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def busy_message(run_dir: str | Path, who: str) -> str:
    return (f"run.dir={run_dir} is in use by {who}: one trainer writes to a run folder at a time; wait for that run "
            "to end, or stop it (touch run.dir/STOP), or choose another run.dir")


def holder(run_dir: str | Path) -> str | None:
    """Who holds the run folder now (its lock file's text), or None where no trainer does: a probe that takes
    a shared lock for a moment and writes nothing."""
    import fcntl

    path = Path(run_dir) / LOCK
    try:
        f = open(path)  # noqa: SIM115 - closed below, which releases the probe's lock
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
    return None


def read_metrics(run_dir: str | Path) -> dict | None:
    """The run's metrics.json, or None while there is none (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / METRICS).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def history(metrics: dict | None) -> list[dict]:
    return (metrics or {}).get("history", [])


def val_history(metrics: dict | None) -> list[tuple[int, float]]:
    """(epoch, validation accuracy) of every evaluated epoch."""
    return [(r["epoch"], r["val_acc"]) for r in history(metrics) if "val_acc" in r]


def selected(metrics: dict | None) -> tuple[int, float, int] | None:
    """What a sweep scores a run on: (epoch, validation accuracy) of the epoch best.pt holds, the monitored
    best (`monitor_best_epoch`: the highest val_acc, or with train.early_stop_monitor=val_loss the lowest
    val_loss), and the epochs the run needed (where it stopped early, or its last); None before any
    validation. With early stopping the last evaluation comes `patience` evaluations after that best."""
    hist = val_history(metrics)
    if not hist:
        return None
    best = (metrics or {}).get("monitor_best_epoch")
    epoch, acc = next(((e, a) for e, a in hist if e == best), hist[-1])
    needed = (metrics or {}).get("stop_epoch") or history(metrics)[-1]["epoch"]
    return epoch, acc, needed


def request_stop(run_dir: str | Path) -> None:
    """Ask the run in `run_dir` to checkpoint and stop at its next check."""
    (Path(run_dir) / STOP).touch()


def withdraw_stop(run_dir: str | Path) -> None:
    """Take back a stop request the run never read (it had ended, or stopped on a signal, first): left there,
    it would stop the run's resume at once."""
    (Path(run_dir) / STOP).unlink(missing_ok=True)
