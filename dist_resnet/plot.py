"""Pictures of runs, evaluations and sweeps, drawn with matplotlib's Agg backend (no display needed) and
written atomically, by rank 0, never from the hot loop.

    python -m dist_resnet.plot RUN_DIR [RUN_DIR ...] --out curves.png     # loss, accuracy, LR vs epoch
    python -m dist_resnet.plot --sweep SWEEP_DIR --out sweep.png          # history, parameter vs val accuracy

- `curves`: the training loss and the LR at every logged step, train accuracy per epoch, validation and
  test loss and accuracy per evaluation, from each run's metrics.json; every training run writes its own
  into run.dir/curves.png at the end.
- `confusion`: the confusion matrix, rows = true class, columns = predicted, each row normalised to 1,
  with the counts written in.
- `sweep`: the validation accuracy of each trial, the best so far, and each searched parameter against it.
"""
from __future__ import annotations

import io
from pathlib import Path

from . import rundir
from .fileio import atomic_write
from .sweep.space import SweepError


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


def _metrics(run_dir: Path) -> tuple[str, dict]:
    m = rundir.read_metrics(run_dir)
    if m is None:
        raise PlotError(f"{run_dir} has no readable {rundir.METRICS}: is it a run folder?")
    return Path(run_dir).name, m


class PlotError(ValueError):
    pass


# each split's line style, marker and (for a single run, where colour does not name the run) colour, the same
# in the panels and in the legends
SPLITS = {"train": ("-", "o", "C0"), "val": ("--", "s", "C1"), "test": (":", "^", "C2")}


def _per_step(m: dict) -> tuple[list, list, list]:
    """(x in epochs, train loss, LR) at every logged step (the points TensorBoard gets); runs written before
    they were kept have their epoch-end values instead."""
    spe, hist = m.get("steps_per_epoch"), rundir.history(m)
    points = [p for r in hist for p in r.get("steps", [])] if spe else []
    if points:
        return [p[0] / spe for p in points], [p[1] for p in points], [p[2] for p in points]
    return [r["epoch"] for r in hist], [r["train_loss"] for r in hist], [r["lr"] for r in hist]


def curves(path: str | Path, run_dirs: list[str | Path]) -> Path:
    return save_figure(curves_figure(run_dirs), path)


def curves_figure(run_dirs: list[str | Path]):
    """Loss, accuracy and learning rate against epoch, runs overlaid (several runs: one colour each, named once
    in the run legend; one run: a colour per split). Each split has its own line style and marker, in the
    panels and in each panel's legend alike: the training loss and the LR at every logged step, train
    accuracy per epoch, validation and test as points per evaluation, whole epochs on the axis."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    runs = [_metrics(d) for d in run_dirs]
    if not any(rundir.history(m) for _, m in runs):
        raise PlotError(f"no epoch is recorded yet in {', '.join(map(str, run_dirs))}")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    palette, single = plt.get_cmap("tab10"), len(runs) == 1  # fixed colours, whatever another plot left
    drawn: list[set] = [{"train"}, set()]  # the splits each panel shows
    for i, (name, m) in enumerate(runs):
        run_color, hist = palette(i % 10), rundir.history(m)
        x, loss, lr = _per_step(m)
        few = "o" if len(x) < 3 else None  # one or two logged steps: points, not an invisible line
        axes[0].plot(x, loss, "-", color=SPLITS["train"][2] if single else run_color, lw=1, marker=few, label=name)
        axes[2].plot(x, lr, "-", color=run_color, lw=1.2, marker=few)
        for k, (ax, metric) in enumerate(((axes[0], "loss"), (axes[1], "acc"))):
            for split, (style, marker, split_color) in SPLITS.items():
                pts = [(r["epoch"], r[f"{split}_{metric}"]) for r in hist if f"{split}_{metric}" in r]
                if pts and not (split == "train" and metric == "loss"):
                    ax.plot(*zip(*pts), style, color=split_color if single else run_color, lw=1.2, marker=marker,
                            markersize=5, label=f"_{split}")
                    drawn[k].add(split)
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate")):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    split_legend(axes[0], drawn[0], single, per_step=True, runs=None if single else [n for n, _ in runs])
    split_legend(axes[1], drawn[1], single)
    return fig


def split_legend(ax, splits: set, single: bool, per_step: bool = False, runs: list[str] | None = None) -> None:
    """The panel's legend of the splits it draws, each handle drawn as its lines are (style, marker, and the
    split's colour for one run), long enough to show a dash; with several runs, a second legend names them."""
    from matplotlib.lines import Line2D

    handles = []
    for split, (style, marker, color) in SPLITS.items():
        if split in splits:
            stepwise = per_step and split == "train"  # the per-step training loss: a line without markers
            handles.append(Line2D([], [], color=color if single else "0.3", ls=style, lw=1.2,
                                  marker=None if stepwise else marker, markersize=5,
                                  label=f"{split} (each logged step)" if stepwise else split))
    legend = ax.legend(handles=handles, fontsize=7, title="split", handlelength=4, loc="best")
    if runs:
        ax.add_artist(legend)
        ax.legend(handles=[line for line in ax.get_lines() if line.get_label() in runs], fontsize=7, title="run",
                  loc="upper center")


