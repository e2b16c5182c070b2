"""The train and evaluation data of a run, from an opened `Betons`, as batches on the device.

- Train: a permutation per epoch from (seed, epoch), cut into global batches that each rank slices
  (GlobalBatchOrder): disjoint shards, no padding, the same global order for any world size; drop_last.
  Normalisation and the seeded augmentations run on the device, drawn per (seed, epoch, step).
- Evaluation: an exact partition `rank::world` in SEQUENTIAL order with no padding, so the images
  summed over ranks are each counted exactly once.
- `data.pipeline`: `ffcv` decodes every batch; `device` decodes a split once into device memory and
  gathers the very same batches there.

The manifest is read once, by whoever opens the `Betons`; the checks that need the run (batch sizes
against the data, ranks against the images) are made once, in dist_resnet.engine.build.
"""
from __future__ import annotations

import itertools
import os
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..config import Crop, DataConfig, Order, Pad, Pipeline
from .augment import AlternateFlips, Augment, Normalize, derive_seed
from .beton import pages as beton_pages
from .beton import read_raw
from .manifest import Betons, DataError
from .orders import GlobalBatchOrder, QuasiRandomOrder
from .sizes import shapes, train_side


def _ffcv():
    """FFCV's side (dist_resnet.data.ffcv), imported only where FFCV decodes: its import costs seconds."""
    from . import ffcv

    return ffcv


