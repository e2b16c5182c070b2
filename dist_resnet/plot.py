"""Pictures of runs, evaluations and sweeps, drawn with matplotlib's Agg backend (no display needed) and
written atomically, by rank 0, never from the hot loop.

    python -m dist_resnet.plot RUN_DIR [RUN_DIR ...] --out curves.png     # loss, accuracy, LR vs epoch
    python -m dist_resnet.plot --sweep SWEEP_DIR --out sweep.png          # history, parameter vs val accuracy

- `curves`: train/val/test loss and accuracy and the LR against epoch, from each run's metrics.json;
  every training run writes its own into run.dir/curves.png at the end.
- `confusion`: the confusion matrix, rows = true class, columns = predicted, each row normalised to 1,
  with the counts written in.
- `sweep`: optuna's optimisation history and slice plots, in one figure.
"""
from __future__ import annotations

import io
from pathlib import Path

from . import rundir
from .fileio import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def confusion(path: str | Path, matrix: list[list[int]], classes: list[str], title: str = "") -> Path:
    import numpy as np

    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    side = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"{title + ': ' if title else ''}accuracy {acc:.2%} on {int(m.sum())} images")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return save_figure(fig, path)


def _history(run_dir: Path) -> tuple[str, list[dict]]:
    m = rundir.read_metrics(run_dir)
    if m is None:
        raise PlotError(f"{run_dir} has no readable {rundir.METRICS}: is it a run folder?")
    return Path(run_dir).name, rundir.history(m)


class PlotError(ValueError):
    pass


def curves(path: str | Path, run_dirs: list[str | Path]) -> Path:
    """Loss, accuracy and learning rate against epoch, from each run's metrics.json, runs overlaid."""
    plt = _pyplot()
    runs = [_history(d) for d in run_dirs]
    if not any(h for _, h in runs):
        raise PlotError(f"no epoch is recorded yet in {', '.join(map(str, run_dirs))}")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    styles = {"train": "-", "val": "--", "test": ":"}
    palette = plt.get_cmap("tab10")  # fixed colours, whatever style another plot left behind
    for i, (name, history) in enumerate(runs):
        color = palette(i % 10)
        for split, style in styles.items():
            for ax, metric in ((axes[0], "loss"), (axes[1], "acc")):
                points = [(r["epoch"], r[f"{split}_{metric}"]) for r in history if f"{split}_{metric}" in r]
                if points:
                    ax.plot(*zip(*points), style, color=color, marker="o" if len(points) < 30 else None,
                            markersize=3, label=f"{name} {split}")
        lr = [(r["epoch"], r["lr"]) for r in history if "lr" in r]
        if lr:
            axes[2].plot(*zip(*lr), "-", color=color, label=name)
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def sweep(path: str | Path, sweep_dir: str | Path, storage: str | None = None) -> Path:
    """A sweep's optimisation history and each parameter against validation accuracy (optuna's plots)."""
    import optuna.visualization.matplotlib as ov
    from optuna.trial import TrialState

    from .sweep.storage import load_study

    plt = _pyplot()
    study, meta = load_study(Path(sweep_dir), storage)
    if not [t for t in study.trials if t.state == TrialState.COMPLETE]:
        raise PlotError(f"{sweep_dir}: no trial has completed yet")
    params = meta["params"]
    fig, axes = plt.subplots(1, 1 + len(params), figsize=(5 * (1 + len(params)), 4.5), squeeze=False)
    import warnings

    import matplotlib

    with warnings.catch_warnings(), matplotlib.rc_context():  # optuna switches the global style to ggplot
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        history = ov.plot_optimization_history(study)
        slices = ov.plot_slice(study, params=params)
    for ax, src in zip(axes[0], [history, *([slices] if len(params) == 1 else list(slices))]):
        _copy_axes(src, ax)
    axes[0][0].set_title(f"{study.study_name}: validation accuracy per trial")
    for ax in axes[0]:
        ax.set_ylabel("validation accuracy")
    plt.close(history.figure)
    plt.close(slices.figure if len(params) == 1 else slices[0].figure)
    return save_figure(fig, path)


def _copy_axes(src, dst) -> None:
    """Redraw optuna's axes (lines and scatter points) into one shared figure."""
    for line in src.get_lines():
        dst.plot(line.get_xdata(), line.get_ydata(), line.get_linestyle(), color=line.get_color(),
                 marker=line.get_marker(), label=line.get_label() if not line.get_label().startswith("_") else None)
    for coll in src.collections:
        offsets = coll.get_offsets()
        if len(offsets):
            dst.scatter(offsets[:, 0], offsets[:, 1], s=20, alpha=0.8)
    dst.set_xlabel(src.get_xlabel())
    dst.set_xscale(src.get_xscale())
    dst.set_title(src.get_title())
    dst.grid(alpha=0.3)
    if any(line.get_label() and not line.get_label().startswith("_") for line in dst.get_lines()):
        dst.legend(fontsize=7)


def main(argv: list[str] | None = None) -> Path:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="dist_resnet.plot", description="Training curves and sweep pictures.")
    p.add_argument("run_dirs", nargs="*", help="run folders: their curves are overlaid")
    p.add_argument("--sweep", metavar="SWEEP_DIR", help="the sweep's history and each parameter against val accuracy")
    p.add_argument("--storage", help="the sweep's storage URL, if it has a password")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    try:
        if bool(args.sweep) == bool(args.run_dirs):
            raise PlotError("give run folders, or --sweep SWEEP_DIR")
        out = sweep(args.out, args.sweep, args.storage) if args.sweep else curves(args.out, args.run_dirs)
    except PlotError as e:
        print(f"dist_resnet.plot: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
