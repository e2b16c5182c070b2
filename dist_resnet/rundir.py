"""The run folder's contract: what a training run writes into `run.dir` and what others may read or
write there. The trainer writes these files; the sweep and the plots read them; a sweep or a Slurm
script asks a run to stop by creating STOP.

- `config.yaml`: the resolved config.
- `metrics.json` (rewritten atomically after every epoch): `history`, one record per epoch with
  `epoch`, `train_loss`, `train_acc`, `lr`, `epoch_time_s`, `img_per_s`, and after an evaluation
  `test_loss`/`test_acc`/`test_count` (and `val_*` with a validation split, `ema_*` with EMA,
  `*_robust_acc` under an attack, `check_*` in adversarial training); then the summary: `completed`,
  `stopped`, `failure`, `test_acc`, `val_acc`, `best_val_acc`, times, ...
- `STOP`: its existence asks the run to checkpoint and stop (exit 75); the run removes it once handled.
- `last.pt`, `best.pt`, `ckpt-<step>.pt`: checkpoints (dist_resnet.checkpoint).
- `curves.png`, `confusion.png`, `per_class.json`, `split.json`, `pretrained.json`: written at the end
  or at the start of a run.
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.json"
STOP = "STOP"
PER_CLASS = "per_class.json"
SPLIT = "split.json"
PRETRAINED = "pretrained.json"
CURVES = "curves.png"
CONFUSION = "confusion.png"


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


def request_stop(run_dir: str | Path) -> None:
    """Ask the run in `run_dir` to checkpoint and stop at its next check."""
    (Path(run_dir) / STOP).touch()
