"""Every check a run makes before it builds anything, in one place: the config against this machine, the world
size, the data, the resume point, the weights it starts from and the run folder. `plan(cfg, env)` makes them
and returns what they found (`Plan`), which `build` then builds from; `python -m dist_resnet.train --check`
(the launch scripts' first step) calls the very same function, so that what the check passes the run cannot
then refuse.

The order is the run's: runtime checks -> data opened -> resume point agreed by every rank -> pretrained
weights and normalisation -> the split and the data's checks -> the model's fit (a model on the meta device, in
the widths its weights record: no memory, no RNG draw) -> the teacher (distill.teacher) -> the run folder free.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import rundir
from ..config import Config, ConfigError, Normalization, Precision
from ..data import sizes
from ..data.loader import check_partition, check_resident
from ..data.manifest import Betons
from ..data.split import split_indices
from ..distributed import DistEnv
from ..models import build_model, channels_last_fault, check_input, files, regularize
from ..models.widths import kept_share, rebuild
from ..precision import Amp
from ..tracking import check_installed
from .distill import teacher_file
from .state import find_resume_point


@dataclass
class Plan:
    """What the checks found, for `build`."""

    amp: Amp
    betons: Betons
    resume: tuple[Path, dict] | None  # the checkpoint this run continues from
    pretrained: files.ModelFile | None  # the weights a fresh run starts from
    mean: list[float]
    std: list[float]
    train_idx: np.ndarray | None  # the train beton's images to train on (None: all)
    val_idx: np.ndarray  # the validation split's (none without one)
    channels_last: bool  # model.channels_last, unless this device's kernels cannot take it for this model
    steps_per_epoch: int
    total_steps: int
    teacher: files.ModelFile | None = None  # distill.teacher, opened and checked against the data
    widths: tuple[dict, str] | None = None  # the layers' widths the model is rebuilt to (a pruned model's), and whence


def runtime_checks(cfg: Config, env: DistEnv) -> Amp:
    """What the config asks of this machine and world size; the precision to run in."""
    t, cuda = cfg.train, env.device.type == "cuda"
    amp = Amp.on(t.precision, env.device)
    check_installed(cfg)
    if t.loss_scale and amp.precision != Precision.fp16:
        raise ConfigError(f"train.loss_scale={t.loss_scale:g} is for train.precision=fp16 "
                          f"(it is {amp.precision.value})")
    if t.batch_size % (env.world_size * t.accum_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} (global) does not divide by the world size "
                          f"{env.world_size} x train.accum_steps {t.accum_steps}; use a multiple of "
                          f"{env.world_size * t.accum_steps}")
    mixing = cfg.data.mixup_alpha or cfg.data.cutmix_alpha
    if mixing and t.batch_size // (env.world_size * t.accum_steps) % 2:
        raise ConfigError(f"Mixup/CutMix mixes each image with its neighbour, so every micro-batch must be even; "
                          f"train.batch_size={t.batch_size} over {env.world_size} ranks x train.accum_steps "
                          f"{t.accum_steps} gives {t.batch_size // (env.world_size * t.accum_steps)}: use a multiple "
                          f"of {2 * env.world_size * t.accum_steps}")
    if cfg.model.sync_bn and env.distributed and not cuda:
        raise ConfigError("model.sync_bn=true needs GPUs (torch has no CPU SyncBatchNorm); "
                          "on CPU use model.norm=group for batch-independent normalisation")
    return amp


def data_checks(cfg: Config, env: DistEnv, betons: Betons, amp: Amp, train_count: int, val_count: int) -> None:
    """What the config asks of this data: images the model takes, batches that fit, ranks with images, and
    device memory for data.pipeline=device."""
    sizes.check(cfg.data, betons)
    train_hw = sizes.shapes(cfg.data, betons)[0]
    size = (cfg.data.resize,) * 2 if cfg.data.resize else train_hw
    try:
        check_input(cfg.model.name, *size, f"data.dir={cfg.data.dir}" +
                    (f" with data.resize={cfg.data.resize}" if cfg.data.resize else ""))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    b, world = cfg.train.batch_size, env.world_size
    if train_count < b:
        raise ConfigError(f"the global batch of {b} is larger than the {train_count} train images, so an epoch "
                          f"would have no step; lower train.batch_size (each of {world} ranks would take {b // world})")
    side, translate = min(train_hw), round(cfg.data.translate * min(train_hw) / 32)
    if cfg.data.crop.value == "translate" and cfg.data.translate_pad.value == "reflect" and translate >= side:
        raise ConfigError(f"data.translate_pad=reflect needs a translation below the image side ({side} px); "
                          f"data.translate={cfg.data.translate} gives {translate} px")
    check_partition(world, betons.count("test"), "test")
    check_partition(world, val_count, "validation")
    check_resident(betons, cfg.data, "train", train_count, env.device, amp.input_dtype(cfg.data.fp32_input))


def pretrained_weights(cfg: Config, resume: tuple[Path, dict] | None) -> files.ModelFile | None:
    """The weights a fresh run starts from (model.pretrained); a resumed run takes its checkpoint's."""
    m = cfg.model
    if resume is not None or not m.pretrained:
        return None
    return files.torchvision_weights(m.name) if m.pretrained == "torchvision" else files.read(m.pretrained)


