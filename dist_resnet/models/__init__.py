"""Models, built by name with `build_model(name, num_classes, width, norm)`.

- `cifar`: resnet18/34/50 for small images (3x3 stem, no max-pool), preact_resnet18 (the adversarial
  training reference's net), and resnet9 (DAWNBench).
- `fastnet`: the time-to-accuracy net of configs/fast.yaml (32x32 only).
- `torchvision`: tv_resnet18/34/50, torchvision's ImageNet ResNets, for fine-tuning (`model.pretrained`).

Every model names its stages from input to output (`stage_modules()`) and has its classification head
in `fc`: freezing (`model.freeze`) and layer-wise LR decay (`optim.layer_decay`) work on those.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError
from . import torchvision as tv
from .cifar import BasicBlock, Bottleneck, CifarResNet, PreActResNet, ResNet9
from .fastnet import FastNet
from .layers import NORMS, DropPath, Norm, Residual

__all__ = ["MODELS", "HEAD", "build_model", "channels_last_fault", "check_model", "check_input", "freeze", "load_weights",
           "parameter_depths", "regularize", "Resized", "PixelInput", "Residual", "to_device", "with_input"]

MODELS: dict[str, Callable[[int, int, Norm], nn.Module]] = {
    "resnet9": lambda classes, width, norm: ResNet9(classes, width, norm),
    "fastnet": lambda classes, width, norm, residual=False: FastNet(classes, width, residual=residual),
    "resnet18": lambda classes, width, norm: CifarResNet(BasicBlock, [2, 2, 2, 2], classes, width, norm),
    "resnet34": lambda classes, width, norm: CifarResNet(BasicBlock, [3, 4, 6, 3], classes, width, norm),
    "preact_resnet18": lambda classes, width, norm: PreActResNet([2, 2, 2, 2], classes, width, norm),
    "resnet50": lambda classes, width, norm: CifarResNet(Bottleneck, [3, 4, 6, 3], classes, width, norm),
    **{name: (lambda n: lambda classes, width, norm: tv.build(n, classes, norm))(name) for name in tv.ARCHS},
}
HEAD = "fc"  # every model's classification head
STAGES = {  # what `model.freeze` may name, input to output (each model's stage_modules() agrees: tested)
    "resnet9": ["prep", "layer1", "layer2", "layer3"],
    "fastnet": ["stem", "stage1", "stage2", "stage3"],
    **{n: ["stem", "stage1", "stage2", "stage3", "stage4"]
       for n in ("resnet18", "resnet34", "resnet50", "preact_resnet18")},
    **{n: ["stem", "layer1", "layer2", "layer3", "layer4"] for n in tv.ARCHS},
}
BATCH_NORM_ONLY = {"fastnet", *tv.ARCHS}  # scale-free BatchNorm; torchvision's (pretrained) BatchNorm
FIXED_WIDTH = set(tv.ARCHS)  # torchvision's widths
INPUT_SIZE = {"fastnet": (32, 32)}  # built for exactly this size
MIN_SIZE = {"resnet9": 8, "resnet18": 8, "preact_resnet18": 8, "resnet34": 8, "resnet50": 8,
            **{n: 32 for n in tv.ARCHS}}  # total stride


def check_model(name: str, norm: str, width: int = 64, freeze: str = "none") -> None:
    """ValueError unless these settings make a model (the config checks with this too)."""
    if name not in MODELS:
        raise ValueError(f"bad value for 'model.name': '{name}'. Valid: {', '.join(MODELS)}")
    if norm not in NORMS:
        raise ValueError(f"bad value for 'model.norm': '{norm}'. Valid: {', '.join(NORMS)}")
    if name in BATCH_NORM_ONLY and norm != "batch":
        raise ValueError(f"model.name={name} is built around BatchNorm; use model.norm=batch")
    if name in FIXED_WIDTH and width != 64:
        raise ValueError(f"model.name={name} has torchvision's widths; model.width={width} does not apply (leave 64)")
    valid = ["none", "backbone", *STAGES[name]]
    if freeze not in valid:
        raise ValueError(f"bad value for 'model.freeze': '{freeze}'. Valid for {name}: {', '.join(valid)}")


def check_input(name: str, height: int, width: int, where: str) -> None:
    """ValueError unless model `name` can take `height` x `width` images (from `where`)."""
    if name in INPUT_SIZE and (height, width) != INPUT_SIZE[name]:
        h, w = INPUT_SIZE[name]
        raise ValueError(f"model.name={name} is built for {h}x{w} images, but {where} gives {height}x{width}: "
                         f"use another model (resnet9, resnet18, tv_resnet50, ...) or prepare with --resize {h}")
    if min(height, width) < MIN_SIZE.get(name, 1):
        raise ValueError(f"model.name={name} needs images of at least {MIN_SIZE[name]} px (its total stride), but "
                         f"{where} gives {height}x{width}: upsample them with data.resize=N")


def build_model(name: str, num_classes: int = 10, width: int = 64, norm: str = "batch",
                residual: bool = False, blurpool: bool = False) -> nn.Module:
    """`norm`: "batch" (BatchNorm2d) or "group" (GroupNorm, independent of the batch); `residual`: fastnet's
    earlier stage shape (model.residual); `blurpool`: blur before each strided convolution (tv_* models)."""
    check_model(name, norm, width)
    model = MODELS[name](num_classes, width, NORMS[norm], **({"residual": True} if residual else {}))
    if blurpool:
        from .torchvision import apply_blurpool

        apply_blurpool(model)
    return model


def parameter_depths(model: nn.Module) -> tuple[dict[int, int], int]:
    """id(parameter) -> depth: 0..S-1 for the S stages from the input, S for the head (and anything
    outside the stages); and S. Layer-wise LR decay scales depth d by decay ** (S - d)."""
    stages = model.stage_modules()
    depth = {id(p): d for d, (_, mods) in enumerate(stages) for m in mods for p in m.parameters()}
    return depth, len(stages)


class DroppedLinear(nn.Linear):
    """The head with dropout on its input (model.dropout), in training only; its keys are nn.Linear's."""

    p = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.dropout(x, self.p, self.training), self.weight, self.bias)


