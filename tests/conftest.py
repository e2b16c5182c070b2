"""Shared fixtures. Everything runs on CPU on a committed real subset of the shared
CIFAR-10 JPEG copy (tests/data/cifar10-subset.tar.gz: 500 train + 100 test images
per class). Betons are written once per session: FFCV's numba compile per Loader
is the suite's main cost, so loaders are built sparingly."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "tests" / "data" / "cifar10-subset.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="session")
def subset_dir(tmp_path_factory) -> Path:
    """The subset as an ImageFolder: train/<class>/*.jpg, test/<class>/*.jpg."""
    d = tmp_path_factory.mktemp("subset")
    with tarfile.open(SUBSET) as tar:
        tar.extractall(d, filter="data")
    return d


@pytest.fixture(scope="session")
def source_images(subset_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split decoded with Pillow, in ImageFolder order (class, then file name)."""
    from PIL import Image

    out = {}
    for split in ("train", "test"):
        images, labels = [], []
        for label, name in enumerate(CLASSES):
            for f in sorted((subset_dir / split / name).iterdir()):
                with Image.open(f) as im:
                    images.append(np.asarray(im.convert("RGB")))
                labels.append(label)
        out[split] = (np.stack(images), np.array(labels))
    return out


@pytest.fixture(scope="session")
def betons(tmp_path_factory) -> Path:
    from dist_resnet.data.prepare import prepare

    out = tmp_path_factory.mktemp("betons") / "cifar10"
    prepare(str(SUBSET), out, workers=2)
    return out


def run(args: list[str], timeout: float = 600, env: dict | None = None, check: bool = True,
        cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's environment; show its output when it fails."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def python_module(module: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", module, *args], **kw)
