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

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from ffcv.traversal_order.base import TraversalOrder

from ..config import DataConfig
from .augment import Augment, Normalize, derive_seed

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


def _pipelines(device: torch.device, dtype: torch.dtype, channels_last: bool) -> dict:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage

    cuda = device.type == "cuda"
    return {
        "image": [SimpleRGBImageDecoder(), ToTensor(), ToDevice(device, non_blocking=cuda),
                  ToTorchImage(channels_last=channels_last), Convert(dtype)],
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

    def sample_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        start = 0
        if self.skip is not None and self.skip[0] == epoch:
            start, self.skip = self.skip[1], None
        share = self.global_batch // self.world
        batches = perm[: self.steps * self.global_batch].reshape(self.steps, self.global_batch)
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
        self.order = GlobalBatchOrder(n, global_batch, seed, rank, world)
        self.loader = Loader(
            str(Path(cfg.dir) / "train.beton"), batch_size=self.micro, num_workers=cfg.num_workers,
            os_cache=cfg.os_cache, order=self.order, seed=seed,
            pipelines=_pipelines(device, dtype, channels_last), drop_last=True, batches_ahead=cfg.batches_ahead,
        )
        self.normalize = Normalize(manifest["mean"], manifest["std"], device, dtype)
        self.augment = Augment(cfg.flip, cfg.translate, cfg.cutout, device)

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        return self.order.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        self.order.skip = (epoch, start_step) if start_step else None
        self.loader.next_epoch = epoch
        share = self.global_batch // self.world
        step, micro = start_step, []
        for x, y in self.loader:
            offset = self.rank * share + len(micro) * self.micro
            x = self.augment(self.normalize(x), derive_seed(self.seed, epoch, step), offset, self.global_batch)
            micro.append((x, y.clone()))  # FFCV reuses its buffers; x is already a new tensor
            if len(micro) == self.accum:
                yield step, micro
                step, micro = step + 1, []


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
        self.loader = Loader(
            str(Path(cfg.dir) / "test.beton"), batch_size=batch_size, num_workers=cfg.num_workers,
            os_cache=cfg.os_cache, order=OrderOption.SEQUENTIAL, distributed=False,
            indices=np.arange(rank, self.count, world), pipelines=_pipelines(device, dtype, channels_last),
            drop_last=False, batches_ahead=cfg.batches_ahead,
        )
        self.normalize = Normalize(manifest["mean"], manifest["std"], device, dtype)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield self.normalize(x), y
