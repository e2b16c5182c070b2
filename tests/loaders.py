"""The loaders as the tests build them: from a DataConfig alone, the way a run's build opens them
(dist_resnet.engine.build), with the manifest's normalisation unless one is given."""
from __future__ import annotations

import numpy as np
import torch

from dist_resnet.config import DataConfig
from dist_resnet.data.loader import Feed, TestData, TrainData
from dist_resnet.data.manifest import Betons


def feed(cfg: DataConfig, device: torch.device, dtype: torch.dtype, channels_last: bool, rank: int = 0,
         world: int = 1, threads: int | None = None, mean: list[float] | None = None,
         std: list[float] | None = None) -> tuple[Betons, Feed]:
    betons = Betons.open(cfg.dir)
    return betons, Feed(device, dtype, channels_last, mean or betons.manifest["mean"],
                        std or betons.manifest["std"], rank, world, threads)


def train_data(cfg: DataConfig, global_batch: int, seed: int, device: torch.device, dtype: torch.dtype,
               channels_last: bool, rank: int = 0, world: int = 1, accum: int = 1, threads: int | None = None,
               indices: np.ndarray | None = None) -> TrainData:
    betons, f = feed(cfg, device, dtype, channels_last, rank, world, threads)
    return TrainData(betons, cfg, f, global_batch, seed, accum, indices)


def test_data(cfg: DataConfig, batch_size: int, device: torch.device, dtype: torch.dtype, channels_last: bool,
              rank: int = 0, world: int = 1, threads: int | None = None, mean: list[float] | None = None,
              std: list[float] | None = None, split: str = "test", indices: np.ndarray | None = None) -> TestData:
    betons, f = feed(cfg, device, dtype, channels_last, rank, world, threads, mean, std)
    return TestData(betons, cfg, f, batch_size, split, indices)


test_data.__test__ = False  # not a pytest test
