"""The photo loader against what a user would otherwise write (issue 27), on the same images and cores.

    python -m dist_resnet.bench.photos --folder SRC --betons DIR --res 160 --workers 2 [--epochs 3] [--out F.json]

- **beton, host**: this project's train loader on DIR (prepare --write-mode ...), as a GPU run's host runs
  it: FFCV decodes each image and its random-resized crop at --res in --workers threads into uint8 batches
  (the conversion to float, the normalisation and the flip then run on the GPU).
- **beton, CPU run**: the same loader as a CPU run uses it (TrainData, data.crop=rrc): the float conversion,
  normalisation and flip too, on the same cores.
- **anchor**: torchvision's ImageFolder on SRC's train split + RandomResizedCrop(--res) + RandomHorizontalFlip
  + ToTensor in a DataLoader with --workers processes (PIL, whose JPEG decoder is libjpeg-turbo).

Each loader is built afresh and timed over --epochs epochs after an untimed first one (numba's compile;
the DataLoader's worker start-up), every loader and side in turn, --rounds times; reported as images per
second and per core (the cores the process may run on, at most --workers), mean ± std over every timed
epoch. It measures and prints; it never fails on time.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..fileio import write_json


def cores(workers: int) -> int:
    return max(1, min(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else workers))


def beton_rates(betons: Path, res: int, workers: int, batch: int, epochs: int, host_only: bool) -> list[float]:
    """The train loader's images per second. `host_only`: what a GPU run's host does (FFCV decodes and crops
    into uint8 batches; the float conversion, normalisation and flip then run on the GPU); else the whole
    CPU run's pipeline (TrainData on the CPU: those too, in fp32, on the same cores)."""
    from ..config import DataConfig
    from ..data.loader import Feed, TrainData
    from ..data.manifest import Betons

    b = Betons.open(betons)
    cfg = DataConfig(dir=str(betons), crop="rrc", res=res, num_workers=workers, test_res=res)
    dtype = torch.uint8 if host_only else torch.float32
    feed = Feed(torch.device("cpu"), dtype, True, b.manifest["mean"], b.manifest["std"],
                threads=torch.get_num_threads())
    data = TrainData(b, cfg, feed, batch, seed=0)
    rates = []
    for epoch in range(epochs + 1):
        t0 = time.perf_counter()
        if host_only:  # FFCV's batches as they reach the device, before Normalize/Augment
            data.crops.start(epoch)
            n = sum(x.shape[0] for x, _ in data.raw_batches(epoch))
        else:
            n = sum(x.shape[0] for _, micro in data.epoch(epoch) for x, _ in micro)
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
    return rates


def anchor_rates(folder: Path, res: int, workers: int, batch: int, epochs: int) -> list[float]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(res), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    root = folder / "train" if (folder / "train").is_dir() else folder
    loader = DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0)
    rates = []
    for epoch in range(epochs + 1):
        t0 = time.perf_counter()
        n = sum(x.shape[0] for x, _ in loader)
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
    return rates


LOADERS = {"beton, host": functools.partial(beton_rates, host_only=True),
           "beton, CPU run": functools.partial(beton_rates, host_only=False), "anchor": anchor_rates}


def measure(args) -> list[dict]:
    """Every loader at every side, --rounds times in turn (so that no loader gets only the process's first
    or last minutes: the same loader measured 2,700 and 3,900 img/s at two places in one call), as one row
    per (loader, side): the mean and std over every timed epoch of every round."""
    rates: dict = {}
    for _ in range(args.rounds):
        for res in args.res:
            for name, fn in LOADERS.items():
                src = args.folder if name == "anchor" else args.betons
                rates.setdefault((name, res), []).extend(fn(src, res, args.workers, args.batch, args.epochs))
    n_cores = cores(args.workers)
    return [{"loader": name, "res": res, "img_per_s": float(np.mean(r)),
             "img_per_s_std": float(np.std(r, ddof=1)) if len(r) > 1 else None,  # one timed epoch: no spread
             "img_per_s_per_core": float(np.mean(r)) / n_cores, "epochs": len(r)} for (name, res), r in rates.items()]


def bad_input(args) -> str | None:
    """What is wrong with the arguments, in one line, before anything is measured (None: nothing)."""
    from ..data.manifest import Betons, DataError

    if min(args.res + [args.workers, args.batch, args.epochs, args.rounds]) < 1:
        return "--res, --workers, --batch, --epochs and --rounds must be at least 1"
    if not args.folder.is_dir():
        return f"--folder {args.folder} is not a folder: give the ImageFolder the betons were written from"
    try:
        n = Betons.open(args.betons).count("train")
    except DataError as e:
        return f"--betons: {e}"
    if args.batch > n:
        return f"--batch {args.batch} is more than the {n} train images of {args.betons}: no batch would be timed"
    mismatch = same_data(args.folder, Betons.open(args.betons))
    if mismatch:
        return mismatch
    if args.out is not None and not (args.out.parent.is_dir() and os.access(args.out.parent, os.W_OK)):
        return f"--out {args.out}: {args.out.parent} is not a folder this process can write to (checked before measuring)"
    return None


def same_data(folder: Path, betons) -> str | None:
    """Why the betons were not written from `folder`'s train split (its classes and image count against the
    manifest's), or None: a comparison of two datasets would be no comparison."""
    root = folder / "train" if (folder / "train").is_dir() else folder
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    count = sum(1 for c in classes for f in (root / c).iterdir() if f.is_file() and not f.name.startswith("."))
    if classes != betons.classes or count != betons.count("train"):
        source = Path(str(betons.manifest.get("source", "?"))).name
        return (f"--betons {betons.dir} were written from {source} ({len(betons.classes)} classes, "
                f"{betons.count('train')} train images), not from --folder {folder} ({len(classes)} classes, {count} "
                "train images): give the betons that prepare wrote from this folder")
    return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dist_resnet.bench.photos", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--folder", type=Path, required=True, help="the ImageFolder the betons were written from")
    p.add_argument("--betons", type=Path, required=True, help="prepare's output for that folder (photo options)")
    p.add_argument("--res", type=int, nargs="+", default=[160, 224], help="crop sides to measure (default 160 224)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="decode threads / processes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after an untimed first one, per round")
    p.add_argument("--rounds", type=int, default=3, help="every loader and side in turn, this many times")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    problem = bad_input(args)
    if problem:
        print(f"dist_resnet.bench.photos: {problem}", file=sys.stderr)
        raise SystemExit(2)
    rows = measure(args)
    for row in rows:
        spread = f" ± {row['img_per_s_std']:4.0f}" if row["img_per_s_std"] is not None else ""
        print(f"{row['loader']:14s} {row['res']:3d} px: {row['img_per_s']:7.0f}{spread} img/s, "
              f"{row['img_per_s_per_core']:6.0f} per core ({row['epochs']} epoch{'s' if row['epochs'] > 1 else ''})")
    by = {(r["loader"], r["res"]): r["img_per_s"] for r in rows}
    for res in args.res:
        print(f"{res:3d} px: beton / anchor = {by['beton, host', res] / by['anchor', res]:.2f}x (host), "
              f"{by['beton, CPU run', res] / by['anchor', res]:.2f}x (CPU run)")
    out = {"workers": args.workers, "cores": cores(args.workers), "batch": args.batch, "rounds": args.rounds,
           "rows": rows, "folder": str(args.folder), "betons": str(args.betons), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
