"""Write CIFAR-10 (or any ImageFolder, any image size) as FFCV betons.

    python -m dist_resnet.data.prepare --source SRC --out DIR [--force] [--resize N | --resize H W]
    python -m dist_resnet.data.prepare --source SRC --out DIR --write-mode smart   # photos of mixed sizes
    python -m dist_resnet.data.prepare --verify DIR      # check the betons against the manifest

SRC is `torchvision` (download CIFAR-10), an ImageFolder directory with
`train/<class>/*` and `test/<class>/*`, or a .tar/.tar.gz/.tgz of one.
Writes DIR/train.beton and DIR/test.beton (RGBImageField raw mode: lossless;
IntField label) and DIR/manifest.json. With any photo option (--write-mode, --max-resolution,
--jpeg-quality, --compress-probability), each image keeps its own size instead (dist_resnet.data.photos).
Everything is validated and written into
a temporary folder first, so a failure leaves DIR as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..fileio import sha256
from . import writer
from .manifest import SPLITS, Betons, DataError, PrepareError

FILES = ("train.beton", "test.beton", "manifest.json")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# ---------------------------------------------------------------- sources
def _find_root(folder: Path) -> Path:
    """The folder holding train/ and test/: `folder` itself or its single child."""
    if all((folder / s).is_dir() for s in SPLITS):
        return folder
    children = [c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1 and all((children[0] / s).is_dir() for s in SPLITS):
        return children[0]
    found = sorted(c.name for c in folder.iterdir()) if folder.is_dir() else []
    raise PrepareError(
        f"{folder} is not an ImageFolder source: it needs train/<class>/* and test/<class>/* "
        f"(found: {', '.join(found) or 'nothing'})"
    )


def select_classes(names: list[str], only: list[str] | None, where: str) -> list[str]:
    """`names` restricted to `only` (in the order of `names`); PrepareError for a name not there, or for fewer
    than two classes (a classifier of one class is right by construction: it would train to "acc 1.0000")."""
    unknown = [c for c in only or [] if c not in names]
    if unknown:
        raise PrepareError(f"--classes names {', '.join(unknown)}, not in {where}; its classes: {', '.join(names)}")
    kept = [n for n in names if n in only] if only else names
    if len(kept) < 2:
        raise PrepareError(f"{where} gives {len(kept)} class ({', '.join(kept)}"
                           f"{' with --classes' if only else ''}): a classifier needs at least two, one folder each "
                           "under train/ and test/")
    return kept


def _list_images(root: Path, only: list[str] | None = None) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    classes = {}
    for split in SPLITS:
        classes[split] = sorted(d.name for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes[split]:
            raise PrepareError(f"{root / split} has no class folders; expected {split}/<class>/<image>")
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise PrepareError(
            f"train and test class sets differ in {root}: only in train: {only_train or 'none'}; "
            f"only in test: {only_test or 'none'}. Both splits need the same class folders."
        )
    names = select_classes(classes["train"], only, str(root))
    items: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        items[split] = []
        for label, name in enumerate(names):
            files = sorted(f for f in (root / split / name).iterdir() if f.is_file() and not f.name.startswith("."))
            if not files:
                raise PrepareError(f"class folder {root / split / name} is empty")
            items[split] += [(f, label) for f in files]
    return names, items


def _decode(job: tuple[str, tuple[int, int] | None]) -> tuple[np.ndarray | None, str, str | None]:
    """Decode one file to HxWx3 uint8 (resized to `size` = (H, W) if given); (image, original mode, error)."""
    from PIL import Image, UnidentifiedImageError

    path, size = job
    try:
        with Image.open(path) as im:
            mode = im.mode
            im = im.convert("RGB")  # grayscale, RGBA (alpha dropped), palette, CMYK ... -> RGB
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return None, "", f"{path} is not a readable image ({type(e).__name__}: {e})"
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8), mode, None


def _decode_all(files: list[tuple[Path, int]], size: tuple[int, int] | None, split: str, workers: int,
                modes: Counter) -> tuple[np.ndarray, np.ndarray]:
    jobs = [(str(f), size) for f, _ in files]
    images, shapes = [], Counter()
    with ProcessPoolExecutor(workers) as pool:
        it = pool.map(_decode, jobs, chunksize=512)
        for img, mode, err in tqdm(it, total=len(jobs), desc=f"decode {split}", unit="img"):
            if err is not None:
                raise PrepareError(err)
            images.append(img)
            shapes[img.shape[:2]] += 1
            modes[mode] += 1
    if len(shapes) > 1:
        seen = ", ".join(f"{w}x{h} ({n})" for (h, w), n in shapes.most_common(3))
        raise PrepareError(f"the {split} images have {len(shapes)} different sizes ({seen}{', ...' if len(shapes) > 3 else ''}): "
                           "pass --resize N (N x N) or --resize H W to bring them all to one size, or --write-mode smart to "
                           "keep each photo's size for random-resized crops (data.crop=rrc)")
    return np.stack(images), np.array([label for _, label in files], dtype=np.int64)


def load_folder(root: Path, size: tuple[int, int] | None, workers: int, modes: Counter, only: list[str] | None):
    names, items = _list_images(_find_root(root), only)
    data = {s: _decode_all(items[s], size, s, workers, modes) for s in SPLITS}
    if data["train"][0].shape[1:] != data["test"][0].shape[1:]:
        (h, w), (th, tw) = data["train"][0].shape[1:3], data["test"][0].shape[1:3]
        raise PrepareError(f"the train images are {w}x{h} but the test images {tw}x{th}: "
                           "pass --resize N or --resize H W to bring both to one size")
    return names, data


def load_torchvision(download_root: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    from torchvision.datasets import CIFAR10

    data = {}
    for split in SPLITS:
        try:
            ds = CIFAR10(str(download_root), train=split == "train", download=True)
        except Exception as e:  # network errors come in many types
            raise PrepareError(
                f"torchvision CIFAR-10 download into {download_root} failed ({type(e).__name__}: {e}). "
                "Without internet, pass --source PATH to an ImageFolder directory or tarball."
            ) from None
        data[split] = (np.ascontiguousarray(ds.data), np.array(ds.targets, dtype=np.int64))
    return list(ds.classes), data


def load_source(source: str, size: tuple[int, int] | None, download_root: Path, workers: int, tmp: Path,
                modes: Counter, only: list[str] | None = None):
    if source == "torchvision":
        names, data = load_torchvision(download_root)
        keep = select_classes(names, only, "CIFAR-10")
        relabel = np.full(len(names), -1)
        relabel[[names.index(n) for n in keep]] = np.arange(len(keep))
        return keep, {s: (x[relabel[y] >= 0], relabel[y][relabel[y] >= 0]) for s, (x, y) in data.items()}
    return load_folder(unpack(source, tmp), size, workers, modes, only)


def unpack(source: str, tmp: Path) -> Path:
    """The ImageFolder directory that `source` names: itself, or the tarball extracted under `tmp`."""
    src = Path(source)
    if not src.exists():
        raise PrepareError(f"source {src} does not exist; give 'torchvision', an ImageFolder directory or a tarball")
    if src.is_dir():
        if not any(src.iterdir()):
            raise PrepareError(f"source directory {src} is empty")
        return src
    if not src.name.endswith(TAR_SUFFIXES):
        raise PrepareError(f"source {src} is a file but not a {'/'.join(TAR_SUFFIXES)} archive")
    try:
        with tarfile.open(src) as tar:
            if not tar.getmembers():
                raise PrepareError(f"archive {src} is empty")
            tar.extractall(tmp / "src", filter="data")
    except tarfile.TarError as e:
        raise PrepareError(f"cannot read archive {src}: {e}") from None
    return tmp / "src"


# ---------------------------------------------------------------- writing
class _Arrays:
    """Indexable (image, label) view that FFCV's DatasetWriter consumes."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from ffcv.fields import IntField, RGBImageField

    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    # one worker: the file's bytes (and so its sha256) do not depend on scheduling
    writer.write(path, fields, _Arrays(images, labels), workers=1)


