"""Predict the classes of image files with a trained model.

    python -m dist_resnet.predict CHECKPOINT PATH... [--topk 5] [--json] [--tta flip] [--device cpu|cuda]
                                  [--explain OUT_DIR [--explain-class NAME]]

examples:
  python -m dist_resnet.predict runs/cpu/best.pt photo.jpg more_images/ --topk 3
  python -m dist_resnet.predict model-int8.onnx more_images/ --json > predictions.jsonl
  python -m dist_resnet.predict runs/cpu/best.pt photo.jpg --explain explained/ --explain-class cat

CHECKPOINT is one of our checkpoints (.pt), an exported .safetensors or an exported .onnx (run with
onnxruntime). PATHs are image files or folders (searched recursively for image files). Every image is
converted to RGB and resized to the size the model was trained on (said once, on stderr). Output: one
line per image, `PATH<TAB>class prob<TAB>...`, or one JSON object per line with --json. A file that is
not an image gets an error line on stderr naming it, the others are still predicted, and the exit code
is 2. `--explain OUT_DIR` also writes, per image, the image with the Grad-CAM heat map of the predicted
class (or `--explain-class`) and the top-k labels (dist_resnet.explain), as OUT_DIR/NNNN-<name>.png,
numbered in input order, with OUT_DIR/index.csv mapping each to its input; it needs the weights, not an
.onnx.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .checkpoint import CheckpointError
from .config import TTA, ConfigError
from .data.augment import Normalize
from .engine.evaluation import predict
from .precision import Amp
from .trained import open_trained, placed

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class PredictError(ValueError):
    pass


def image_paths(paths: list[str]) -> Iterator[Path]:
    """Files as given (whatever their suffix), and the image files under folders, sorted."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                              and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            yield p


