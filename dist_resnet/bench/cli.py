"""The command line of `dist_resnet.bench` (the module docstring of the package is its --help)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .. import distributed
from ..config import ConfigError, load_config, to_dict
from ..data.manifest import DataError
from ..fileio import write_json
from .measure import ABLATIONS, Deadline, ablation, breakdown, loader, table, tta

EPILOG = """examples:
  python -m dist_resnet.bench throughput --config configs/resnet18.yaml data.dir=data/cifar10 --ablate --breakdown
  python -m dist_resnet.bench throughput --config configs/cpu.yaml data.dir=data/cifar10 --compare train.precision=fp32,bf16
  python -m dist_resnet.bench loader --config configs/resnet18.yaml data.dir=data/cifar10
  python -m dist_resnet.bench tta --config configs/fast.yaml data.dir=data/cifar10 --target 0.905 --seeds 5
  python -m dist_resnet.bench profile --config configs/cpu.yaml data.dir=data/cifar10 --steps 20 --out prof/profile.json
  python -m dist_resnet.bench report --data data/cifar10 --out bench-report     # every figure, in one time budget
  python -m dist_resnet.bench compress --data data/cifar10 --out compress       # distil, prune, int8: the frontier
"""


NUMBERS = [("steps", int, 50, "throughput: timed steps per repeat; profile: profiled steps"),
           ("warmup", int, 30, "throughput, profile: untimed warm-up steps"),
           ("repeats", int, 5, "throughput: timed repeats (mean and std over them)"),
           ("epochs", int, 3, "loader: timed epochs after the first"),
           ("target", float, 0.9, "tta: target test accuracy (fraction)"),
           ("seeds", int, 5, "tta: seeds 0..N-1")]


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist_resnet.bench", description=doc, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["throughput", "loader", "tta", "profile", "report", "compress"],
                   help="what to measure; `profile`: torch.profiler over --steps steps (a trace, the top operators "
                        "and the step's split, beside --out); `report` runs the others as a set "
                        "(see dist_resnet.bench.report); `compress`: the accuracy-speed frontier of distillation, "
                        "pruning and int8 (its own options: bench compress --help)")
    p.add_argument("--config", help="the training preset (YAML), as dist_resnet.train takes it")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (data.dir is required)")
    for name, kind, default, what in NUMBERS:
        p.add_argument(f"--{name}", type=kind, default=default, help=what)
    p.add_argument("--ablate", action="store_true", help="throughput: switch AMP, channels_last, compile, data off")
    p.add_argument("--compare", metavar="KEY=V1,V2",
                   help="throughput: one row per value of one key (e.g. train.precision=fp32,bf16)")
    p.add_argument("--breakdown", action="store_true",
                   help="throughput: split the step into forward+backward, optimizer, data wait, and eval")
    p.add_argument("--keep", metavar="DIR", help="tta: keep each seed's run folder as DIR/seed-N")
    p.add_argument("--deadline-s", type=float,
                   help="stop starting new runs (seeds, variants) that would end later than this many seconds "
                        "from now, and report them as skipped")
    p.add_argument("--out", help="write the results as JSON here (report: the folder for report.md/.json)")
    r = p.add_argument_group("report")
    r.add_argument("--data", help="report: the betons every part measures on (or data.dir=DIR, as the other "
                                  "commands take them)")
    r.add_argument("--budget-s", type=float, help="report: seconds for the whole report (GPU 480, CPU 1800)")
    r.add_argument("--parts", choices=["auto", "gpu", "cpu"], default="auto",
                   help="report: the GPU or the CPU set of measurements (auto: GPU when CUDA is available)")
    r.add_argument("--only", help="report: only these parts, comma-separated (e.g. fast,loader)")
    r.add_argument("--quick", action="store_true", help="report: 1-2 steps, repeats, seeds, epochs (a smoke test)")
    return p


def variants(args, overrides: list[str]) -> list[tuple[str, object]]:
    """(name, config) rows of a throughput measurement; config None = one fixed batch of the first."""
    if args.compare:
        key, _, values = args.compare.partition("=")
        if not key or not values:
            raise ConfigError(f"--compare {args.compare}: give KEY=V1,V2,... (e.g. train.precision=fp32,bf16)")
        return [(f"{key}={v}", load_config(args.config, overrides + [f"{key}={v}"])) for v in values.split(",")]
    if not args.ablate:
        return [("full", load_config(args.config, overrides))]
    return [(name, None if extra == ["<synthetic>"] else load_config(args.config, overrides + extra))
            for name, extra in ABLATIONS.items()]


def main(argv: list[str] | None = None, doc: str = "") -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compress"]:  # its own options (dist_resnet.bench.compress)
        from .compress import main as compress_main

        return compress_main(argv[1:])
    args = parser(doc).parse_intermixed_args(argv)
    if args.what == "report":
        from .report import main as report_main

        return report_main(args)
    overrides = [o for o in args.overrides if not o.startswith("run.dir=")] + ["run.dir=unused"]
    try:
        cfg = load_config(args.config, overrides)
        rows = variants(args, overrides) if args.what == "throughput" else None
    except ConfigError as e:
        print(f"dist_resnet.bench: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.what == "profile" and not args.out:
        print("dist_resnet.bench profile: error: give --out DIR/profile.json (the trace and profile.md go beside it)",
              file=sys.stderr)
        raise SystemExit(2)
    deadline = Deadline(args.deadline_s)

    def save(result: dict, env: distributed.DistEnv) -> None:
        if env.is_main and args.out:
            write_json(args.out, {**result, "what": args.what, "config": to_dict(cfg),
                                  "date": time.strftime("%Y-%m-%d")})

    def job(env: distributed.DistEnv) -> dict:
        if args.what == "throughput":
            result, text = throughput_job(args, cfg, rows, env, deadline, save)
        elif args.what == "profile":
            from . import profile

            out = Path(args.out).parent
            result = profile.profile_steps(cfg, env, args.steps, args.warmup, out)
            text = profile.markdown(result, "python -m dist_resnet.bench " + shlex.join(argv or sys.argv[1:]))
            if env.is_main:
                profile.write(result, out, text)
        elif args.what == "loader":
            result = loader(cfg, env, args.epochs)
            text = table([result], ["pipeline", "img_per_s", "img_per_s_std", "first_epoch_s", "epochs"])
        else:
            result = tta(cfg, env, args.target, args.seeds, deadline, args.keep,
                         lambda r: save({**r, "partial": True}, env))
            text = table([result], ["target", "seeds", "ran", "reached", "acc_mean", "acc_std", "train_time_s_mean",
                                    "train_time_s_std", "time_to_target_s_mean", "time_to_target_s_std"])
        save(result, env)
        if env.is_main:
            print(text, flush=True)
        return result

    return distributed.run_job("dist_resnet.bench", cfg.train.device.value, job, (ConfigError, DataError),
                               cfg.train.timeout_s)


def throughput_job(args, cfg, rows, env: distributed.DistEnv, deadline: Deadline, save) -> tuple[dict, str]:
    """The throughput rows (and --breakdown, if the deadline allows about one more variant's time)."""
    rows_out = ablation(rows, env, args.steps, args.warmup, args.repeats, deadline,
                        lambda r: save({"rows": r, "partial": True}, env))
    text = table(rows_out, ["variant", "precision", "img_per_s", "img_per_s_std", "warmup_s", "tflops", "mfu",
                            "train_gflop_per_img", "error", "skipped"])
    result = {"rows": rows_out}
    last = next((r["wall_s"] for r in reversed(rows_out) if "wall_s" in r), 0.0)
    if args.breakdown and deadline.allows(last):
        parts = breakdown(cfg, env, args.steps, args.warmup, args.repeats)
        text += "\n\n" + table(parts, ["component", "ms_per_step", "ms_std", "share_of_step", "share_of_epoch", "note"])
        result["breakdown"] = parts
    elif args.breakdown:
        result["breakdown_skipped"] = "time budget"
    return result, text