def fixed(source: str, size: tuple[int, int] | None, download_root: Path, workers: int, tmp: Path,
          classes: list[str] | None) -> dict:
    """Decode every image (to `size`, or at the one size they share) and write raw betons into `tmp`; the
    manifest. CIFAR-10's path: its betons are the same bytes on every run (the fingerprint's test)."""
    modes: Counter = Counter()
    names, data = load_source(source, size, download_root, workers, tmp, modes, classes)
    train_x = data["train"][0]
    manifest = {
        "format": 1,
        "source": source if source == "torchvision" else str(Path(source).resolve()),
        "classes": names,
        "image_shape": list(train_x.shape[1:]),  # H, W, 3
        "resized_to": list(size) if size else None,
        # original modes converted to RGB (e.g. {"L": 3, "RGBA": 1}); RGBA loses its alpha
        "converted_modes": {m: n for m, n in sorted(modes.items()) if m != "RGB"},
        # per-channel statistics of the train split, in [0, 1]; the loader normalises with them
        "mean": (train_x.reshape(-1, 3).mean(0, dtype=np.float64) / 255).round(6).tolist(),
        "std": (train_x.reshape(-1, 3).std(0, dtype=np.float64) / 255).round(6).tolist(),
    }
    for split in SPLITS:
        images, labels = data[split]
        path = tmp / f"{split}.beton"
        write_beton(path, images, labels)
        manifest[split] = {
            "file": path.name,
            "count": int(len(labels)),
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
            "class_counts": np.bincount(labels, minlength=len(names)).tolist(),
        }
    return manifest


