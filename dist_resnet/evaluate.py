"""Evaluate a checkpoint on the whole test beton, on 1..N processes (exact partition): loss, accuracy,
per-class accuracy and the confusion matrix.

    python -m dist_resnet.evaluate runs/r18/best.pt [data.dir=DIR] [train.tta=flip] [--ema] [--out r.json]
                                   [--confusion confusion.png] [--attack pgd --steps 50 --restarts 10 --eps 8]
                                   [--mistakes mistakes.png [--mistakes-count 16] [--mistakes-class cat]]
    torchrun --nproc_per_node=4 -m dist_resnet.evaluate runs/r18/best.pt

`--mistakes PNG` draws the test set's most confident mistakes (overall, or of one true class) in a grid:
image with the Grad-CAM heat map of the predicted class, true and predicted label, confidence
(dist_resnet.explain).

`--attack pgd` also reports the accuracy under an L-infinity PGD attack (`test_robust_acc`): an image
counts if it is classified correctly as it is and after every restart. Sizes are in pixel levels (0-255)
of the [0, 1] image; unset ones come from the checkpoint's `adv.*` config (eps 8, alpha 2, 20 steps).

The config comes from the checkpoint (or from one of our .safetensors files); `key=value` overrides
change it (data.dir, train.device, ...).
"""
from __future__ import annotations

import json
import sys

from . import distributed, plot
from .attacks import RobustEval
from .checkpoint import CheckpointError
from .config import ConfigError
from .data.loader import Feed, TestData, check_partition
from .data.manifest import Betons, DataError
from .engine.evaluation import evaluate, per_class
from .fileio import write_json
from .precision import Amp
from .trained import arguments, open_trained, placed


def main(argv: list[str] | None = None) -> dict:
    p = arguments("dist_resnet.evaluate", __doc__, "evaluate the EMA weights (train.ema=true runs)")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--confusion", metavar="PNG", help="draw the confusion matrix into this PNG")
    p.add_argument("--attack", choices=["none", "pgd"], default="none", help="also evaluate under this attack")
    p.add_argument("--eps", type=float, help="attack radius in pixel levels (0-255); default adv.eps")
    p.add_argument("--alpha", type=float, help="PGD step size in pixel levels; default adv.eval_alpha")
    p.add_argument("--steps", type=int, help="PGD steps; default adv.eval_steps")
    p.add_argument("--restarts", type=int, help="PGD random restarts; default adv.eval_restarts")
    p.add_argument("--mistakes", metavar="PNG", help="draw the most confident mistakes, with Grad-CAM, into this PNG")
    p.add_argument("--mistakes-count", type=int, default=16, help="how many (default 16)")
    p.add_argument("--mistakes-class", metavar="NAME", help="only images of this true class (default: all)")
    args = p.parse_intermixed_args(argv)  # overrides may sit on either side of --options
    try:
        if args.mistakes_count < 1 or (args.mistakes_class and not args.mistakes):
            raise ConfigError("--mistakes-count must be >= 1, and --mistakes-class needs --mistakes PNG")
        attack_keys = {"eps": args.eps, "eval_alpha": args.alpha, "eval_steps": args.steps,
                       "eval_restarts": args.restarts}
        overrides = args.overrides + [f"adv.{k}={v}" for k, v in attack_keys.items() if v is not None]
        mf, trained, cfg = open_trained(args.checkpoint, overrides, args.ema)  # the config checks the sizes
        if args.mistakes_class is not None and args.mistakes_class not in (mf.classes or [args.mistakes_class]):
            raise ConfigError(f"--mistakes-class {args.mistakes_class}: not one of the model's classes "
                              f"({', '.join(mf.classes)})")
    except (ConfigError, CheckpointError) as e:
        print(f"dist_resnet.evaluate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def job(env: distributed.DistEnv) -> dict:
        amp = Amp.on(cfg.train.precision, env.device)
        betons = Betons.open(cfg.data.dir, cfg.data.verify)
        classes = betons.classes
        model, channels_last = placed(mf, trained, cfg, len(classes), env.device)
        mean, std = mf.mean or betons.manifest["mean"], mf.std or betons.manifest["std"]  # the checkpoint's
        check_partition(env.world_size, betons.count("test"), "test")
        feed = Feed(env.device, amp.input_dtype(cfg.data.fp32_input), channels_last, mean, std, env.rank,
                    env.world_size, env.threads)
        data = TestData(betons, cfg.data, feed, max(1, cfg.train.batch_size // env.world_size))
        a = cfg.adv
        attack = None if args.attack == "none" else RobustEval(  # the random starts of training's evaluation
            a.eps, a.eval_alpha, a.eval_steps, a.eval_restarts, mean, std, env.device, env.rank, cfg.train.seed)
        result = evaluate(model, data, amp, cfg.train.tta, attack=attack)
        if attack is not None:
            result["attack"] = attack.describe()
        result = {**result, "classes": classes, "per_class_acc": per_class(result["confusion"], classes),
                  "checkpoint": args.checkpoint, "ema": args.ema, "tta": cfg.train.tta.value,
                  "world_size": env.world_size, "precision": amp.precision.value, "precision_why": amp.why}
        if env.is_main:
            print(json.dumps({k: v for k, v in result.items() if k not in ("confusion", "classes")}))
            if args.out:
                write_json(args.out, result)
            if args.confusion:
                plot.confusion(args.confusion, result["confusion"], classes, args.checkpoint)
            if args.mistakes:
                single = Feed(env.device, feed.dtype, feed.channels_last, mean, std, 0, 1, env.threads)
                draw_mistakes(args, model, TestData(betons, cfg.data, single, data.batch_size), mean, std, classes,
                              amp)
        return result

    return distributed.run_job("dist_resnet.evaluate", cfg.train.device.value, job,
                               (ConfigError, DataError, CheckpointError), cfg.train.timeout_s)


def draw_mistakes(args, model, data: TestData, mean: list[float], std: list[float], classes: list[str],
                  amp: Amp) -> None:
    """--mistakes: the most confident mistakes on the whole test set (one process), with their heat maps."""
    from .explain import grid, mistakes

    true = None if args.mistakes_class is None else classes.index(args.mistakes_class)
    cells = mistakes(model, data, mean, std, classes, args.mistakes_count, true, amp.autocast)
    which = f"true class {args.mistakes_class}" if true is not None else "all classes"
    grid(args.mistakes, cells, f"the {len(cells)} most confident mistakes on the test set ({which}); "
                               "Grad-CAM of the predicted class")
    print(f"wrote {args.mistakes}: {len(cells)} mistakes, confidence {cells[0]['confidence']:.0%} to "
          f"{cells[-1]['confidence']:.0%}" if cells else f"no mistakes to draw ({which})")


if __name__ == "__main__":
    main()
