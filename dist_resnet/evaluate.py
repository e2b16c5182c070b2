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
from .checkpoint import load
from .config import ConfigError, Precision, load_config
from .data.loader import DataError, TestData, read_manifest
from .models import build_model
from .train import DTYPES, evaluate, resolve_precision


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dist_resnet.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights (train.ema=true runs)")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_intermixed_args(argv)  # overrides may sit on either side of --options
    try:
        state = load(args.checkpoint)
        cfg = load_config(None, args.overrides, base=state["config"])
        if args.ema and state.get("ema") is None:
            raise ConfigError(f"{args.checkpoint} holds no EMA weights (it was trained with train.ema=false)")
    except (ConfigError, FileNotFoundError) as e:
        print(f"dist_resnet.evaluate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def job(env: distributed.DistEnv) -> dict:
        precision = resolve_precision(cfg.train.precision, env.device.type == "cuda")
        manifest = read_manifest(cfg.data.dir)
        model = build_model(cfg.model.name, len(manifest["classes"]), cfg.model.width, cfg.model.norm.value)
        model.load_state_dict(state["ema"] if args.ema else state["model"])
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
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=2)
        return result

    return distributed.run_job("dist_resnet.evaluate", cfg.train.device.value, job, (ConfigError, DataError))


if __name__ == "__main__":
    main()
