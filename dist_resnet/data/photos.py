"""Write an ImageNet-style folder of mixed-size photos as variable-resolution FFCV betons (issue 27).

    python -m dist_resnet.data.prepare --source SRC --out DIR --write-mode smart [--max-resolution 512]
        [--jpeg-quality 90] [--compress-probability 0.5] [--workers N]

Each image is kept at its own size (its longer side brought down to --max-resolution, area-averaged, as
FFCV's RGBImageField does) and stored as FFCV's write mode says: `raw` (lossless, large, fastest to
decode), `jpg` (JPEG at --jpeg-quality), `smart` (JPEG where the raw image would take more than
SMART_BYTES, raw below), `proportion` (JPEG for a random --compress-probability of the images, FFCV's
ImageNet recipe; FFCV draws which in its writer processes, so that choice is not reproducible). The
training loader then crops and resizes while it decodes (dist_resnet.data.crops).

A first pass reads every image once at reduced scale (JPEG's DCT scaling: PIL's draft mode): it names
any file that is not a readable image before anything is written, and gives the size distribution and
the per-channel mean and std that the manifest records. The write goes to a temporary folder beside
DIR, by several processes, and lands with the manifest last, so a failure leaves DIR as it was.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..fileio import sha256
from .beton import table
from .manifest import SPLITS, PrepareError

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
SMART_BYTES = 256 * 256 * 3  # `smart`: an image stored raw would take more than a 256 x 256 one: JPEG
DRAFT = 64  # the first pass decodes at about this size (at least), which JPEG's DCT scaling makes cheap


@dataclass(frozen=True)
class Storage:
    """How the images are stored (FFCV RGBImageField's arguments)."""

    write_mode: str = "smart"
    max_resolution: int = 512
    jpeg_quality: int = 90
    compress_probability: float = 0.5

    def problem(self) -> str | None:
        if self.write_mode not in WRITE_MODES:
            return f"--write-mode must be one of {', '.join(WRITE_MODES)}, not {self.write_mode!r}"
        if self.max_resolution < 8:
            return f"--max-resolution must be at least 8 (pixels of the longer side), not {self.max_resolution}"
        if not 1 <= self.jpeg_quality <= 100:
            return f"--jpeg-quality must be in 1..100, not {self.jpeg_quality}"
        if not 0.0 <= self.compress_probability <= 1.0:
            return f"--compress-probability must be in [0, 1], not {self.compress_probability}"
        return None


def scan(path: str) -> tuple[tuple[int, int], str, np.ndarray | None, str | None]:
    """One image's (height, width), mode and per-channel [sum, sum of squares, pixels] at draft scale, or
    the reason it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size, mode = (im.height, im.width), im.mode
            im.draft("RGB", (DRAFT, DRAFT))  # JPEG only: decode at 1/2..1/8 scale, the whole stream still read
            px = np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return (0, 0), "", None, f"{path} is not a readable image ({type(e).__name__}: {e})"
    return size, mode, np.stack([px.sum(0), (px * px).sum(0), np.full(3, len(px))]), None


def stored_size(h: int, w: int, max_resolution: int) -> tuple[int, int]:
    """The size FFCV's RGBImageField stores an h x w image at (its `resizer`)."""
    ratio = max_resolution / max(h, w)
    return (int(ratio * h), int(ratio * w)) if ratio < 1 else (h, w)


def survey(files: list[tuple[Path, int]], split: str, workers: int, storage: Storage, modes: Counter):
    """Scan a split: (stored sizes N x 2, per-channel sums) or a PrepareError naming the unreadable files."""
    sizes, sums, bad = [], np.zeros((3, 3)), []
    with ProcessPoolExecutor(workers) as pool:
        scans = zip((f for f, _ in files), pool.map(scan, [str(f) for f, _ in files], chunksize=64))
        for path, ((h, w), mode, s, err) in tqdm(scans, total=len(files), desc=f"scan {split}", unit="img"):
            stored = stored_size(h, w, storage.max_resolution) if err is None else (0, 0)
            if err is None and min(stored) < 1:  # FFCV's resize to 0 px fails in its writer process
                err = (f"{path} is {w}x{h}: with its longer side brought to --max-resolution {storage.max_resolution}, "
                       f"it would be {stored[1]}x{stored[0]} px")
            if err is not None:
                bad.append(err)
                continue
            sizes.append(stored)
            sums += s
            modes[mode] += 1
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise PrepareError(f"{len(bad)} file(s) in {split} cannot be read or stored: {'; '.join(bad[:3])}{more}. "
                           "Remove or replace them, then run prepare again")
    return np.array(sizes, dtype=np.int64), sums


def distribution(sizes: np.ndarray) -> dict:
    """The stored sizes of a split: extremes, median and a histogram of the shorter side."""
    short = sizes.min(1)
    edges = [0, 64, 128, 192, 256, 384, 512, 1 << 30]
    hist = np.histogram(short, bins=edges)[0]
    labels = [f"<{b}" for b in edges[1:-1]] + [f">={edges[-2]}"]
    return {"min_hw": sizes.min(0).tolist(), "median_hw": np.median(sizes, 0).astype(int).tolist(),
            "max_hw": sizes.max(0).tolist(), "shorter_side": {k: int(n) for k, n in zip(labels, hist)}}


class Photos:
    """(H x W x 3 uint8, label) of each file, decoded in FFCV's writer processes."""

    def __init__(self, files: list[tuple[Path, int]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8), label


def write(path: Path, files: list[tuple[Path, int]], storage: Storage, workers: int) -> int:
    """Write one split's beton; the number of images stored as JPEG."""
    from ffcv.fields import IntField, RGBImageField

    from . import writer

    image = RGBImageField(write_mode=storage.write_mode, max_resolution=storage.max_resolution,
                          smart_threshold=SMART_BYTES, jpeg_quality=storage.jpeg_quality,
                          compress_probability=storage.compress_probability)
    writer.write(path, {"image": image, "label": IntField()}, Photos(files), workers, chunksize=64)
    return int((table(str(path))["image"]["mode"] == 0).sum())


def write_photos(tmp: Path, names: list[str], items: dict, storage: Storage, workers: int | None,
                 source: str) -> dict:
    """Scan and write both splits of an ImageFolder tree into `tmp`; the manifest (not yet written)."""
    workers = workers or min(8, os.cpu_count() or 1)
    modes: Counter = Counter()
    surveyed = {s: survey(items[s], s, workers, storage, modes) for s in SPLITS}
    sums = surveyed["train"][1]
    mean = sums[0] / sums[2]
    manifest = {
        "format": 1,
        "source": source,
        "classes": names,
        "image_shape": None,  # variable: the loader crops and resizes (data.crop, data.res, data.test_res)
        "variable_resolution": True,
        "storage": asdict(storage) | {"smart_threshold_bytes": SMART_BYTES},
        "converted_modes": {m: n for m, n in sorted(modes.items()) if m != "RGB"},
        # per-channel statistics of the train split, in [0, 1], at draft scale (JPEG: 1/2 to 1/8)
        "mean": mean.round(6).tolist(),
        "std": np.sqrt(np.maximum(sums[1] / sums[2] - mean ** 2, 1e-12)).round(6).tolist(),
    }
    for split in SPLITS:
        path = tmp / f"{split}.beton"
        jpeg = write(path, items[split], storage, workers)
        labels = np.array([label for _, label in items[split]])
        manifest[split] = {"file": path.name, "count": len(labels), "bytes": path.stat().st_size,
                           "sha256": sha256(path), "class_counts": np.bincount(labels, minlength=len(names)).tolist(),
                           "stored_jpeg": jpeg, "sizes": distribution(surveyed[split][0])}
    return manifest
