"""Evaluate a checkpoint on the whole test beton, on 1..N processes (exact partition): loss, accuracy,
per-class accuracy and the confusion matrix.

    python -m dist_resnet.evaluate runs/r18/best.pt [data.dir=DIR] [train.tta=flip] [--ema] [--out r.json]
                                   [--confusion confusion.png] [--attack pgd --steps 50 --restarts 10 --eps 8]
    torchrun --nproc_per_node=4 -m dist_resnet.evaluate runs/r18/best.pt

`--attack pgd` also reports the accuracy under an L-infinity PGD attack (`test_robust_acc`): an image
counts if it is classified correctly as it is and after every restart. Sizes are in pixel levels (0-255)
of the [0, 1] image; unset ones come from the checkpoint's `adv.*` config (eps 8, alpha 2, 20 steps).

The config comes from the checkpoint (or from one of our .safetensors files); `key=value` overrides
change it (data.dir, train.device, ...).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import attacks, distributed
from .checkpoint import CheckpointError
from .config import Config, ConfigError, Precision, load_config
from .data.loader import DataError, TestData, check_betons, read_manifest
from .fileio import write_json
from .models import Resized, build_model, files, load_weights
from .train import DTYPES, evaluate, per_class, resolve_precision


def describe(cfg: Config, classes: int) -> str:
    return f"{cfg.model.name} (width {cfg.model.width}, {cfg.model.norm.value} norm) for {classes} classes"


def open_trained(path: str, overrides: list[str], ema: bool = False) -> tuple[files.ModelFile, Config, Config]:
    """A file of ours (checkpoint or safetensors) with its training config, and that config overridden."""
    mf = files.read(path, ema=ema)
    if not mf.ours:
        raise CheckpointError(f"{path} holds weights without a dist_resnet training config: evaluate and predict "
                              "take our checkpoints (.pt) and exported .safetensors; use it as model.pretrained")
    return mf, load_config(None, [], base=mf.config), load_config(None, overrides, base=mf.config)


def build_trained(mf: files.ModelFile, trained: Config, cfg: Config, num_classes: int) -> torch.nn.Module:
    """The trained net with its weights, for `cfg` (which may override only what does not change the net)."""
    was = len(mf.classes or []) or mf.weights["fc.weight"].shape[0]
    if describe(trained, was) != describe(cfg, num_classes):
        raise CheckpointError(f"{mf.path} holds a {describe(trained, was)}, but this config and data make a "
                              f"{describe(cfg, num_classes)}: use data with its classes, without model.* overrides")
    model = build_model(cfg.model.name, num_classes, cfg.model.width, cfg.model.norm.value, cfg.model.residual)
    load_weights(model, mf.weights, mf.path)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dist_resnet.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights (train.ema=true runs)")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--confusion", metavar="PNG", help="draw the confusion matrix into this PNG")
    p.add_argument("--attack", choices=["none", "pgd"], default="none", help="also evaluate under this attack")
    p.add_argument("--eps", type=float, help="attack radius in pixel levels (0-255); default adv.eps")
    p.add_argument("--alpha", type=float, help="PGD step size in pixel levels; default adv.eval_alpha")
    p.add_argument("--steps", type=int, help="PGD steps; default adv.eval_steps")
    p.add_argument("--restarts", type=int, help="PGD random restarts; default adv.eval_restarts")
    args = p.parse_intermixed_args(argv)  # overrides may sit on either side of --options
    try:
        attack_keys = {"eps": args.eps, "eval_alpha": args.alpha, "eval_steps": args.steps,
                       "eval_restarts": args.restarts}
        overrides = args.overrides + [f"adv.{k}={v}" for k, v in attack_keys.items() if v is not None]
        mf, trained, cfg = open_trained(args.checkpoint, overrides, args.ema)  # the config checks the sizes
    except (ConfigError, CheckpointError) as e:
        print(f"dist_resnet.evaluate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def job(env: distributed.DistEnv) -> dict:
        precision = resolve_precision(cfg.train.precision, env.device.type == "cuda")
        manifest = read_manifest(cfg.data.dir)
        check_betons(cfg.data.dir, manifest, hashes=cfg.data.verify)
        classes = manifest["classes"]
        model = build_trained(mf, trained, cfg, len(classes)).to(env.device)
        cl = cfg.model.channels_last
        if cl:
            model = model.to(memory_format=torch.channels_last)
        if cfg.data.resize:
            model = Resized(model, cfg.data.resize)
        data = TestData(cfg.data, max(1, cfg.train.batch_size // env.world_size), env.device, DTYPES[precision], cl,
                        env.rank, env.world_size, mean=mf.mean, std=mf.std)  # the checkpoint's normalisation
        a = cfg.adv
        attack = None if args.attack == "none" else attacks.RobustEval(
            a.eps, a.eval_alpha, a.eval_steps, a.eval_restarts, mf.mean, mf.std, env.device, env.rank)
        result = evaluate(model, data, env.device, DTYPES[precision], precision != Precision.fp32, cfg.train.tta,
                          attack=attack)
        if attack is not None:
            result["attack"] = attack.describe()
        result = {**result, "classes": classes, "per_class_acc": per_class(result["confusion"], classes),
                  "checkpoint": args.checkpoint, "ema": args.ema, "tta": cfg.train.tta.value,
                  "world_size": env.world_size}
        if env.is_main:
            print(json.dumps({k: v for k, v in result.items() if k not in ("confusion", "classes")}))
            if args.out:
                write_json(args.out, result)
            if args.confusion:
                from . import plot

                plot.confusion(args.confusion, result["confusion"], classes, args.checkpoint)
        return result

    return distributed.run_job("dist_resnet.evaluate", cfg.train.device.value, job,
                               (ConfigError, DataError, CheckpointError), cfg.train.timeout_s)


if __name__ == "__main__":
    main()
