"""The betons that `prepare` writes, read with numpy alone: FFCV 1.0's file format (version 2) for one RGB
image field stored raw and one int label field.

Importing FFCV compiles numba code (about 8 s per process here), and its pipelines compile again per
Loader. A run that holds its data in memory (`data.pipeline=device`), evaluate on such a run, export's
check and the validation split only need the file's tables and raw bytes, so they read them here: the
header, the field descriptors, the per-sample metadata (an image's mode, size and data pointer; a label),
and an image's H x W x 3 bytes at its data pointer, which is all FFCV's decoder copies for a raw image.
`table` returns None for any other beton (another version, other fields, JPEG images); FFCV reads those.
"""
from __future__ import annotations

import numpy as np

VERSION = 2  # FFCV 1.0's CURRENT_VERSION
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                   ("alloc_table_ptr", "<u8")], align=True)
FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
INT, RGB = 1, 2  # FFCV's type ids of IntField and RGBImageField
IMAGE = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])  # RGBImageField's
SAMPLE = np.dtype([("", IMAGE), ("", "<i8")], align=True)  # FFCV's metadata row: the fields' types, aligned
RAW = 1  # RGBImageField's raw mode (what prepare writes); 0 is JPEG


def table(path: str) -> dict[str, np.ndarray] | None:
    """The per-sample metadata of a beton of an `image` and a `label` field, by field name; None for any
    other beton."""
    header = np.fromfile(path, dtype=HEADER, count=1)
    if len(header) != 1 or header[0]["version"] != VERSION or header[0]["num_fields"] != 2:
        return None
    fields = np.fromfile(path, dtype=FIELD, count=2, offset=HEADER.itemsize)
    names = [f["name"].tobytes().decode("ascii", "replace").split("\0")[0] for f in fields]
    if names != ["image", "label"] or fields["type_id"].tolist() != [RGB, INT]:
        return None
    rows = np.fromfile(path, dtype=SAMPLE, count=int(header[0]["num_samples"]), offset=HEADER.itemsize + fields.nbytes)
    return {"image": rows["f0"], "label": rows["f1"]}


def pages(path: str) -> np.ndarray:
    """The page (of the file's page size) where each sample's image starts: what FFCV's memory managers
    read together."""
    header = np.fromfile(path, dtype=HEADER, count=1)
    rows = table(path)
    if rows is None:
        raise ValueError(f"{path} is not a beton of an image and a label field")
    return (rows["image"]["data_ptr"] // np.uint64(header[0]["page_size"])).astype(np.int64)


def is_raw(path: str) -> bool:
    """Whether every image of the beton is stored raw at one size (read_raw reads any of them)."""
    rows = table(path)
    if rows is None:
        return False
    image = rows["image"]
    return bool((image["mode"] == RAW).all()) and len(set(zip(image["height"].tolist(), image["width"].tolist()))) == 1


def read_raw(path: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Images (N x H x W x 3 uint8) and labels (int64) of `indices`, when every one is stored raw and all
    share one size; None otherwise (FFCV then decodes them)."""
    rows = table(path)
    if rows is None or len(indices) == 0:
        return None
    image, label = rows["image"][indices], rows["label"][indices]
    sizes = set(zip(image["height"].tolist(), image["width"].tolist()))
    if (image["mode"] != RAW).any() or len(sizes) != 1:
        return None
    (h, w), data = sizes.pop(), np.memmap(path, dtype=np.uint8, mode="r")
    out = np.empty((len(indices), h, w, 3), dtype=np.uint8)
    for i, ptr in enumerate(image["data_ptr"].tolist()):
        out[i] = data[ptr:ptr + h * w * 3].reshape(h, w, 3)
    return out, label.astype(np.int64)