def normalization(cfg: Config, betons: Betons, pretrained: files.ModelFile | None,
                  resume: tuple[Path, dict] | None) -> tuple[list[float], list[float]]:
    """The inputs' mean/std (in [0, 1]): a resumed run keeps its own; `auto` follows the weights:
    ImageNet's for torchvision's pretrained weights on a tv_* model, the dataset's otherwise."""
    if resume is not None and resume[1].get("normalize"):
        n = resume[1]["normalize"]
        return n["mean"], n["std"]
    how = cfg.data.normalize
    if how == Normalization.auto:
        foreign = pretrained is not None and not pretrained.ours
        how = Normalization.imagenet if foreign and cfg.model.name.startswith("tv_") else Normalization.dataset
    if how == Normalization.imagenet:
        return files.IMAGENET_MEAN, files.IMAGENET_STD
    return betons.manifest["mean"], betons.manifest["std"]


def total_steps(cfg: Config, per_epoch: int) -> int:
    """All epochs' steps, or train.max_steps, which must end the run inside its last epoch."""
    t = cfg.train
    if not t.max_steps:
        return per_epoch * t.epochs
    if not per_epoch * (t.epochs - 1) < t.max_steps <= per_epoch * t.epochs:
        raise ConfigError(f"train.max_steps={t.max_steps} must fall in the last of train.epochs={t.epochs} "
                          f"epochs of {per_epoch} steps: set train.epochs={math.ceil(t.max_steps / per_epoch)}")
    return t.max_steps


def model_widths(resume: tuple[Path, dict] | None, pretrained: files.ModelFile | None) -> tuple[dict, str] | None:
    """The widths the model takes (dist_resnet.models.widths), and the file that records them: a resumed run's
    checkpoint's, or its pretrained weights' where they are a pruned model's (which fine-tunes in its own shape;
    other weights must fit the configured model, as before)."""
    if resume is not None and resume[1].get("widths"):
        return resume[1]["widths"], str(resume[0])
    if pretrained is not None and kept_share(pretrained.widths, pretrained.config) is not None:
        return pretrained.widths, pretrained.path
    return None


def built(cfg: Config, classes: int, shape: tuple[dict, str] | None):
    """The configured model, in the recorded widths, with its dropout and stochastic depth."""
    m = cfg.model
    model = rebuild(build_model(m.name, classes, m.width, m.norm.value, m.residual, m.blurpool), *(shape or (None, "")))
    regularize(model, m.dropout, m.drop_path)
    return model


def model_fit(cfg: Config, env: DistEnv, betons: Betons, pretrained: files.ModelFile | None,
              shape: tuple[dict, str] | None, say: Callable) -> bool:
    """The model, built on the meta device in its recorded widths: the pretrained weights must fit it
    (CheckpointError naming the tensors), and the memory format it trains in (channels_last, unless this device's
    kernels fault on it)."""
    m = cfg.model
    with torch.device("meta"):
        model = built(cfg, len(betons.classes), shape)
    if pretrained is not None:
        files.match_pretrained(model.state_dict(), pretrained, betons.classes)
    fault = channels_last_fault(model, env.device) if m.channels_last else None
    if fault:
        say(f"note: model.channels_last is off for this run: {fault}")
    return m.channels_last and not fault


def plan(cfg: Config, env: DistEnv, say: Callable) -> Plan:
    """Every check of the run, before anything is built or written; what they found. ConfigError, DataError or
    CheckpointError (one line, exit 2) for the first that fails."""
    amp = runtime_checks(cfg, env)
    betons = Betons.open(cfg.data.dir, cfg.data.verify)
    resume = find_resume_point(cfg, env, betons, amp, say)  # the same on every rank, or a clear error
    pretrained = pretrained_weights(cfg, resume)
    mean, std = normalization(cfg, betons, pretrained, resume)
    d = cfg.data
    train_idx, val_idx = split_indices(betons, d.val_fraction, d.val_seed, d.folds, d.fold)
    train_count = betons.count("train") if train_idx is None else len(train_idx)
    data_checks(cfg, env, betons, amp, train_count, len(val_idx))
    shape = model_widths(resume, pretrained)
    channels_last = model_fit(cfg, env, betons, pretrained, shape, say)
    teacher = teacher_file(cfg, betons)
    per_epoch = train_count // cfg.train.batch_size  # drop_last: the global batches of the train order
    steps = total_steps(cfg, per_epoch)
    if env.is_main:
        folder_free(Path(cfg.run.dir))
    return Plan(amp, betons, resume, pretrained, mean, std, train_idx, val_idx, channels_last, per_epoch, steps,
                teacher, shape)


def folder_free(run_dir: Path) -> None:
    """ConfigError if another trainer holds `run_dir` now (the run takes it for itself once it is built)."""
    who = rundir.holder(run_dir)
    if who is not None:
        raise ConfigError(rundir.busy_message(run_dir, who))


def check_env(world_sizes: list[int], device: str) -> list[DistEnv]:
    """The processes `--check` stands for: rank 0 of each world size the run may have, on this machine's device
    (`train.device`), without a process group."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available here; use train.device=cpu or auto")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return [DistEnv(0, w, 0, min(local, w), dev) for w in world_sizes]