@dataclass(frozen=True)
class Feed:
    """How every loader of a process hands its batches over: on which device, in which dtype and memory
    format, normalised with which mean/std (in [0, 1]), to which rank of how many."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    mean: list[float]
    std: list[float]
    rank: int = 0
    world: int = 1
    threads: int | None = None  # torch's thread count to restore after FFCV changed it

    def normalizer(self) -> Normalize:
        return Normalize(self.mean, self.std, self.device, self.dtype)

    def restore_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # FFCV's Loader set it to its worker count


def to_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def available_memory(device: torch.device) -> int:
    """Bytes free for data on `device`: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: what the OS calls free
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_resident(betons: Betons, cfg: DataConfig, split: str, count: int, device: torch.device,
                   dtype: torch.dtype, always: bool = False) -> None:
    """DataError unless `count` images of `split` fit in half of `device`'s free memory, at the size evaluation
    reads them; only for data.pipeline=device, unless `always` (any decode into memory)."""
    if not always and cfg.pipeline != Pipeline.device:
        return
    shape = shapes(cfg, betons)[1]
    if shape is None:
        raise DataError(f"{betons.dir} holds photos of many sizes: set data.test_res to read them at one size")
    h, w = shape
    need = count * (3 * h * w * torch.finfo(dtype).bits // 8 + 8)
    free = available_memory(device)
    if need > 0.5 * free:
        where = "the GPU has" if device.type == "cuda" else "this machine has"
        raise DataError(f"data.pipeline=device needs {need / 2**30:.1f} GiB for the {split} split but {where} "
                        f"{free / 2**30:.1f} GiB free (at most half is used for data); use data.pipeline=ffcv")


def read_resident(betons: Betons, cfg: DataConfig, split: str, indices: np.ndarray, device: torch.device,
                  dtype: torch.dtype, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `indices` of a beton once into device memory: (N, 3, H, W) images in `dtype`, labels. With
    data.test_res (photos), FFCV decodes their centre crops at that side, as evaluation sees them."""
    check_resident(betons, cfg, split, len(indices), device, dtype, always=True)
    raw = None if cfg.test_res else read_raw(betons.path(split), indices)
    if raw is not None:  # the beton's bytes as they are: FFCV's decoder would only copy them
        images, labels = (torch.from_numpy(a).to(device) for a in raw)
        return to_format(images.permute(0, 3, 1, 2).to(dtype), channels_last), labels
    ffcv, threads = _ffcv(), torch.get_num_threads()  # FFCV's Loader changes the thread count
    loader = ffcv.sequential(betons.path(split), indices, 1000, cfg.num_workers, cfg.os_cache, cfg.batches_ahead,
                             device, dtype, centre_crop(cfg))
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in ffcv.iterate(loader, threads)])
    torch.set_num_threads(threads)
    return to_format(torch.cat(xs), channels_last), torch.cat(ys)


class StoredImages:
    """data.crop=translate: FFCV hands over the stored images as they are; nothing changes per epoch."""

    decoder = None

    def start(self, epoch: int) -> None:
        pass


class RandomResizedCrops:
    """data.crop=rrc: a random-resized crop, drawn from (seed, epoch, image), decoded by FFCV at the epoch's
    train side (data.res, or the progressive-resizing ramp to data.res_end)."""

    def __init__(self, cfg: DataConfig, seed: int, stored: tuple[int, int]):
        self.cfg, self.seed, self.stored = cfg, seed, stored  # stored: the size without data.res (CIFAR's)
        self.decoder = _ffcv().crops.SeededRandomResizedCrop(stored, cfg.rrc_scale, cfg.rrc_ratio)

    def start(self, epoch: int) -> None:
        side = train_side(self.cfg, epoch)
        self.decoder.output_size = (side, side) if side else self.stored
        self.decoder.key = _ffcv().crops.epoch_key(self.seed, epoch)


def centre_crop(cfg: DataConfig):
    """data.test_res: FFCV's centre crop of data.test_crop_ratio of the shorter side, resized; else None."""
    return _ffcv().crops.centre((cfg.test_res, cfg.test_res), cfg.test_crop_ratio) if cfg.test_res else None


class TrainData:
    """`for step, micro_batches in data.epoch(e)`: normalised, augmented batches on the device.

    One optimizer step takes `global_batch` samples: `accum` micro-batches of
    global_batch / (world * accum) on each rank. Translation and cutout are given in pixels of a
    32-pixel image and scale with the images' shorter side. `indices`: the train beton's images to
    train on (default: all; a validation split holds some out).
    """

    def __init__(self, betons: Betons, cfg: DataConfig, feed: Feed, global_batch: int, seed: int, accum: int = 1,
                 indices: np.ndarray | None = None):
        n = betons.count("train") if indices is None else len(indices)
        self.betons, self.cfg, self.feed, self.seed, self.accum = betons, cfg, feed, seed, accum
        self.global_batch, self.micro = global_batch, global_batch // (feed.world * accum)
        if cfg.order == Order.quasi_random:  # pages of the beton read together: data that does not fit in memory
            pages = beton_pages(betons.path("train"))
            self.order = QuasiRandomOrder(n, global_batch, seed, feed.rank, feed.world, indices,
                                          pages if indices is None else pages[indices])
        else:
            self.order = GlobalBatchOrder(n, global_batch, seed, feed.rank, feed.world, indices)
        self.indices = np.arange(n) if indices is None else indices
        self.resident = None
        self.crops = RandomResizedCrops(cfg, seed, shapes(cfg, betons)[0]) if cfg.crop == Crop.rrc else StoredImages()
        if cfg.pipeline == Pipeline.device:  # the same order, gathered from device memory
            self.resident = read_resident(betons, cfg, "train", self.indices, feed.device, feed.dtype,
                                          feed.channels_last)
        else:
            self.loader = _ffcv().shuffled(betons.path("train"), self.order, self.micro, cfg.num_workers, cfg.os_cache,
                                           cfg.batches_ahead, seed, feed.device, feed.dtype, self.crops.decoder)
        self.normalize = feed.normalizer()
        side = cfg.res or min(betons.image_shape)  # rrc: no translation (the crop moves the image)
        translate = 0 if cfg.crop == Crop.rrc else round(cfg.translate * side / 32)
        cutout = round(cfg.cutout * side / 32)
        self.augment = Augment(cfg.flip, translate, cutout, feed.device, Pad(cfg.translate_pad).value)
        self.flips = AlternateFlips(seed, n, feed.device) if cfg.flip_alternate else None
        feed.restore_threads()

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        return self.order.steps

    def epoch(self, epoch: int, start_step: int = 0,
              end_step: int | None = None) -> Iterator[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Steps [start_step, end_step) of `epoch` (end: the epoch's end), as (step, micro-batches)."""
        self.order.skip = (epoch, start_step) if start_step else None
        end = len(self) if end_step is None else end_step
        share = self.global_batch // self.feed.world
        step, micro = start_step, []
        flips = None
        self.crops.start(epoch)
        if self.flips is not None:  # one host-to-device copy per epoch
            flips = self.flips.epoch(epoch, torch.from_numpy(self.order.permutation(epoch)).to(self.feed.device))
        with closing(self.raw_batches(epoch)) as raw:
            for x, y in itertools.islice(raw, (end - start_step) * self.accum):
                offset = self.feed.rank * share + len(micro) * self.micro
                x = to_format(self.normalize(x), self.feed.channels_last)
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
            images = self.resident[0][torch.from_numpy(idx).to(self.feed.device)]
        else:
            images = read_resident(self.betons, self.cfg, "train", self.indices[idx], self.feed.device,
                                   torch.float32, self.feed.channels_last)[0]
        return self.normalize(images.float()).float()

    def raw_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the epoch, before normalisation and augmentation."""
        if self.resident is None:
            self.loader.next_epoch = epoch  # FFCV asks self.order for the epoch's indices
            yield from _ffcv().iterate(self.loader, self.feed.threads)
            return
        images, labels = self.resident
        order = torch.from_numpy(self.order.positions(epoch).astype(np.int64)).to(images.device)
        for i in range(len(order) // self.micro):
            idx = order[i * self.micro:(i + 1) * self.micro]
            yield images[idx], labels[idx]


def check_partition(world: int, count: int, what: str) -> None:
    """Every rank needs at least one image of an evaluation set (`count` images of `what`)."""
    if count and world > count:
        raise DataError(f"{world} ranks but only {count} {what} images to evaluate; use at most {count} ranks")


class TestData:
    __test__ = False  # not a pytest class
    """Exact partition of an evaluation set: rank r evaluates its images r, r+world, r+2*world, ...

    The test split by default; `split="train", indices=val` is the validation set held out of it."""

    def __init__(self, betons: Betons, cfg: DataConfig, feed: Feed, batch_size: int, split: str = "test",
                 indices: np.ndarray | None = None):
        every = np.arange(betons.count(split)) if indices is None else np.asarray(indices)
        self.count, self.num_classes, self.device = len(every), len(betons.classes), feed.device
        mine = every[feed.rank::feed.world]
        self.batch_size, self.resident, self.feed, self.mine = batch_size, None, feed, len(mine)
        if cfg.pipeline == Pipeline.device:
            self.resident = read_resident(betons, cfg, split, mine, feed.device, feed.dtype, feed.channels_last)
        else:
            self.loader = _ffcv().sequential(betons.path(split), mine, batch_size, cfg.num_workers, cfg.os_cache,
                                             cfg.batches_ahead, feed.device, feed.dtype, centre_crop(cfg))
        self.normalize = feed.normalizer()
        feed.restore_threads()

    def batch_sizes(self) -> list[int]:
        """The sizes of this rank's batches: the full one and the last, partial one (a compiled model sees
        each as a new shape, which the warm-up compiles before the timed run)."""
        n = len(self.resident[1]) if self.resident is not None else self.mine
        return sorted({min(n, self.batch_size), n % self.batch_size} - {0})

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.resident is None:
            for x, y in _ffcv().iterate(self.loader, self.feed.threads):
                yield to_format(self.normalize(x), self.feed.channels_last), y
            return
        images, labels = self.resident
        for i in range(0, len(labels), self.batch_size):
            yield self.normalize(images[i:i + self.batch_size]), labels[i:i + self.batch_size]
