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
from ffcv.traversal_order.base import TraversalOrder

from ..config import DataConfig, Pad, Pipeline
from .augment import AlternateFlips, Augment, Normalize, derive_seed

PREPARE_HINT = "create it with: python -m dist_resnet.data.prepare --source torchvision --out DIR"


class DataError(RuntimeError):
    pass


def read_manifest(data_dir: str | Path) -> dict:
    d = Path(data_dir)
    if not (d / "manifest.json").is_file():
        raise DataError(f"data.dir={d} has no manifest.json; {PREPARE_HINT}")
    manifest = json.loads((d / "manifest.json").read_text())
    for split in ("train", "test"):
        if not (d / f"{split}.beton").is_file():
            raise DataError(f"{d / split}.beton is missing; {PREPARE_HINT} --force")
    return manifest


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


class GlobalBatchOrder(TraversalOrder):
    """A sample order that does not depend on the world size.

    Each epoch draws one permutation from (seed, epoch) and cuts it into global
    batches; rank r takes the r-th contiguous slice of every global batch. So 1 rank
    with batch 2B sees, step for step, the union of what 2 ranks with batch B see,
    with no padded duplicates, and a run can resume at any step on any world size.
    (FFCV's `distributed=True` wraps DistributedSampler, whose order and padding
    change with the world size; this replaces it.)
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int):
        self.n, self.global_batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.steps = n // global_batch
        self.skip: tuple[int, int] | None = None  # (epoch, steps): resume mid-epoch

    def __call__(self, loader) -> "GlobalBatchOrder":  # FFCV instantiates orders with the loader
        self.loader = loader
        return self

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's global order: step s takes samples [s * global_batch, (s + 1) * global_batch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)[: self.steps * self.global_batch]

    def sample_order(self, epoch: int) -> np.ndarray:
        perm = self.permutation(epoch)
        start = 0
        if self.skip is not None and self.skip[0] == epoch:
            start, self.skip = self.skip[1], None
        share = self.global_batch // self.world
        batches = perm.reshape(self.steps, self.global_batch)
        return np.ascontiguousarray(batches[start:, self.rank * share:(self.rank + 1) * share]).reshape(-1)


class TrainData:
    """`for step, micro_batches in data.epoch(e)`: normalised, augmented batches on the device.

    One optimizer step takes `global_batch` samples: `accum` micro-batches of
    global_batch / (world * accum) on each rank.
    """

    def __init__(self, cfg: DataConfig, global_batch: int, seed: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, rank: int = 0, world: int = 1, accum: int = 1):
        from ffcv.loader import Loader

        manifest = read_manifest(cfg.dir)
        n = manifest["train"]["count"]
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
        self.channels_last, self.cfg, self.device = channels_last, cfg, device
        self.order = GlobalBatchOrder(n, global_batch, seed, rank, world)
        self.resident = None
        if cfg.pipeline == Pipeline.device:  # the same order, gathered from device memory
            self.resident = read_resident(cfg, "train", np.arange(n), device, dtype, channels_last)
        else:
            self.loader = Loader(
                str(Path(cfg.dir) / "train.beton"), batch_size=self.micro, num_workers=_workers(cfg),
                os_cache=cfg.os_cache, order=self.order, seed=seed,
                pipelines=_pipelines(device, dtype), drop_last=True, batches_ahead=cfg.batches_ahead,
            )
        self.normalize = Normalize(manifest["mean"], manifest["std"], device, dtype)
        self.augment = Augment(cfg.flip, cfg.translate, cfg.cutout, device, Pad(cfg.translate_pad).value)
        self.flips = AlternateFlips(seed, n, device) if cfg.flip_alternate else None

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
        idx = np.sort(rng.choice(self.order.n, min(n, self.order.n), replace=False))
        if self.resident is not None:
            images = self.resident[0][torch.from_numpy(idx).to(self.device)]
        else:
            images = read_resident(self.cfg, "train", idx, self.device, torch.float32, self.channels_last)[0]
        return self.normalize(images.float()).float()

    def raw_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the epoch, before normalisation and augmentation."""
        if self.resident is None:
            self.loader.next_epoch = epoch  # FFCV asks self.order for the epoch's indices
            batches = iter(self.loader)
            try:
                for batch in batches:  # not `yield from`: on close it would end FFCV's memory context
                    yield batch        # under the still running thread, whose page reads could then hang
            finally:
                stop_epoch(batches)
            return
        images, labels = self.resident
        order = torch.from_numpy(self.order.sample_order(epoch).astype(np.int64)).to(images.device)
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


def read_resident(cfg: DataConfig, split: str, indices: np.ndarray, device: torch.device, dtype: torch.dtype,
                  channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `indices` of a beton once into device memory: (N, 3, 32, 32) images in `dtype`, labels."""
    from ffcv.loader import Loader, OrderOption

    need = len(indices) * (3 * 32 * 32 * torch.finfo(dtype).bits // 8 + 8)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.5 * free:
            raise DataError(
                f"data.pipeline=device needs {need / 2**30:.1f} GiB for the {split} split but the GPU has "
                f"{free / 2**30:.1f} GiB free (at most half is used for data); use data.pipeline=ffcv"
            )
    loader = Loader(str(Path(cfg.dir) / f"{split}.beton"), batch_size=1000, num_workers=_workers(cfg),
                    os_cache=cfg.os_cache, order=OrderOption.SEQUENTIAL, indices=indices,
                    pipelines=_pipelines(device, dtype), drop_last=False,
                    batches_ahead=cfg.batches_ahead)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return to_format(torch.cat(xs), channels_last), torch.cat(ys)


class TestData:
    __test__ = False  # not a pytest class
    """Exact partition of the test set: rank r evaluates images r, r+world, r+2*world, ..."""

    def __init__(self, cfg: DataConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, rank: int = 0, world: int = 1):
        from ffcv.loader import Loader, OrderOption

        manifest = read_manifest(cfg.dir)
        self.count = manifest["test"]["count"]
        if world > self.count:
            raise DataError(f"{world} ranks but only {self.count} test images; use at most {self.count} ranks")
        indices = np.arange(rank, self.count, world)
        self.batch_size, self.resident = batch_size, None
        if cfg.pipeline == Pipeline.device:
            self.resident = read_resident(cfg, "test", indices, device, dtype, channels_last)
        else:
            self.loader = Loader(
                str(Path(cfg.dir) / "test.beton"), batch_size=batch_size, num_workers=_workers(cfg),
                os_cache=cfg.os_cache, order=OrderOption.SEQUENTIAL, distributed=False, indices=indices,
                pipelines=_pipelines(device, dtype), drop_last=False, batches_ahead=cfg.batches_ahead,
            )
        self.normalize = Normalize(manifest["mean"], manifest["std"], device, dtype)
        self.channels_last = channels_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.resident is None:
            batches = iter(self.loader)
            try:
                for x, y in batches:
                    yield to_format(self.normalize(x), self.channels_last), y
            finally:
                stop_epoch(batches)
            return
        images, labels = self.resident
        for i in range(0, len(labels), self.batch_size):
            yield self.normalize(images[i:i + self.batch_size]), labels[i:i + self.batch_size]
