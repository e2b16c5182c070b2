"""FFCV loaders for the betons written by `dist_resnet.data.prepare`.

FFCV decodes, batches and copies to the device (in the AMP dtype, channels_last
when asked); normalisation and the seeded augmentations then run on the device.

- Train: a permutation per epoch from (seed, epoch), cut into global batches that
  each rank slices (GlobalBatchOrder): disjoint shards, no padding, the same
  global order for any world size; drop_last.
- Test: an exact partition `rank::world` in SEQUENTIAL order with no padding, so
  the test images summed over ranks are each counted exactly once.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from ffcv.loader import Loader as FFCVLoader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.traversal_order.base import TraversalOrder

from ..config import DataConfig, Pad, Pipeline
from .augment import AlternateFlips, Augment, Normalize, derive_seed

PREPARE_HINT = "create it with: python -m dist_resnet.data.prepare --source torchvision --out DIR"
SPLITS = ("train", "test")


class DataError(RuntimeError):
    pass


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
        raise DataError(f"{path} is not valid JSON ({e}); re-run prepare: {PREPARE_HINT} --force") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is incomplete or damaged: {problem}; re-run prepare: {PREPARE_HINT} --force")
    for split in SPLITS:
        if not (d / f"{split}.beton").is_file():
            raise DataError(f"{d / split}.beton is missing; {PREPARE_HINT} --force")
    return manifest


def image_shape(manifest: dict) -> tuple[int, int]:
    """(height, width) of the betons' images (manifests before `image_shape` held CIFAR's 32x32)."""
    h, w = (manifest.get("image_shape") or [32, 32])[:2]
    return int(h), int(w)


def check_betons(data_dir: str | Path, manifest: dict, hashes: bool = False) -> None:
    """Every beton's size (cheap, always) and, with `hashes`, its sha256 against the manifest."""
    from .prepare import sha256

    d = Path(data_dir)
    for split in SPLITS:
        path, entry = d / f"{split}.beton", manifest[split]
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise DataError(f"{path} has {size} bytes but the manifest says {entry['bytes']}: it is truncated or "
                            f"damaged; re-run prepare: {PREPARE_HINT} --force")
        if hashes and sha256(path) != entry["sha256"]:
            raise DataError(f"{path} does not match the sha256 in the manifest: it is damaged; "
                            f"re-run prepare: {PREPARE_HINT} --force")


def _workers(cfg: DataConfig) -> int:
    """FFCV's decode threads; numba refuses more threads than this machine has cores."""
    return max(1, min(cfg.num_workers, os.cpu_count() or 1))


def to_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _pipelines(device: torch.device, dtype: torch.dtype) -> dict:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage

    cuda = device.type == "cuda"
    # ToTorchImage(channels_last=True) is a free NHWC->NCHW view; its False path returns CPU tensors
    # even after ToDevice(cuda), so the memory format is changed on the device instead (to_format)
    return {
        "image": [SimpleRGBImageDecoder(), ToTensor(), ToDevice(device, non_blocking=cuda),
                  ToTorchImage(channels_last=True), Convert(dtype)],
        "label": [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=cuda), Squeeze(1)],
    }


class _EpochIterator(EpochIterator):
    """FFCV's decode thread, made to hand its error to the consumer. FFCV's own thread dies on an
    exception and leaves the consumer waiting forever on its queue (a hung rank, then a hung job)."""

    error: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self.error = e
            while not self.terminate_event.is_set():  # wake the consumer
                try:
                    self.output_queue.put(None, timeout=0.5)
                    return
                except queue.Full:
                    pass

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                e = self.error
                raise DataError(f"reading {self.loader.fname} failed in FFCV's decode thread ({type(e).__name__}: "
                                f"{e}); the beton may be damaged: python -m dist_resnet.data.prepare --verify "
                                f"{Path(self.loader.fname).parent}") from e
            raise


