"""FFCV loaders for the betons written by `dist_resnet.data.prepare`.

FFCV decodes, batches and copies to the device (in the AMP dtype, channels_last
when asked); normalisation and the seeded augmentations then run on the device.

- Train: RANDOM order reshuffled every epoch from the seed; `distributed=True`
  above one rank (disjoint shards via DistributedSampler); drop_last.
- Test: an exact partition `rank::world` in SEQUENTIAL order with no padding, so
  the test images summed over ranks are each counted exactly once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

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


class TrainData:
    """`for x, y in data.epoch(e, start_step)`: normalised, augmented batches on the device."""

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, rank: int = 0, world: int = 1):
        from ffcv.loader import Loader, OrderOption

        manifest = read_manifest(cfg.dir)
        n = manifest["train"]["count"]
        per_rank = -(-n // world)
        if per_rank < batch_size:
            raise DataError(
                f"each of {world} ranks gets {per_rank} of the {n} train images, fewer than its batch of {batch_size} "
                f"(train.batch_size / world size); lower train.batch_size or use fewer ranks"
            )
        self.seed, self.rank = seed, rank
        self.loader = Loader(
            str(Path(cfg.dir) / "train.beton"), batch_size=batch_size, num_workers=cfg.num_workers,
            os_cache=cfg.os_cache, order=OrderOption.RANDOM, distributed=world > 1, seed=seed,
            pipelines=_pipelines(device, dtype, channels_last), drop_last=True, batches_ahead=cfg.batches_ahead,
        )
        self.normalize = Normalize(manifest["mean"], manifest["std"], device, dtype)
        self.augment = Augment(cfg.flip, cfg.translate, cfg.cutout, device)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.next_epoch = epoch  # FFCV's shuffle is a function of (seed, epoch)
        for step, (x, y) in enumerate(self.loader):
            if step < start_step:
                continue
            yield self.augment(self.normalize(x), derive_seed(self.seed, epoch, step, self.rank)), y


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
