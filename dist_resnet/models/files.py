"""One way to open a model file, for `model.pretrained`, evaluate, predict and export.

- our checkpoint (`.pt`): the weights (or the EMA's), the training config, class names and the
  normalisation it was trained with;
- a `.safetensors` file: its tensors, and ours also carry that metadata (dist_resnet.export);
- any other torch file (a torchvision `.pth` state dict, a `{"state_dict": ...}` file);
- the word `torchvision`: torchvision's default ImageNet weights for a `tv_*` model, downloaded.

Files are read with `torch.load(weights_only=True)` (dist_resnet.checkpoint.load) or safetensors, so
none can run code. `load_pretrained` then fits the weights to a model whose head may differ.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, load
from ..fileio import sha256
from . import HEAD

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
META_FORMAT = "dist_resnet"  # the `format` metadata key of the safetensors files we write


@dataclass
class ModelFile:
    path: str
    kind: str  # "checkpoint" | "safetensors" | "state_dict" | "torchvision"
    weights: dict[str, torch.Tensor]
    config: dict | None = None  # the training config (a plain dict), when the file is ours
    classes: list[str] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    image_shape: list[int] | None = None  # [H, W] of the training images
    widths: dict | None = None  # every layer's width (dist_resnet.models.widths), in files of ours
    state: dict = field(default_factory=dict, repr=False)  # the whole checkpoint, when it is one

    @property
    def ours(self) -> bool:
        return self.config is not None


def _strip(weights: dict) -> dict[str, torch.Tensor]:
    """Keys as saved by a wrapped model (DDP's `module.`, torch.compile's `_orig_mod.`), unwrapped."""
    out = {}
    for k, v in weights.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _tensors_only(path: str, weights: object) -> dict[str, torch.Tensor]:
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors that we recognise (keys: "
                              f"{', '.join(list(weights)[:5]) if isinstance(weights, dict) else type(weights).__name__})")
    return _strip(weights)


def read(path: str | Path, ema: bool = False) -> ModelFile:
    """Open `path` safely; CheckpointError, naming it, for anything that is not a model file."""
    path = str(path)
    if path.endswith(".safetensors"):
        if ema:
            raise CheckpointError(f"{path} holds one set of weights, not a checkpoint's raw and EMA weights: --ema "
                                  "applies to checkpoints (.pt); export the EMA weights with export --ema")
        return _read_safetensors(path)
    state = load(path, required=())
    if "model" in state and "config" in state:  # one of our checkpoints
        if ema and state.get("ema") is None:
            raise CheckpointError(f"{path} holds no EMA weights (it was trained with train.ema=false)")
        norm = state.get("normalize") or {}
        return ModelFile(path, "checkpoint", _tensors_only(path, state["ema"] if ema else state["model"]),
                         state["config"], state.get("classes"), norm.get("mean"), norm.get("std"),
                         state.get("image_shape"), state.get("widths"), state)
    if ema:
        raise CheckpointError(f"{path} is not a dist_resnet checkpoint, so it has no EMA weights")
    return ModelFile(path, "state_dict", _tensors_only(path, state.get("state_dict", state)))


def _read_safetensors(path: str) -> ModelFile:
    try:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package: "
                              "pip install 'dist_resnet[export]'") from None
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        weights = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None
    if meta.get("format") != META_FORMAT:
        return ModelFile(path, "safetensors", _strip(weights))
    try:
        parsed = {k: json.loads(meta[k]) for k in ("config", "classes", "mean", "std", "image_shape")}
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}'s dist_resnet metadata is incomplete or damaged ({e})") from None
    try:
        widths = json.loads(meta["widths"]) if "widths" in meta else None  # files before the record have none
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}'s widths record is damaged ({e})") from None
    return ModelFile(path, "safetensors", _strip(weights), parsed["config"], parsed["classes"], parsed["mean"],
                     parsed["std"], parsed["image_shape"], widths)


def torchvision_weights(model_name: str) -> ModelFile:
    """torchvision's default ImageNet weights for a tv_* model, from torch's hub cache ($TORCH_HOME/hub/
    checkpoints, downloaded there if missing), read like any other file: weights-only, then checked against
    the sha256 prefix in its name. torchvision's own loader unpickles the cached file fully, and that cache
    is often a shared folder, so it is not used."""
    from . import torchvision as tv

    if model_name not in tv.ARCHS:
        raise CheckpointError(f"model.pretrained=torchvision needs a torchvision model ({', '.join(tv.ARCHS)}), "
                              f"not model.name={model_name}; for it, pass a file: model.pretrained=PATH")
    weights = tv.default_weights(model_name)
    path = _hub_file(weights.url, f"torchvision's {weights} for {model_name}")
    state = load(path, required=())  # weights-only: a planted pickle is refused, never run
    if not sha256(path).startswith(_HASH.search(path.name).group(1)):
        raise CheckpointError(f"{path} does not match the sha256 prefix in its name: it is damaged or was replaced; "
                              "delete it to download it again, or pass a file: model.pretrained=PATH")
    return ModelFile(f"torchvision:{weights}", "torchvision", _tensors_only(str(path), state),
                     classes=list(weights.meta.get("categories") or []), mean=IMAGENET_MEAN, std=IMAGENET_STD)


_HASH = re.compile(r"-([a-f0-9]+)\.")  # torch hub's file names carry a prefix of their sha256


def _hub_file(url: str, what: str) -> Path:
    """torch hub's cached copy of `url`, downloaded (hash-checked) if it is not there yet."""
    from urllib.parse import urlparse

    from torch.hub import download_url_to_file, get_dir

    path = Path(get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        download_url_to_file(url, str(path), _HASH.search(path.name).group(1), progress=False)
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a bad download: all mean "pass a file"
        raise CheckpointError(
            f"downloading {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}). "
            "Without internet, pass a file instead: model.pretrained=PATH (a torchvision .pth state dict, one of "
            "our .pt checkpoints or a .safetensors)") from None
    return path


def load_pretrained(model: nn.Module, mf: ModelFile, classes: list[str]) -> dict:
    """Copy `mf`'s weights into `model`, whose head is built for `classes` (match_pretrained says which).
    Returns the report: loaded, reset, missing and unexpected keys."""
    report = match_pretrained(model.state_dict(), mf, classes)
    model.load_state_dict({k: mf.weights[k] for k in report.pop("keys")}, strict=False)
    return report


def match_pretrained(own: dict[str, torch.Tensor], mf: ModelFile, classes: list[str]) -> dict:
    """Which of `mf`'s tensors a model with the state `own` (shapes are enough: a model on the meta device),
    whose head is built for `classes`, takes. The head (`fc`) is loaded only from a file trained on these very
    classes; otherwise it keeps its fresh initialisation ("reset"). Any other tensor must be in the file with
    the model's shape: a shape mismatch or a missing tensor outside the head is a CheckpointError naming the
    keys."""
    same_classes = bool(mf.classes) and list(mf.classes) == list(classes)
    loaded, reset, missing, mismatched = [], [], [], []
    for k, v in own.items():
        head = k.startswith(HEAD + ".")
        if head and not same_classes:
            reset.append(k)
        elif k not in mf.weights:
            (reset if head else missing).append(k)
        elif mf.weights[k].shape != v.shape:
            (reset if head else mismatched).append(f"{k} {tuple(mf.weights[k].shape)} vs {tuple(v.shape)}")
        else:
            loaded.append(k)
    unexpected = [k for k in mf.weights if k not in own]
    if mismatched:
        raise CheckpointError(f"{mf.path} does not fit this model: {len(mismatched)} tensors outside the head "
                              f"have other shapes ({', '.join(mismatched[:3])}{', ...' if len(mismatched) > 3 else ''})")
    real = [k for k in missing if not k.endswith("num_batches_tracked")]
    if real:
        raise CheckpointError(f"{mf.path} lacks {len(real)} of this model's tensors outside the head (e.g. "
                              f"{', '.join(real[:3])}): is it the weights of another model?")
    return {"keys": loaded, "source": mf.path, "kind": mf.kind, "loaded": len(loaded), "reset": reset, "missing": missing,
            "unexpected": unexpected, "head": "loaded" if same_classes else f"reset for {len(classes)} classes"}