def read_image(path: Path, size: tuple[int, int],
               crop: float | None = None) -> tuple[np.ndarray, tuple[int, int] | None]:
    """HxWx3 uint8 at the model's (H, W): (image, the original (W, H) if it was resized). `crop` (a model
    trained on photos, data.test_res): first the central `crop` of the shorter side, square, as evaluated."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # a truncated file fails here, not later
        rgb = im.convert("RGB")
    if crop is not None:
        w, h = rgb.size
        c = int(crop * min(w, h))
        top, left = (h - c) // 2, (w - c) // 2
        rgb = rgb.crop((left, top, left + c, top + c)).resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8), (w, h)
    if rgb.size == (size[1], size[0]):
        return np.asarray(rgb, dtype=np.uint8), None
    return np.asarray(rgb.resize((size[1], size[0]), Image.BICUBIC), dtype=np.uint8), rgb.size


class TorchModel:
    """One of our checkpoints or safetensors files, run the way evaluate runs it."""

    def __init__(self, path: str, device: torch.device, ema: bool):
        mf, trained, cfg = open_trained(path, [], ema)
        if mf.classes is None or mf.mean is None:
            raise PredictError(f"{path} was written before checkpoints held their class names and normalisation; "
                               "evaluate it instead, or re-export it")
        self.classes, self.size = mf.classes, tuple(mf.image_shape or (32, 32))
        self.crop = cfg.data.test_crop_ratio if cfg.data.test_res else None
        self.device = device
        self.amp = Amp.on(cfg.train.precision, device)
        self.dtype = self.amp.input_dtype(cfg.data.fp32_input)  # normalised as training normalised
        self.model, self.cl = placed(mf, trained, cfg, len(mf.classes), device)
        self.normalize = Normalize(mf.mean, mf.std, device, self.dtype)
        self.batch_size = cfg.train.batch_size

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).to(self.dtype)  # as the loader does
        x = self.normalize(x)
        return x.contiguous(memory_format=torch.channels_last if self.cl else torch.contiguous_format)

    def context(self):
        return self.amp.autocast()


class OnnxModel:
    """An exported .onnx: float RGB in [0, 1] in, logits out; normalisation and resize are in the graph."""

    def __init__(self, path: str):
        try:
            import onnxruntime as ort
        except ImportError:
            raise PredictError("running .onnx files needs onnxruntime: pip install 'dist_resnet[export]'") from None
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.classes, self.size = json.loads(meta["classes"]), tuple(json.loads(meta["input_size"]))
            self.crop = json.loads(meta.get("crop_ratio", "null"))
        except (KeyError, json.JSONDecodeError):
            raise PredictError(f"{path} is not an ONNX model exported by dist_resnet (no classes/input_size "
                               "metadata)") from None
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise PredictError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
        self.input = self.session.get_inputs()[0].name
        self.batch_size, self.model = 256, self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.contiguous().numpy()})[0])

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

    def context(self):
        return nullcontext()


def open_model(path: str, device: torch.device, ema: bool = False):
    return OnnxModel(path) if path.endswith(".onnx") else TorchModel(path, device, ema)


EXPLAIN_NEEDS_WEIGHTS = ("--explain needs the model's weights (Grad-CAM takes gradients inside the net): give the "
                         "checkpoint (.pt) or the .safetensors file, not an .onnx graph")


class Explainer:
    """--explain OUT_DIR: a Grad-CAM overlay per image (dist_resnet.explain), of the predicted class or of
    `--explain-class`. Overlays are numbered in the order the images were read (`0001-cat.png`: the number
    makes two inputs of the same name two files, the name part is cut to 60 characters), and
    OUT_DIR/index.csv maps each to the path it explains. An overlay that cannot be written is reported and
    counted; the other images go on."""

    def __init__(self, model, out_dir: str, class_name: str | None):
        if isinstance(model, OnnxModel):
            raise PredictError(EXPLAIN_NEEDS_WEIGHTS)
        if class_name is not None and class_name not in model.classes:
            raise PredictError(f"--explain-class {class_name}: not one of the model's classes "
                               f"({', '.join(model.classes)})")
        from .explain import GradCam

        self.cam, self.classes, self.out = GradCam(model.model), model.classes, Path(out_dir)
        self.target = None if class_name is None else model.classes.index(class_name)
        if self.out.exists() and not self.out.is_dir():
            raise PredictError(f"--explain {out_dir} is a file: give a folder for the overlays")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PredictError(f"--explain {out_dir}: cannot make the folder ({e.strerror})") from None
        self.rows: list[dict] = []
        self.failed = 0

    def name(self, path: Path) -> str:
        stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.stem)[:60]
        return f"{len(self.rows) + 1:04d}-{stem}.png"

    def __call__(self, batch: list, x: torch.Tensor, tops: list[list[tuple[str, float]]]) -> None:
        from .explain import overlay

        targets = [self.classes.index(t[0][0]) if self.target is None else self.target for t in tops]
        heat = self.cam(x, torch.tensor(targets)).numpy()
        for (path, image), h, top, t in zip(batch, heat, tops, targets):
            explained, name = self.classes[t] + (" (predicted)" if self.target is None else ""), self.name(path)
            try:
                overlay(self.out / name, image, h, top, explained)
            except Exception as e:  # noqa: BLE001 - one picture that cannot be drawn or written must not stop the rest
                print(f"dist_resnet.predict: error: {path}: its explanation could not be written "
                      f"({type(e).__name__}: {e})", file=sys.stderr)
                self.failed, name = self.failed + 1, ""
            self.rows.append({"file": name, "input": str(path), "explained": self.classes[t],
                              "predicted": top[0][0], "prob": f"{top[0][1]:.4f}"})

    def close(self) -> Path:
        import csv

        index = self.out / "index.csv"
        with open(index, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "input", "explained", "predicted", "prob"])
            w.writeheader()
            w.writerows(self.rows)
        return index


def run(model, paths: list[str], topk: int, tta: TTA, batch_size: int, as_json: bool, out=None,
        err=None, explain=None) -> tuple[int, int]:
    """Predict every image; (predicted, failed). Results stream out batch by batch; `explain` (an
    Explainer) draws each batch's heat maps."""
    out, err = out or sys.stdout, err or sys.stderr
    k = min(topk, len(model.classes))
    done = failed = 0
    resized: list[tuple[Path, tuple[int, int]]] = []

    def flush(batch: list[tuple[Path, np.ndarray]]) -> None:
        nonlocal done
        if not batch:
            return
        x = model.inputs(np.stack([im for _, im in batch]))
        with torch.no_grad(), model.context():
            logits = predict(model.model, x, tta)
        probs, idx = torch.softmax(logits.float(), 1).topk(k, 1)
        tops = [[(model.classes[c], q) for c, q in zip(i, p)] for p, i in zip(probs.tolist(), idx.tolist())]
        for (path, _), top in zip(batch, tops):
            if as_json:
                print(json.dumps({"path": str(path), "top": [{"class": c, "prob": q} for c, q in top]}), file=out)
            else:
                print(f"{path}\t" + "\t".join(f"{c} {q:.4f}" for c, q in top), file=out)
        if explain is not None:
            explain(batch, x, tops)
        done += len(batch)

    batch: list[tuple[Path, np.ndarray]] = []
    for path in image_paths(paths):
        try:
            image, original = read_image(path, model.size, model.crop)
        except FileNotFoundError:
            print(f"dist_resnet.predict: error: {path}: no such file or folder", file=err)
            failed += 1
            continue
        except Exception as e:  # noqa: BLE001 - PIL raises many types for files that are not images
            print(f"dist_resnet.predict: error: {path}: not a readable image ({type(e).__name__}: {e})", file=err)
            failed += 1
            continue
        if original is not None:
            resized.append((path, original))
        batch.append((path, image))
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    flush(batch)
    if resized:
        (p, (w, h)), (mh, mw) = resized[0], model.size
        how = "centre-cropped and resized" if model.crop else "resized"
        print(f"note: {len(resized)} image(s) {how} to the model's {mw}x{mh} (e.g. {p}, {w}x{h})", file=err)
    return done, failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dist_resnet.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint (.pt), or an exported .safetensors or .onnx")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--topk", type=int, default=5, help="how many classes to print per image, most likely first "
                                                        "(default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--tta", choices=[t.value for t in TTA], default="none", help="test-time augmentation")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs: auto = the GPU when CUDA is available (an .onnx runs on the CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward (default: the training batch)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--explain", metavar="OUT_DIR", help="write a Grad-CAM overlay per image into OUT_DIR")
    p.add_argument("--explain-class", metavar="NAME", help="with --explain: explain this class, not the predicted one")
    args = p.parse_args(argv)
    try:
        if args.topk < 1 or (args.batch_size is not None and args.batch_size < 1):
            raise PredictError("--topk and --batch-size must be >= 1")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise PredictError("--device cuda but CUDA is not available here; use --device cpu")
        if args.explain_class and not args.explain:
            raise PredictError("--explain-class needs --explain OUT_DIR")
        if args.explain and args.checkpoint.endswith(".onnx"):
            raise PredictError(EXPLAIN_NEEDS_WEIGHTS)
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        model = open_model(args.checkpoint, device, args.ema)
        explain = Explainer(model, args.explain, args.explain_class) if args.explain else None
        done, failed = run(model, args.paths, args.topk, TTA(args.tta), args.batch_size or model.batch_size, args.json,
                           explain=explain)
        if explain is not None:
            print(f"wrote {len(explain.rows) - explain.failed} overlays to {args.explain} (index: "
                  f"{explain.close()})", file=sys.stderr)
    except (PredictError, CheckpointError, ConfigError) as e:
        print(f"dist_resnet.predict: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # `predict ... | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        return 0
    if done + failed == 0:
        print("dist_resnet.predict: error: no image files found in " + " ".join(args.paths), file=sys.stderr)
        raise SystemExit(2)
    unexplained = explain.failed if explain is not None else 0
    if failed or unexplained:
        print(f"dist_resnet.predict: {failed} of {done + failed} files could not be read" +
              (f", {unexplained} explanations could not be written" if unexplained else ""), file=sys.stderr)
        raise SystemExit(2)
    return done


if __name__ == "__main__":
    main()
