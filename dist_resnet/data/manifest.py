"""A prepared data folder: `manifest.json` beside `train.beton` and `test.beton`, opened and checked once.

`Betons.open(dir)` reads the manifest, checks the fields every reader needs and each beton's size (and,
with `verify`, its sha256). Everything downstream (the loaders, the trainer, evaluate, export) takes the
opened `Betons` and never reads the manifest again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fileio import sha256
from .beton import table

PREPARE = "python -m dist_resnet.data.prepare --source SRC --out DIR"
SOURCES = ("SRC: torchvision (CIFAR-10), or your ImageFolder directory or tarball, train/<class>/* and "
           "test/<class>/*; add --write-mode smart for photos of mixed sizes")
PREPARE_HINT = f"create it with: {PREPARE} ({SOURCES})"
REPREPARE = f"prepare it again: {PREPARE} --force ({SOURCES})"
SPLITS = ("train", "test")


class DataError(RuntimeError):
    """Data that cannot be used; the message names the file and the command that remakes it."""


class PrepareError(RuntimeError):
    """Bad source data for prepare; the message names the file or folder and what to do."""


def _manifest_problem(m: object) -> str | None:
    """What is wrong with a parsed manifest, or None."""
    if not isinstance(m, dict):
        return "it is not a JSON object"
    classes = m.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "'classes' must be a non-empty list of names"
    for key in ("mean", "std"):
        v = m.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            return f"'{key}' must be 3 numbers (one per RGB channel)"
    if not all(x > 0 for x in m["std"]):
        return "'std' must be > 0"
    for split in SPLITS:
        entry = m.get(split)
        if not isinstance(entry, dict):
            return f"'{split}' is missing"
        if not isinstance(entry.get("count"), int) or entry["count"] < 1:
            return f"'{split}.count' must be a positive integer"
        if not isinstance(entry.get("sha256"), str):
            return f"'{split}.sha256' is missing"
        if "bytes" in entry and not isinstance(entry["bytes"], int):
            return f"'{split}.bytes' must be an integer"
    return None


def read_manifest(data_dir: str | Path) -> dict:
    """The folder's manifest.json, checked for the fields every reader needs; DataError otherwise."""
    d = Path(data_dir)
    path = d / "manifest.json"
    if not path.is_file():
        raise DataError(f"data.dir={d} has no manifest.json; {PREPARE_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); {REPREPARE}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is incomplete or damaged: {problem}; {REPREPARE}")
    for split in SPLITS:
        if not (d / f"{split}.beton").is_file():
            raise DataError(f"{d / split}.beton is missing; {REPREPARE}")
    return manifest


def check_betons(data_dir: str | Path, manifest: dict, hashes: bool = False) -> None:
    """Every beton's size (cheap, always) and, with `hashes`, its sha256 against the manifest."""
    d = Path(data_dir)
    for split in SPLITS:
        path, entry = d / f"{split}.beton", manifest[split]
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise DataError(f"{path} has {size} bytes but the manifest says {entry['bytes']}: it is truncated or "
                            f"damaged; {REPREPARE}")
        if hashes and sha256(path) != entry["sha256"]:
            raise DataError(f"{path} does not match the sha256 in the manifest: it is damaged; "
                            f"{REPREPARE}")


@dataclass(frozen=True)
class Betons:
    """An opened data folder: its path and its checked manifest."""

    dir: Path
    manifest: dict

    @classmethod
    def open(cls, data_dir: str | Path, verify: bool = False) -> "Betons":
        """Read and check `data_dir` once: the manifest, the betons' sizes and, with `verify`, their sha256."""
        manifest = read_manifest(data_dir)
        check_betons(data_dir, manifest, hashes=verify)
        return cls(Path(data_dir), manifest)

    def path(self, split: str) -> str:
        return str(self.dir / f"{split}.beton")

    def count(self, split: str) -> int:
        return self.manifest[split]["count"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of the images (manifests before `image_shape` held CIFAR's 32x32); photo betons
        have no one size (dist_resnet.data.sizes gives what the loaders make of them)."""
        if self.manifest.get("variable_resolution"):
            raise DataError(f"{self.dir} holds photos of many sizes, not one: set data.res and data.test_res")
        h, w = (self.manifest.get("image_shape") or [32, 32])[:2]
        return int(h), int(w)

    @property
    def sha256(self) -> dict[str, str]:
        return {s: self.manifest[s]["sha256"] for s in SPLITS}

    def train_labels(self) -> np.ndarray:
        """The train beton's labels, from its metadata table (no image is decoded)."""
        return self.labels("train")

    def labels(self, split: str) -> np.ndarray:
        """A beton's labels, from its metadata table (no image is decoded)."""
        rows = table(self.path(split))
        if rows is not None:
            return rows["label"].astype(np.int64)
        from ffcv.reader import Reader  # a beton of other fields: FFCV reads its tables

        reader = Reader(self.path(split))
        return np.asarray(reader.metadata[f"f{list(reader.handlers).index('label')}"], dtype=np.int64)