def sweep(path: str | Path, sweep_dir: str | Path, storage: str | None = None) -> Path:
    """A sweep's history (each trial's validation accuracy and the best so far) and each searched parameter
    against validation accuracy; complete trials as dots, pruned ones as crosses at their last epoch."""
    from .sweep.storage import load_study

    study, meta = load_study(Path(sweep_dir), storage)
    return save_figure(sweep_figure(study, meta, str(sweep_dir)), path)


def sweep_figure(study, meta: dict, where: str = "the sweep"):
    from matplotlib.ticker import MaxNLocator

    from .sweep.results import rows

    plt = _pyplot()
    params = meta["params"]
    table = [r for r in rows(study, params)[0] if r["state"] in ("complete", "pruned") and r["val_acc"] is not None]
    done = [r for r in table if r["state"] == "complete"]
    if not done:
        raise PlotError(f"{where}: no trial has completed yet")
    fig, axes = plt.subplots(1, 1 + len(params), figsize=(5 * (1 + len(params)), 4.5), squeeze=False, sharey=True,
                             layout="constrained")
    fig.suptitle(f"sweep {study.study_name}: validation accuracy of each trial")
    ax = axes[0][0]
    _points(ax, table, "trial")
    best, xs = [], [r["trial"] for r in done]
    for r in done:
        best.append(max(r["val_acc"], best[-1]) if best else r["val_acc"])
    ax.step(xs, best, where="post", color="C3", label="best so far")  # flat until a trial beats it
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel="validation accuracy", title="history")
    for ax, key in zip(axes[0][1:], params):
        kind, values = meta.get("space", {}).get(key, ["float", []])
        if kind == "choice":  # one place per choice, labelled with its value (numbers and names alike)
            where = {str(v): i for i, v in enumerate(values)}
            _points(ax, [{**r, "x": where.get(str(r[key]), -1)} for r in table], "x")
            ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=30 if len(values) > 4 else 0)
            ax.set_xlim(-0.5, len(values) - 0.5)
        else:
            _points(ax, table, key)
            if kind == "log":
                _log_axis(ax)
            elif kind == "int":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel=f"{key} ({kind})", title=key)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)  # the markers mean the same in every panel
    return fig


def _points(ax, table: list[dict], x: str) -> None:
    for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "0.5")):
        pts = [(r[x], r["val_acc"]) for r in table if r["state"] == state]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, s=28, label=state, zorder=3)


def _log_axis(ax) -> None:
    """A log axis labelled at its decades only when it spans one or more; within one decade, at a few plain
    numbers: matplotlib's minor labels (3e-1, 4e-1, ...) otherwise run into each other."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = ax.get_xlim()
    if hi / lo < 10:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))


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
    except (PlotError, SweepError) as e:
        print(f"dist_resnet.plot: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