class Loader(FFCVLoader):
    """FFCV's Loader with an epoch iterator that reports its decode thread's errors."""

    def __iter__(self) -> _EpochIterator:  # FFCV 1.0.2's __iter__, with _EpochIterator
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        selected_order = order[:len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        return _EpochIterator(self, selected_order)


def _iterate(loader: Loader, threads: int | None) -> Iterator:
    """One epoch of `loader`, ended cleanly however it is left. FFCV sets torch's thread count to its
    worker count (in `iter` and again in its decode thread); `threads` is set back after the first batch,
    which the decode thread can only deliver after it has made its own call."""
    batches = iter(loader)
    try:
        for i, batch in enumerate(batches):  # not `yield from`: on close it would end FFCV's memory
            if i == 0 and threads:            # context under the still running thread, whose page reads
                torch.set_num_threads(threads)  # could then hang
            yield batch
    finally:
        stop_epoch(batches)


class GlobalBatchOrder(TraversalOrder):
    """A sample order that does not depend on the world size.

    Each epoch draws one permutation from (seed, epoch) and cuts it into global
    batches; rank r takes the r-th contiguous slice of every global batch. So 1 rank
    with batch 2B sees, step for step, the union of what 2 ranks with batch B see,
    with no padded duplicates, and a run can resume at any step on any world size.
    (FFCV's `distributed=True` wraps DistributedSampler, whose order and padding
    change with the world size; this replaces it.)
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int, indices: np.ndarray | None = None):
        self.n, self.global_batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.indices = indices  # the beton index of each of the n positions (None: the identity)
        self.steps = n // global_batch
        self.skip: tuple[int, int] | None = None  # (epoch, steps): resume mid-epoch

    def __call__(self, loader) -> "GlobalBatchOrder":  # FFCV instantiates orders with the loader
        self.loader = loader
        return self

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's global order: step s takes samples [s * global_batch, (s + 1) * global_batch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)[: self.steps * self.global_batch]

    def sample_order(self, epoch: int) -> np.ndarray:
        """This rank's samples of the epoch, as beton indices (what FFCV asks for)."""
        positions = self.positions(epoch)
        return positions if self.indices is None else self.indices[positions]

    def positions(self, epoch: int) -> np.ndarray:
        """This rank's samples of the epoch, as positions 0..n-1 (a held-out split leaves gaps in the beton)."""
        perm = self.permutation(epoch)
        start = 0
        if self.skip is not None and self.skip[0] == epoch:
            start, self.skip = self.skip[1], None
        share = self.global_batch // self.world
        batches = perm.reshape(self.steps, self.global_batch)
        return np.ascontiguousarray(batches[start:, self.rank * share:(self.rank + 1) * share]).reshape(-1)


def train_labels(data_dir: str | Path) -> np.ndarray:
    """The train beton's labels, from its metadata table (no image is decoded)."""
    from ffcv.reader import Reader

    reader = Reader(str(Path(data_dir) / "train.beton"))
    return np.asarray(reader.metadata[f"f{list(reader.handlers).index('label')}"], dtype=np.int64)


def split_indices(cfg: DataConfig) -> tuple[np.ndarray | None, np.ndarray]:
    """(train, val) indices into the train beton: `val_fraction` of every class held out, drawn from
    `val_seed` alone, so every rank, world size, seed and sweep trial sees the same split.
    Without a split: (None, no indices), and training uses the whole beton."""
    if not cfg.val_fraction:
        return None, np.arange(0)
    labels = train_labels(cfg.dir)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(cfg.val_fraction * len(members)))
        val.append(np.random.default_rng([cfg.val_seed, int(c)]).choice(members, k, replace=False))
    val = np.sort(np.concatenate(val))
    if len(val) == 0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} holds out no image of the {len(labels)} train images; "
                        "raise it")
    return np.setdiff1d(np.arange(len(labels)), val), val


