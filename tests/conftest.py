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

# pytest-xdist workers share the cores: each worker's runs (and the ranks they start) take its share, at
# least one thread, as a rank reads $OMP_NUM_THREADS (distributed.DistEnv.threads). Two workers that each
# ran 2 threads on 2 cores trained 2.2x slower than with 1 each (docs/BENCHMARKS.md).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

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


# The test files, longest first (their seconds in the suite of 2026-12-06, --durations=0): pytest-xdist
# (--dist loadfile --no-loadscope-reorder) hands files to its workers in collection order, so the long ones start
# first and the short ones fill the gaps at the end, where a long file would leave the other workers idle.
# test_slurm.py waits on Slurm much of its time: it starts early, beside the longest.
LONGEST_FIRST = ["test_slurm.py", "test_multinode.py", "test_tracking.py", "test_prune.py",  # 120 155 107 ~150
                 "test_reliability.py", "test_photos.py", "test_sweep.py", "test_distributed.py",  # 90 79 73 72
                 "test_finetune.py", "test_distill.py", "test_adversarial_training.py",
                 "test_adversarial.py", "test_train.py", "test_bench.py", "test_explain.py",  # 66 63 ~60 62 54 ~100 42
                 "test_shipping.py", "test_loader.py", "test_host_sync.py", "test_precision.py", "test_prepare.py",  # 35 33 27 25 25
                 "test_early_stop.py", "test_config.py", "test_mix.py", "test_folds.py", "test_int8.py",  # 25 24 22 22 21
                 "test_predict_export.py", "test_gpu_paths.py", "test_models.py"]  # 12 12 7; the rest under a second


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: order within a file kept


def shared(tmp_path_factory, name: str, build) -> Path:
    """A folder built once per test session and shared by the xdist workers: the first worker that asks
    builds it (`build(path)`), under a file lock; the others wait for it and reuse it. Treat it as
    read-only."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, not the worker's
    path, done = root / "shared" / name, root / "shared" / f"{name}.done"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(root / "shared" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def betons(tmp_path_factory) -> Path:
    from dist_resnet.data.prepare import prepare

    return shared(tmp_path_factory, "cifar10", lambda out: prepare(str(SUBSET), out, workers=2))


TRAINED_EPOCHS = 4


@pytest.fixture(scope="session")
def trained_run(betons, tmp_path_factory) -> Path:
    """The one trained checkpoint of the suite: the `cpu` preset for 4 epochs on the subset, through the
    CLI's main() (~54 % test accuracy). Read-only: copy it before changing anything."""
    import contextlib
    import io

    from dist_resnet import train

    def build(run_dir: Path) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            train.main(["--config", str(ROOT / "configs" / "cpu.yaml"), f"data.dir={betons}", f"run.dir={run_dir}",
                        f"train.epochs={TRAINED_EPOCHS}", "train.precision=fp32",  # as TINY: the same on every CPU
                        "run.progress=false"])
        (run_dir / "stdout.txt").write_text(out.getvalue())

    return shared(tmp_path_factory, "trained_run", build)


def image_folder(root: Path, subset_dir: Path, per_class: dict[str, int], classes=CLASSES) -> Path:
    """A real ImageFolder of the first files of each class of the subset."""
    import shutil

    for split, n in per_class.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((subset_dir / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


@pytest.fixture(scope="session")
def tiny_betons(tmp_path_factory, subset_dir) -> Path:
    """1,000 train and 200 test images (100 and 20 per class): for the tests that start many runs
    (kills, resumes, refusals), where what is checked is exactness, not accuracy."""
    from dist_resnet.data.prepare import prepare

    def build(root: Path) -> None:  # once per session, not per xdist worker (36 s of CPU each)
        src = image_folder(root / "src", subset_dir, {"train": 100, "test": 20})
        prepare(str(src), root / "betons", workers=2)

    return shared(tmp_path_factory, "tiny", build) / "betons"


# the tiny runs: resnet9 at width 8, 10 steps of 100 per epoch, in fp32 on every CPU (the preset's `auto` is
# bf16 where the CPU has it: tests/test_precision.py covers that choice), without the PNGs at the end (a quarter
# of a tiny run's CPU; the tests of the pictures set run.pictures=true)
TINY = ["--config", str(ROOT / "configs" / "cpu.yaml"), "model.width=8", "train.batch_size=100", "run.progress=false",
        "data.num_workers=1", "train.log_every=5", "train.precision=fp32", "run.pictures=false"]


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


# the resume tests carry the state that is easiest to lose: lookahead's slow weights (every 3 steps, so a
# stop falls between two syncs) and the derandomised flip; tiny data, so several epochs are cheap
RESUME = [*TINY[2:], "train.epochs=4", "optim.lookahead_every=3", "data.flip_alternate=true",
          "data.translate_pad=reflect", "train.stop_check_every=2"]


def resume_argv(tiny_betons, run_dir, *overrides) -> list[str]:
    return [*TINY[:2], *RESUME, f"data.dir={tiny_betons}", f"run.dir={run_dir}", *overrides]


@pytest.fixture(scope="session")
def reference_2rank(tiny_betons, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank, 4-epoch run: what every interrupted run (torchrun, Slurm) must reproduce.
    Built once per session and shared by the xdist workers. Read-only."""
    from tests.launch import launch

    def build(path: Path) -> None:
        path.mkdir(parents=True)
        codes = launch("dist_resnet.train", resume_argv(tiny_betons, path / "run"), path / "log", 2)
        assert codes == [0, 0], (path / "log").read_text()

    return shared(tmp_path_factory, "reference_2rank", build) / "run"


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's eager backend: dynamo traces and guards as on a GPU, nothing is built."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: compile_(model, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    yield lambda: counters["stats"]["unique_graphs"]  # how many graphs dynamo has built so far
    torch._dynamo.reset()
