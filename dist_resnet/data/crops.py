"""Crops decoded straight from a beton (issue 27): a random-resized crop drawn from the run's seed, and
FFCV's centre crop.

FFCV's RandomResizedCropRGBImageDecoder draws its crops from numba's global generator in each decode
thread: a crop then depends on which thread decoded the image and on everything that thread drew
before, so a resumed run or a run on more ranks sees other crops. `SeededRandomResizedCrop` draws the
crop of image i in epoch e from a counter-based hash of (seed, e, i) instead: the same crop whatever
the thread, the rank, the world size or the step a run resumed at. Its draws follow torchvision's
RandomResizedCrop (up to 10 tries of an area share in `scale` and a log-uniform aspect ratio in
`ratio`, then a centre crop of the clamped ratio). The epoch's key reaches the compiled decoder through
a buffer that FFCV allocates with the decoder's others (`arm` fills it before the epoch's thread runs).

Imported only where FFCV decodes (dist_resnet.data.ffcv).
"""
from __future__ import annotations

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from numba import njit

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=False)
def mix(x):
    """splitmix64's finaliser: a uint64 hashed to a well-spread uint64 (numba- and numpy-compilable)."""
    x = x + GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=False)
def uniform(key, k):
    """The k-th uniform draw in [0, 1) of `key` (53 random bits)."""
    return np.float64(mix(key ^ (np.uint64(k) * GOLDEN)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=False)
def random_crop(height, width, scale, ratio, key):
    """(top, left, h, w) of torchvision's RandomResizedCrop for an image of height x width, drawn from `key`."""
    area = np.float64(height) * np.float64(width)
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * uniform(key, 4 * t))
        aspect = np.exp(lo + (hi - lo) * uniform(key, 4 * t + 1))
        w = int(np.round(np.sqrt(target * aspect)))
        h = int(np.round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform(key, 4 * t + 2) * (height - h + 1))
            j = int(uniform(key, 4 * t + 3) * (width - w + 1))
            return i, j, h, w
    in_ratio = np.float64(width) / np.float64(height)  # torchvision's fallback: the whole image, ratio clamped
    if in_ratio < ratio[0]:
        w, h = int(width), int(np.round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = int(height), int(np.round(height * ratio[1]))
    else:
        w, h = int(width), int(height)
    return (int(height) - h) // 2, (int(width) - w) // 2, h, w


def epoch_key(seed: int, epoch: int) -> np.uint64:
    """The key of an epoch's crops; image i's crop is drawn from mix(key ^ i)."""
    return np.uint64(mix(np.uint64(mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))) ^ np.uint64(epoch)))


def image_key(key: np.uint64, index: int) -> np.uint64:
    """The key of image `index`'s crop in the epoch of `key` (what the decoder computes)."""
    return np.uint64(mix(np.uint64(key) ^ np.uint64(index)))


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """Decode, random-resized-crop (torchvision's draw, from (seed, epoch, image index)) and resize to
    `output_size` (H, W), in FFCV's decode threads. `output_size` may change between epochs
    (progressive resizing): FFCV sizes its buffers per epoch, and the code does not depend on it."""

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__(tuple(output_size))
        self.key = np.uint64(0)  # the epoch's: set before each epoch (epoch_key), handed over by `arm`
        self.scale, self.ratio = np.array(scale, dtype=np.float64), np.array(ratio, dtype=np.float64)

    def declare_state_and_memory(self, previous_state):
        state, (out, temp) = super().declare_state_and_memory(previous_state)
        return state, (out, temp, AllocationQuery((1,), np.dtype("<u8")))

    @property
    def get_crop_generator(self):  # FFCV's abstract hook; this decoder's code draws with random_crop instead
        return random_crop

    @staticmethod
    def arm(buffers, key: np.uint64) -> None:
        """Write the epoch's key into the decoder's key buffer (every batch slot)."""
        buffers[2][...] = key

    def generate_code(self):
        jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        crop_c, mix_c = random_crop, mix
        scale, ratio = self.scale, self.ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, keys = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp = temp_storage[dst_ix]
                    imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp = temp.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp = image_data.reshape(height, width, 3)
                key = mix_c(keys[0, 0] ^ np.uint64(source_ix))
                i, j, h, w = crop_c(height, width, scale, ratio, key)
                resize_crop_c(temp, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def centre(output_size, ratio: float) -> CenterCropRGBImageDecoder:
    """FFCV's centre crop: the central `ratio` of the shorter side, square, resized to `output_size`
    (ratio 224/256 and size 224 is torchvision's Resize(256) + CenterCrop(224))."""
    return CenterCropRGBImageDecoder(tuple(output_size), ratio)
