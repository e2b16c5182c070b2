"""Test data for the photo path (issue 27): ImageFolder trees of mixed-size images, made here.

- `mixed(root)`: synthetic photos of 48-400 px with odd aspect ratios, saved as RGB, grey (L) and CMYK
  JPEGs and an RGBA PNG, so prepare meets what an ImageNet-style folder holds.
- `upscaled(tarball, root)`: the shared CIFAR-10 JPEG copy (real labels), each image upscaled at random
  to 64-160 px on its longer side with its own aspect ratio, to show that the pipeline learns.

    python tests/photos.py mixed DIR
    python tests/photos.py upscaled ../shared/data/cifar10-jpeg.tar.gz DIR [N per class] [MIN MAX longer side]
"""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("RGB", "RGB", "L", "CMYK", "RGBA")  # every fifth image a PNG with alpha


def _picture(rng: np.random.Generator, h: int, w: int, label: int, noise: float = 12, cycles: int = 6) -> np.ndarray:
    """A smooth picture whose colour and stripe direction carry the label, with noise on top."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    angle = np.pi * label / 4
    wave = np.sin(2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
    base = np.array([60 + 50 * label, 200 - 40 * label, 120 + 30 * (label % 2)], dtype=np.float64)
    img = base[None, None] + 60 * wave[..., None] + rng.normal(0, noise, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def mixed(root: Path, classes: int = 3, per_split: dict | None = None, seed: int = 0, sides=(48, 400),
          noise: float = 12, cycles: int = 6) -> Path:
    """train/<class>/ and test/<class>/ of synthetic photos, `sides` px (48-400) on each side, several modes,
    with `cycles` stripes across and pixel noise of std `noise` (noise 0 and few cycles: smooth, as a photo
    is, where a sub-pixel shift changes little)."""
    per_split = per_split or {"train": 8, "test": 4}
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in per_split.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
                im = Image.fromarray(_picture(rng, h, w, c, noise, cycles))
                mode = MODES[k % len(MODES)]
                k += 1
                if mode == "RGBA":
                    im.convert("RGBA").save(folder / f"{i:03d}.png")
                else:
                    im.convert(mode).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def upscaled(tarball: Path, root: Path, per_class: int | None = None, test_per_class: int | None = None,
             seed: int = 0, sides=(64, 160)) -> Path:
    """The CIFAR-10 JPEG copy, upscaled: each image to a random longer side in `sides` (64-160 px) and a
    random aspect ratio in [3/4, 4/3], bicubic, saved as JPEG quality 90. `per_class`: only the first N
    of each class."""
    rng = np.random.default_rng(seed)
    counts: dict = {}
    limit = {"train": per_class, "test": test_per_class if test_per_class is not None else per_class}
    with tarfile.open(tarball) as tar:
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            parts = Path(member.name).parts
            split, cls = next(((p, parts[i + 1]) for i, p in enumerate(parts) if p in ("train", "test")), (None, None))
            if split is None:
                continue
            n = counts.get((split, cls), 0)
            if limit[split] is not None and n >= limit[split]:
                continue
            counts[(split, cls)] = n + 1
            with Image.open(tar.extractfile(member)) as im:
                im = im.convert("RGB")
                side, ratio = int(rng.integers(sides[0], sides[1] + 1)), float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
                w, h = (side, round(side / ratio)) if ratio >= 1 else (round(side * ratio), side)
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                im.resize((w, h), Image.BICUBIC).save(folder / f"{Path(member.name).stem}.jpg", quality=90)
    return root


if __name__ == "__main__":
    if sys.argv[1] == "mixed":
        print(mixed(Path(sys.argv[2])))
    else:
        n = int(sys.argv[4]) if len(sys.argv) > 4 else None
        sides = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (64, 160)
        print(upscaled(Path(sys.argv[2]), Path(sys.argv[3]), n, sides=sides))