class TrainData:
    """`for step, micro_batches in data.epoch(e)`: normalised, augmented batches on the device.

    One optimizer step takes `global_batch` samples: `accum` micro-batches of
    global_batch / (world * accum) on each rank.
    """

    def __init__(self, cfg: DataConfig, global_batch: int, seed: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, rank: int = 0, world: int = 1, accum: int = 1, threads: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, indices: np.ndarray | None = None):
        """`mean`/`std` (in [0, 1]) default to the manifest's. Translation and cutout are given in pixels
        of a 32-pixel image and scale with the images' shorter side. `indices`: the train beton's images to
        train on (default: all; a validation split holds some out)."""
        manifest = read_manifest(cfg.dir)
        n = manifest["train"]["count"] if indices is None else len(indices)
        if global_batch % (world * accum):
            raise DataError(
                f"train.batch_size={global_batch} (global) does not divide by world size {world} x "
                f"train.accum_steps {accum}; use a multiple of {world * accum}"
            )
        if n < global_batch:
            raise DataError(
                f"the global batch of {global_batch} is larger than the {n} train images, so an epoch would "
                f"have no step; lower train.batch_size (each of {world} ranks would take {global_batch // world})"
            )
        self.seed, self.rank, self.world, self.accum = seed, rank, world, accum
        self.global_batch, self.micro = global_batch, global_batch // (world * accum)
        self.channels_last, self.cfg, self.device, self.threads = channels_last, cfg, device, threads
        self.order = GlobalBatchOrder(n, global_batch, seed, rank, world, indices)
        self.indices = np.arange(n) if indices is None else indices
        self.resident = None
        if cfg.pipeline == Pipeline.device:  # the same order, gathered from device memory
            self.resident = read_resident(cfg, "train", self.indices, device, dtype, channels_last)
        else:
            self.loader = Loader(
                str(Path(cfg.dir) / "train.beton"), batch_size=self.micro, num_workers=_workers(cfg),
                os_cache=cfg.os_cache, order=self.order, seed=seed,
                pipelines=_pipelines(device, dtype), drop_last=True, batches_ahead=cfg.batches_ahead,
            )
        self.normalize = Normalize(mean or manifest["mean"], std or manifest["std"], device, dtype)
        side = min(image_shape(manifest))
        translate, cutout = round(cfg.translate * side / 32), round(cfg.cutout * side / 32)
        if cfg.translate_pad == Pad.reflect and translate >= side:
            raise DataError(f"data.translate_pad=reflect needs a translation below the image side ({side} px); "
                            f"data.translate={cfg.translate} gives {translate} px")
        self.augment = Augment(cfg.flip, translate, cutout, device, Pad(cfg.translate_pad).value)
        self.flips = AlternateFlips(seed, n, device) if cfg.flip_alternate else None
        if threads:
            torch.set_num_threads(threads)  # FFCV's Loader set it to its worker count

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        return self.order.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        self.order.skip = (epoch, start_step) if start_step else None
        share = self.global_batch // self.world
        step, micro = start_step, []
        flips = None
        if self.flips is not None:  # one host-to-device copy per epoch
            flips = self.flips.epoch(epoch, torch.from_numpy(self.order.permutation(epoch)).to(self.device))
        for x, y in self.raw_batches(epoch):
            offset = self.rank * share + len(micro) * self.micro
            x = to_format(self.normalize(x), self.channels_last)
            first = step * self.global_batch + offset
            x = self.augment(x, derive_seed(self.seed, epoch, step), offset, self.global_batch,
                             None if flips is None else flips[first:first + len(x)])
            micro.append((x, y.clone()))  # FFCV reuses its buffers; x is already a new tensor
            if len(micro) == self.accum:
                yield step, micro
                step, micro = step + 1, []

    def sample_images(self, n: int) -> torch.Tensor:
        """`n` train images drawn from the seed (the same on every rank), normalised, in fp32, for
        data-dependent initialisation. Betons are written class by class, so this is not a prefix."""
        rng = np.random.default_rng([self.seed, 0x5A3])
        idx = np.sort(rng.choice(self.order.n, min(n, self.order.n), replace=False))  # positions
        if self.resident is not None:
            images = self.resident[0][torch.from_numpy(idx).to(self.device)]
        else:
            images = read_resident(self.cfg, "train", self.indices[idx], self.device, torch.float32,
                                   self.channels_last)[0]
        return self.normalize(images.float()).float()

    def raw_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the epoch, before normalisation and augmentation."""
        if self.resident is None:
            self.loader.next_epoch = epoch  # FFCV asks self.order for the epoch's indices
            yield from _iterate(self.loader, self.threads)
            return
        images, labels = self.resident
        order = torch.from_numpy(self.order.positions(epoch).astype(np.int64)).to(images.device)
        for i in range(len(order) // self.micro):
            idx = order[i * self.micro:(i + 1) * self.micro]
            yield images[idx], labels[idx]


def stop_epoch(batches) -> None:
    """End an FFCV epoch iterator left before its last batch (a benchmark's few steps, a preempted run).
    FFCV never joins its decode thread. One still running at interpreter exit can abort the process:
    CI saw "terminate called without an active exception" (exit -6) after a benchmark left an epoch
    open. The thread sees the event within one batch plus 0.5 s."""
    if not batches.is_alive():
        return  # ran to its end; FFCV closes it
    batches.terminate_event.set()
    while batches.is_alive():
        batches.join(timeout=1.0)
        with contextlib.suppress(queue.Empty):  # frees the thread's last put, which has no timeout
            batches.output_queue.get_nowait()
    batches.close()


def available_memory(device: torch.device) -> int:
    """Bytes free for data on `device`: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: what the OS calls free
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def read_resident(cfg: DataConfig, split: str, indices: np.ndarray, device: torch.device, dtype: torch.dtype,
                  channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `indices` of a beton once into device memory: (N, 3, H, W) images in `dtype`, labels."""
    from ffcv.loader import OrderOption

    h, w = image_shape(read_manifest(cfg.dir))
    need = len(indices) * (3 * h * w * torch.finfo(dtype).bits // 8 + 8)
    free = available_memory(device)
    if need > 0.5 * free:
        where = "the GPU has" if device.type == "cuda" else "this machine has"
        raise DataError(f"data.pipeline=device needs {need / 2**30:.1f} GiB for the {split} split but {where} "
                        f"{free / 2**30:.1f} GiB free (at most half is used for data); use data.pipeline=ffcv")
    threads = torch.get_num_threads()  # FFCV's Loader changes it
    loader = Loader(str(Path(cfg.dir) / f"{split}.beton"), batch_size=1000, num_workers=_workers(cfg),
                    os_cache=cfg.os_cache, order=OrderOption.SEQUENTIAL, indices=indices,
                    pipelines=_pipelines(device, dtype), drop_last=False,
                    batches_ahead=cfg.batches_ahead)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in _iterate(loader, threads)])
    torch.set_num_threads(threads)
    return to_format(torch.cat(xs), channels_last), torch.cat(ys)


class TestData:
    __test__ = False  # not a pytest class
    """Exact partition of an evaluation set: rank r evaluates its images r, r+world, r+2*world, ...

    The test split by default; `split="train", indices=val` is the validation set held out of it."""

    def __init__(self, cfg: DataConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, rank: int = 0, world: int = 1, threads: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, split: str = "test",
                 indices: np.ndarray | None = None):
        from ffcv.loader import OrderOption

        manifest = read_manifest(cfg.dir)
        every = np.arange(manifest[split]["count"]) if indices is None else np.asarray(indices)
        self.count, self.num_classes = len(every), len(manifest["classes"])
        if world > self.count:
            raise DataError(f"{world} ranks but only {self.count} {split} images to evaluate; "
                            f"use at most {self.count} ranks")
        indices = every[rank::world]
        self.batch_size, self.resident = batch_size, None
        if cfg.pipeline == Pipeline.device:
            self.resident = read_resident(cfg, split, indices, device, dtype, channels_last)
        else:
            self.loader = Loader(
                str(Path(cfg.dir) / f"{split}.beton"), batch_size=batch_size, num_workers=_workers(cfg),
                os_cache=cfg.os_cache, order=OrderOption.SEQUENTIAL, distributed=False, indices=indices,
                pipelines=_pipelines(device, dtype), drop_last=False, batches_ahead=cfg.batches_ahead,
            )
        self.normalize = Normalize(mean or manifest["mean"], std or manifest["std"], device, dtype)
        self.channels_last, self.threads = channels_last, threads
        if threads:
            torch.set_num_threads(threads)  # FFCV's Loader set it to its worker count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.resident is None:
            for x, y in _iterate(self.loader, self.threads):
                yield to_format(self.normalize(x), self.channels_last), y
            return
        images, labels = self.resident
        for i in range(0, len(labels), self.batch_size):
            yield self.normalize(images[i:i + self.batch_size]), labels[i:i + self.batch_size]