def photos(source: str, storage: "Storage", workers: int, tmp: Path, classes: list[str] | None) -> dict:
    """Variable-resolution betons of a folder of mixed-size photos (dist_resnet.data.photos); the manifest."""
    from .photos import write_photos

    if source == "torchvision":
        raise PrepareError("--write-mode and the other photo options take an ImageFolder directory or tarball; "
                           "torchvision's CIFAR-10 is written raw at 32x32 (leave them out)")
    problem = storage.problem()
    if problem:
        raise PrepareError(problem)
    names, items = _list_images(_find_root(unpack(source, tmp)), classes)
    return write_photos(tmp, names, items, storage, workers, str(Path(source).resolve()))


def prepare(source: str, out: Path, force: bool = False, resize: int | tuple[int, int] | None = None,
            download_root: Path | None = None, workers: int | None = None, classes: list[str] | None = None,
            storage: "Storage | None" = None) -> dict:
    """Write `out`/{train,test}.beton and manifest.json. `resize`: N (N x N) or (H, W) brings every image
    to that size; without it, all images must share one size, which is kept. `classes`: only these
    classes (labels 0..k-1 in the source's order). `storage` (photos.Storage): variable-resolution betons
    of mixed-size photos instead, stored as it says (not with `resize`)."""
    out = Path(out)
    existing = [f for f in FILES if (out / f).exists()]
    if existing and not force:
        raise PrepareError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite")
    size = (resize, resize) if isinstance(resize, int) else (tuple(resize) if resize else None)
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise PrepareError(f"--resize takes N or H W (positive), not {resize}")
    if size is not None and storage is not None:
        raise PrepareError("--resize brings every image to one size; the photo options (--write-mode ...) keep "
                           "each image's own size for random-resized crops. Give one or the other")
    if workers is not None and workers < 1:
        raise PrepareError(f"--workers must be at least 1 (processes that decode and write), not {workers}")
    download_root = download_root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dist_resnet"
    workers = workers or min(8, os.cpu_count() or 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in writer.clean_stale(out):
        print(f"removed {stale}, left by a prepare that was killed")
    # the folder names its process: a later prepare removes it if that process was killed (SIGKILL) before its end
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent) as tmp_str:
        tmp = Path(tmp_str)
        writer.WRITING[:] = [tmp]
        if storage is None:
            manifest = fixed(source, size, download_root, workers, tmp, classes)
        else:
            manifest = photos(source, storage, workers, tmp, classes)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for f in FILES:  # manifest last: a folder with a manifest is complete
            os.replace(tmp / f, out / f)
        shutil.rmtree(tmp / "src", ignore_errors=True)
    writer.WRITING.clear()
    return manifest


