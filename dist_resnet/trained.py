"""A model trained by dist_resnet, opened from one of our files (checkpoint or safetensors) with the
config it was trained with: evaluate, predict and export all open it here."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from .checkpoint import CheckpointError
from .config import Config, load_config
from .models import build_model, channels_last_fault, files, load_weights, to_device, with_input
from .models.widths import rebuild


def arguments(prog: str, doc: str, ema_help: str) -> argparse.ArgumentParser:
    """The command line of a command that opens a trained model: the file, `key=value` overrides of its
    config, and --ema."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="one of our checkpoints (.pt) or exported .safetensors")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config (e.g. data.dir=DIR)")
    p.add_argument("--ema", action="store_true", help=ema_help)
    return p


def describe(cfg: Config, classes: int) -> str:
    return f"{cfg.model.name} (width {cfg.model.width}, {cfg.model.norm.value} norm) for {classes} classes"


def open_trained(path: str, overrides: list[str], ema: bool = False) -> tuple[files.ModelFile, Config, Config]:
    """A file of ours (checkpoint or safetensors) with its training config, and that config overridden."""
    mf = files.read(path, ema=ema)
    if not mf.ours:
        raise CheckpointError(f"{path} holds weights without a dist_resnet training config: evaluate and predict "
                              "take our checkpoints (.pt) and exported .safetensors; use it as model.pretrained")
    return mf, load_config(None, [], base=mf.config), load_config(None, overrides, base=mf.config)


def build_trained(mf: files.ModelFile, trained: Config, cfg: Config, num_classes: int) -> nn.Module:
    """The trained net with its weights, for `cfg` (which may override only what does not change the net)."""
    was = len(mf.classes or []) or mf.weights["fc.weight"].shape[0]
    if describe(trained, was) != describe(cfg, num_classes):
        raise CheckpointError(f"{mf.path} holds a {describe(trained, was)}, but this config and data make a "
                              f"{describe(cfg, num_classes)}: use data with its classes, without model.* overrides")
    model = build_model(cfg.model.name, num_classes, cfg.model.width, cfg.model.norm.value, cfg.model.residual,
                        cfg.model.blurpool)
    rebuild(model, mf.widths, mf.path)  # a pruned model's own widths
    load_weights(model, mf.weights, mf.path)
    return model.eval()


def placed(mf: files.ModelFile, trained: Config, cfg: Config, num_classes: int,
           device: torch.device) -> tuple[nn.Module, bool]:
    """The trained net as training ran it: on `device`, in its memory format, behind its input resize; and
    whether that format is channels_last (model.channels_last, unless the device's kernels fault on this net,
    as training decided: dist_resnet.models.channels_last_fault). Its inputs take the same format."""
    net = build_trained(mf, trained, cfg, num_classes)
    channels_last = cfg.model.channels_last and not channels_last_fault(net, device)
    return with_input(to_device(net, device, channels_last), cfg.data.resize), channels_last