def has_residual_branches(name: str, residual: bool = False) -> bool:
    return name != "fastnet" or residual  # airbench's fastnet stages have none; model.residual adds them


def regularize(model: nn.Module, dropout: float, drop_path: float) -> list[float]:
    """Dropout before the head (`model.dropout`) and stochastic depth on every residual branch
    (`model.drop_path`), its rate rising linearly with depth from 0 at the first block to `drop_path` at
    the last (timm's schedule). Neither adds a parameter or acts in eval mode. Returns the blocks' rates;
    ValueError for a model without residual branches."""
    if dropout:
        head = getattr(model, HEAD)
        head.__class__, head.p = DroppedLinear, dropout
    if not drop_path:
        return []
    blocks = [m for m in model.modules() if isinstance(getattr(m, "drop_path", None), nn.Module)]
    if not blocks:
        raise ValueError(f"model.drop_path={drop_path:g}: {type(model).__name__} has no residual branches to drop")
    rates = [drop_path * i / max(1, len(blocks) - 1) for i in range(len(blocks))]
    for block, rate in zip(blocks, rates):
        block.drop_path = DropPath(rate)
    return rates


_frozen_classes: dict[type, type] = {}


def _frozen(cls: type) -> type:
    """A subclass of a BatchNorm class that stays in eval mode: frozen layers keep their statistics."""
    if cls not in _frozen_classes:
        _frozen_classes[cls] = type(f"Frozen{cls.__name__}", (cls,),
                                    {"train": lambda self, mode=True: nn.Module.train(self, False)})
    return _frozen_classes[cls]


def freeze(model: nn.Module, spec: str) -> list[str]:
    """Freeze `backbone` (all stages: a linear probe) or every stage up to and including `spec`: their
    parameters stop training and their BatchNorm layers stay in eval mode. Returns the frozen stages."""
    if spec == "none":
        return []
    stages = model.stage_modules()
    names = [n for n, _ in stages]
    upto = len(stages) if spec == "backbone" else names.index(spec) + 1
    for _, mods in stages[:upto]:
        for m in mods:
            m.requires_grad_(False)
            for sub in m.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.__class__ = _frozen(type(sub))
                    sub.eval()
    return names[:upto]


class Resized(nn.Module):
    """`data.resize`: upsample the batch to size x size on the device before the net, since ImageNet
    nets lose most of a 32x32 image in their stride-4 stem. No parameters: checkpoints hold `net`."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False))


# torch 2.14.1's oneDNN (v3.12) writes out of bounds in the weight gradient of a strided 1x1 convolution laid out
# channels_last on the CPU when it has fewer input channels than a vector register holds floats (2-7 on AVX2,
# 8 reported on AVX512): heap corruption, then a segfault, "double free or corruption" or a hang, some steps
# later. Contiguous memory takes other kernels (docs/TRAINING.md, "A crash in oneDNN on CPU";
# docs/onednn_1x1.py reproduces it). 16 covers both vector widths.
UNSAFE_1X1_CHANNELS = range(2, 16)


def channels_last_fault(net: nn.Module, device: torch.device) -> str | None:
    """Why `net` must not train channels_last on `device` (the first layer that would corrupt memory), or None."""
    if device.type != "cpu":
        return None
    for name, m in net.named_modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
                and m.in_channels in UNSAFE_1X1_CHANNELS):
            return (f"on the CPU, torch's oneDNN corrupts memory in the weight gradient of a strided 1x1 convolution "
                    f"in channels_last with {m.in_channels} input channels ({name}; fewer than 16): the run trains "
                    "in contiguous memory (docs/TRAINING.md, 'A crash in oneDNN on CPU')")
    return None


def to_device(net: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """`net` on `device`, in the NHWC memory format with `channels_last` (model.channels_last)."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def with_input(net: nn.Module, resize: int) -> nn.Module:
    """`net` behind the input adapter: upsampled to resize x resize first (data.resize), or as it is."""
    return Resized(net, resize) if resize else net


class PixelInput(nn.Module):
    """The model as a user calls it: float RGB in [0, 1], normalised (and resized) inside."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], resize: int = 0):
        super().__init__()
        self.net = with_input(net, resize)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """Load `state` into `model` exactly; a CheckpointError naming `source` and the first mismatches
    (another model, width or class count) instead of torch's page-long RuntimeError."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and getattr(state[k], "shape", None) != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shapes differ ({', '.join(shapes[:2])}{', ...' if len(shapes) > 2 else ''})")
    if missing:
        problems.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if problems:
        raise CheckpointError(f"{source} holds weights for another model than the one configured: "
                              f"{'; '.join(problems)}")
    model.load_state_dict(state)