def verify(data_dir: Path) -> dict:
    """Check a prepared folder: the manifest, every beton's size and sha256. DataError on the first fault."""
    return Betons.open(data_dir, verify=True).manifest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist_resnet.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="'torchvision', an ImageFolder directory, or a .tar/.tar.gz of one")
    p.add_argument("--out", type=Path, help="output folder for train.beton, test.beton, manifest.json")
    p.add_argument("--verify", type=Path, metavar="DIR", help="check DIR's betons against its manifest, then exit")
    p.add_argument("--force", action="store_true", help="overwrite existing betons in --out")
    p.add_argument("--resize", type=int, nargs="+", metavar="N", default=None,
                   help="resize every image to N x N (--resize N) or H x W (--resize H W); without it all images "
                        "must share one size, which is kept")
    p.add_argument("--classes", help="only these classes, comma-separated (e.g. airplane,automobile,bird)")
    p.add_argument("--download-root", type=Path, default=None, help="torchvision download cache (default ~/.cache/dist_resnet)")
    p.add_argument("--workers", type=int, default=None, help="decode/write processes (default: CPU count, at most 8)")
    g = p.add_argument_group("photos of mixed sizes (any of these: variable-resolution betons, each image at its "
                             "own size, cropped when read: data.crop=rrc, data.res, data.test_res)")
    g.add_argument("--write-mode", choices=("raw", "jpg", "smart", "proportion"), default=None,
                   help="raw: lossless; jpg: JPEG; smart (default): JPEG above 256x256's raw size, raw below; "
                        "proportion: JPEG for a random --compress-probability share (FFCV's ImageNet recipe)")
    g.add_argument("--max-resolution", type=int, default=None, help="longer side at most N px (default 512)")
    g.add_argument("--jpeg-quality", type=int, default=None, help="JPEG quality 1..100 (default 90)")
    g.add_argument("--compress-probability", type=float, default=None, help="proportion: the JPEG share (default 0.5)")
    return p


def storage_of(args: argparse.Namespace):
    """photos.Storage from the photo options, or None when none was given (fixed-size betons)."""
    given = {k: v for k, v in (("write_mode", args.write_mode), ("max_resolution", args.max_resolution),
                               ("jpeg_quality", args.jpeg_quality),
                               ("compress_probability", args.compress_probability)) if v is not None}
    if not given:
        return None
    from .photos import Storage

    return Storage(**given)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.verify is not None:
        try:
            m = verify(args.verify)
        except DataError as e:
            print(f"prepare: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"{args.verify}: manifest, sizes and sha256 of train.beton ({m['train']['count']} images) and "
              f"test.beton ({m['test']['count']} images) all match")
        return
    if not args.source or not args.out:
        p.error("--source and --out are required (or --verify DIR)")
    try:
        if args.resize is not None and len(args.resize) not in (1, 2):
            raise PrepareError(f"--resize takes N or H W, not {' '.join(map(str, args.resize))}")
        resize = None if args.resize is None else (args.resize[0] if len(args.resize) == 1 else tuple(args.resize))
        only = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        with writer.stop_on_signals():
            m = prepare(args.source, args.out, args.force, resize, args.download_root, args.workers, only,
                        storage_of(args))
    except PrepareError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if m["image_shape"]:
        h, w = m["image_shape"][:2]
        shape = f"{w}x{h}"
    else:
        lo, hi = m["train"]["sizes"]["min_hw"], m["train"]["sizes"]["max_hw"]
        shape = f"{lo[1]}x{lo[0]} to {hi[1]}x{hi[0]} ({m['train']['stored_jpeg']} train images as JPEG)"
    converted = ", ".join(f"{n} {k}" for k, n in m["converted_modes"].items())
    print(f"wrote {args.out}: train {m['train']['count']}, test {m['test']['count']} images of {shape}, "
          f"{len(m['classes'])} classes" + (f"; converted to RGB: {converted}" if converted else ""))


if __name__ == "__main__":
    main()
