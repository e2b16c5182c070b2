"""What `export` measures on the graph it writes: a class-stratified check sample of the test set, and the
whole test set streamed in batches through PyTorch and each ONNX graph (fp32, and int8 with --int8).

- The check sample: `CHECK_IMAGES` test images drawn per class in proportion (scikit-learn's
  `StratifiedShuffleSplit`, seed `CHECK_SEED`). Betons are written class by class, so the first images
  of a test beton are all of one class: a check on them would pass a graph broken on every other class.
- The test set: read `BATCH` images at a time (a 224-px folder of 50,000 images is 30 GB as float32),
  each batch through every graph; the counts are summed, so nothing but one batch is ever held.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .data.beton import is_raw
from .data.loader import centre_crop, read_resident
from .data.manifest import Betons, DataError

CHECK_IMAGES = 256
CHECK_SEED = 0xC4E
BATCH = 500


def open_betons(cfg) -> Betons:
    try:
        return Betons.open(cfg.data.dir)
    except DataError as e:
        raise DataError(f"checking the export needs real test images: {e}; pass data.dir=DIR") from None


def check_sample(betons: Betons, cfg, count: int = CHECK_IMAGES) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`count` test images (float RGB in [0, 1]) and labels, stratified by class and seeded; how many of
    each class it holds."""
    from sklearn.model_selection import StratifiedShuffleSplit

    labels = betons.labels("test")
    if count >= len(labels):
        idx = np.arange(len(labels))
    else:
        split = StratifiedShuffleSplit(n_splits=1, test_size=count, random_state=CHECK_SEED)
        idx = np.sort(next(split.split(np.zeros(len(labels)), labels))[1])
    x, y = read_resident(betons, cfg.data, "test", idx, torch.device("cpu"), torch.float32, False)
    per_class = {c: int((y == i).sum()) for i, c in enumerate(betons.classes)}
    return x / 255, y, per_class


def test_batches(betons: Betons, cfg, batch: int = BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole test split in order, `batch` images at a time, as float RGB in [0, 1], as evaluation reads it:
    at the stored size, or (photos: data.test_res) the checkpoint's centre crop resized to its test side."""
    n, path, cpu = betons.count("test"), betons.path("test"), torch.device("cpu")
    if is_raw(path) and not cfg.data.test_res:  # raw bytes at known places: read each batch straight from the file
        for i in range(0, n, batch):
            x, y = read_resident(betons, cfg.data, "test", np.arange(i, min(n, i + batch)), cpu, torch.float32, False)
            yield x / 255, y
        return
    from .data import ffcv  # JPEG or mixed sizes: one FFCV loader decodes the split once, in order

    loader = ffcv.sequential(path, np.arange(n), batch, cfg.data.num_workers, cfg.data.os_cache, 2, cpu,
                             torch.float32, centre_crop(cfg.data))
    for x, y in ffcv.iterate(loader, torch.get_num_threads()):
        yield x.clone() / 255, y.clone()


def onnx_session(data: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def onnx_logits(session, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: x[i:i + batch].numpy()})[0])
                      for i in range(0, len(x), batch)])


@torch.no_grad()
def torch_logits(model, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def score_test_set(model, graphs: dict[str, bytes], written: str, betons: Betons, cfg) -> dict:
    """Top-1 of PyTorch and of each graph on the whole test split, the written graph's per-class accuracy
    and (with two graphs) its top-1 agreement with the other, in one pass over the data."""
    sessions = {name: onnx_session(data) for name, data in graphs.items()}
    k = len(betons.classes)
    correct = {name: 0 for name in ["pytorch", *graphs]}
    per_class, totals, agree, n = np.zeros(k, np.int64), np.zeros(k, np.int64), 0, 0
    for x, y in test_batches(betons, cfg):
        preds = {"pytorch": torch_logits(model, x).argmax(1)}
        preds.update({name: onnx_logits(s, x).argmax(1) for name, s in sessions.items()})
        for name, p in preds.items():
            correct[name] += int((p == y).sum())
        hit = (preds[written] == y).numpy()
        np.add.at(per_class, y.numpy(), hit)
        np.add.at(totals, y.numpy(), 1)
        if len(graphs) == 2:
            agree += int((preds["fp32"] == preds["int8"]).sum())
        n += len(y)
    d = cfg.data
    crop = (f"the central {d.test_crop_ratio:g} of the shorter side resized to {d.test_res}x{d.test_res}"
            if d.test_res else None)
    out = {"images": n, "crop": crop, "top1": {name: c / n for name, c in correct.items()},
           "per_class": {c: float(per_class[i] / max(1, totals[i])) for i, c in enumerate(betons.classes)}}
    if len(graphs) == 2:
        out["int8_fp32_agreement"] = agree / n
    print(f"test set ({n} images): " + ", ".join(f"{name} {acc:.4f}" for name, acc in out["top1"].items()))
    return out
