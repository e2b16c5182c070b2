"""Run as ranks (tests/launch.py, or torchrun): every rank writes the images it sees in one train epoch and
in its test partition, as uint8 arrays, to OUT/rank{R}.npz."""
import sys

import numpy as np
import torch

from dist_resnet import distributed
from dist_resnet.config import DataConfig
from tests.loaders import test_data, train_data


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(argv: list[str]) -> None:
    data_dir, out, batch = argv[0], argv[1], int(argv[2])
    env = distributed.setup("cpu")
    cfg = DataConfig(dir=data_dir, num_workers=1)
    cpu = torch.device("cpu")
    train = train_data(cfg, batch, seed=0, device=cpu, dtype=torch.float32, channels_last=False,
                      rank=env.rank, world=env.world_size)
    test = test_data(cfg, batch, device=cpu, dtype=torch.float32, channels_last=False,
                    rank=env.rank, world=env.world_size)
    epochs = []
    for epoch in range(2):
        train.loader.next_epoch = epoch
        epochs.append(np.concatenate([as_uint8(x) for x, _ in train.loader]))
    test_x = np.concatenate([as_uint8(x) for x, _ in test.loader])
    test_y = np.concatenate([y.numpy() for _, y in test.loader])
    np.savez(f"{out}/rank{env.rank}.npz", epoch0=epochs[0], epoch1=epochs[1], test_x=test_x, test_y=test_y)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
