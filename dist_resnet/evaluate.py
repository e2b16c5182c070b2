"""Evaluate a checkpoint on the whole test beton, on 1..N processes (exact partition).

    python -m dist_resnet.evaluate runs/r18/best.pt [data.dir=DIR] [train.tta=flip] [--ema] [--out results.json]
    torchrun --nproc_per_node=4 -m dist_resnet.evaluate runs/r18/best.pt

The config comes from the checkpoint; `key=value` overrides change it (data.dir, train.device, ...).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import distributed
from .checkpoint import CheckpointError, load
from .config import Config, ConfigError, Precision, load_config
from .data.loader import DataError, TestData, check_betons, read_manifest
from .fileio import write_json
from .models import build_model, load_weights
from .train import DTYPES, evaluate, resolve_precision


def describe(cfg: Config, classes: int) -> str:
    return f"{cfg.model.name} (width {cfg.model.width}, {cfg.model.norm.value} norm) for {classes} classes"


def check_fits(path: str, state: dict, trained: Config, cfg: Config, classes: int) -> None:
    """The model the config builds for this data must be the one the checkpoint holds."""
    was = len(state.get("classes") or []) or state["model"][_head_key(state["model"])].shape[0]
    if describe(trained, was) != describe(cfg, classes):
        raise CheckpointError(
            f"{path} holds a {describe(trained, was)}, but this config and data.dir={cfg.data.dir} make a "
            f"{describe(cfg, classes)}: evaluate it on data with its classes, without model.* overrides")


def _head_key(weights: dict) -> str:
    return [k for k, v in weights.items() if getattr(v, "ndim", 0) == 2][-1]  # the last linear layer's weight


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dist_resnet.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights (train.ema=true runs)")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_intermixed_args(argv)  # overrides may sit on either side of --options
    try:
        state = load(args.checkpoint)
        trained = load_config(None, [], base=state["config"])
        cfg = load_config(None, args.overrides, base=state["config"])
        if args.ema and state.get("ema") is None:
            raise ConfigError(f"{args.checkpoint} holds no EMA weights (it was trained with train.ema=false)")
    except (ConfigError, CheckpointError) as e:
        print(f"dist_resnet.evaluate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def job(env: distributed.DistEnv) -> dict:
        precision = resolve_precision(cfg.train.precision, env.device.type == "cuda")
        manifest = read_manifest(cfg.data.dir)
        check_betons(cfg.data.dir, manifest, hashes=cfg.data.verify)
        check_fits(args.checkpoint, state, trained, cfg, len(manifest["classes"]))
        model = build_model(cfg.model.name, len(manifest["classes"]), cfg.model.width, cfg.model.norm.value)
        load_weights(model, state["ema"] if args.ema else state["model"], args.checkpoint)
        model = model.to(env.device)
        cl = cfg.model.channels_last
        if cl:
            model = model.to(memory_format=torch.channels_last)
        data = TestData(cfg.data, max(1, cfg.train.batch_size // env.world_size), env.device, DTYPES[precision], cl,
                        env.rank, env.world_size)
        result = evaluate(model, data, env.device, DTYPES[precision], precision != Precision.fp32, cfg.train.tta)
        result.update({"checkpoint": args.checkpoint, "ema": args.ema, "tta": cfg.train.tta.value,
                       "world_size": env.world_size})
        if env.is_main:
            print(json.dumps(result))
            if args.out:
                write_json(args.out, result)
        return result

    return distributed.run_job("dist_resnet.evaluate", cfg.train.device.value, job,
                               (ConfigError, DataError, CheckpointError), cfg.train.timeout_s)


if __name__ == "__main__":
    main()
