"""The image sizes a run's loaders produce: the train side (fixed, or growing over the epochs with
progressive resizing) and the evaluation side, from the config and the prepared data (issue 27).

CIFAR's betons hold one size, which every loader keeps unless `data.crop=rrc` (a random-resized crop
to `data.res`) or `data.test_res` (a centre crop of `data.test_crop_ratio` of the shorter side, resized)
says otherwise. Photo betons (prepare's --write-mode) hold each image at its own size, so they need both
sides set, and FFCV's decoders (the device pipeline holds one size in memory).
"""
from __future__ import annotations

import numpy as np

from ..config import ConfigError, DataConfig
from .manifest import Betons

STEP = 32  # progressive resizing moves in steps of this many pixels (FFCV's rn50 recipe)


def variable(betons: Betons) -> bool:
    """Whether the betons hold images of many sizes (photos), not one."""
    return bool(betons.manifest.get("variable_resolution"))


def train_side(d: DataConfig, epoch: int) -> int:
    """The train crops' side in `epoch` (0-based): data.res, rising linearly to data.res_end over the epochs
    data.res_ramp=[E0, E1] in steps of 32 px (FFCV's get_resolution), data.res_end from E1 on."""
    if not d.res_end:
        return d.res
    e0, e1 = d.res_ramp
    side = float(np.interp(epoch, [e0, e1], [d.res, d.res_end]))
    return int(min(d.res_end, d.res + STEP * np.floor((side - d.res) / STEP + 0.5)))  # half a step rounds up


def train_sides(d: DataConfig, epochs: int) -> list[int]:
    """Every train side a run of `epochs` epochs sees, in order of first use (the warm-up compiles each)."""
    return list(dict.fromkeys(train_side(d, e) for e in range(epochs)))


def shapes(d: DataConfig, betons: Betons) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train, test) (H, W) of the loaders' batches at the first epoch (before data.resize's upsampling)."""
    stored = None if variable(betons) else betons.image_shape
    train = (d.res, d.res) if d.res else stored
    test = (d.test_res, d.test_res) if d.test_res else stored
    return train, test


def check(d: DataConfig, betons: Betons) -> None:
    """What the data asks of the crop keys: photos need both sides and FFCV's decoders."""
    if d.pipeline.value == "device" and (d.crop.value == "rrc" or d.test_res):
        raise ConfigError("data.crop=rrc and data.test_res crop while FFCV decodes: set data.pipeline=ffcv "
                          "(the device pipeline holds the stored images, one size, in memory)")
    if not variable(betons):
        return
    if d.crop.value != "rrc" or not d.res or not d.test_res:
        raise ConfigError(f"data.dir={d.dir} holds photos of many sizes: set data.crop=rrc, data.res (the train "
                          "side, e.g. 160) and data.test_res (e.g. 224); see docs/TRAINING.md, 'your own photos'")
    largest = largest_side(betons)
    for key, side in (("data.res", d.res), ("data.res_end", d.res_end), ("data.test_res", d.test_res)):
        if largest and side > largest:
            limit = (betons.manifest.get("storage") or {}).get("max_resolution")
            raise ConfigError(f"{key}={side} is above the largest photo stored in data.dir={d.dir} ({largest} px"
                              + (f"; prepare's --max-resolution {limit}" if limit else "") + "): every image would be "
                              f"upsampled to it; use at most {largest}, or prepare the photos again with a larger "
                              "--max-resolution")


def largest_side(betons: Betons) -> int:
    """The longest side of any stored photo (the manifest's size distribution), or 0 where it is not recorded."""
    return max((max(betons.manifest[s].get("sizes", {}).get("max_hw") or [0]) for s in ("train", "test")), default=0)
