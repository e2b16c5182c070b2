"""Speed benchmarks that measure exactly what a training run does.

    python -m dist_resnet.bench throughput --config configs/resnet18.yaml data.dir=DIR [--ablate] [--breakdown]
    python -m dist_resnet.bench loader     --config configs/resnet18.yaml data.dir=DIR
    python -m dist_resnet.bench tta        --config configs/resnet9.yaml  data.dir=DIR --target 0.9 --seeds 5

Each takes the same `--config` and `key=value` overrides as `dist_resnet.train` (also under torchrun).
Warm-up (numba, torch.compile, cudnn autotune) is timed apart and excluded; steady state is timed
with CUDA events on GPU. Output: a Markdown table on stdout and JSON (--out). A benchmark reports;
it never fails on a time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace

import torch

from . import distributed
from .config import Config, ConfigError, load_config, to_dict
from .data.manifest import DataError
from .engine.build import train_data
from .fileio import write_json
from .train import Trainer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense tensor-core peaks


class Timer:
    """Seconds between start() and stop(): CUDA events on GPU (no host sync per step), else wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record()
            t1.synchronize()
            return self.t0.elapsed_time(t1) / 1000
        return time.perf_counter() - self.t0


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def train_flops_per_image(trainer: Trainer) -> float | None:
    """Forward + backward FLOPs per training image, counted by torch on one micro-batch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = trainer.model
    x = torch.randn(2, 3, 32, 32, device=next(model.parameters()).device)
    try:
        with FlopCounterMode(display=False) as counter:
            model(x).float().sum().backward()
    except Exception:  # noqa: BLE001 - a counter failure must not fail the benchmark
        return None
    finally:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def build_trainer(cfg: Config, env: distributed.DistEnv, run_dir: str) -> Trainer:
    return Trainer(replace(cfg, run=replace(cfg.run, dir=run_dir, progress=False),
                           train=replace(cfg.train, resume=False)), env)


def close(trainer: Trainer, source=None) -> None:
    if source is not None:
        source.close()  # ends the epoch left open, and with it FFCV's decode thread
    trainer.close()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(cfg: Config, env: distributed.DistEnv, steps: int, warmup: int, repeats: int,
               synthetic: bool = False) -> dict:
    """Steady-state training images/s of `cfg` (synthetic=True: one fixed device batch, no data pipeline)."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, env, run_dir)
        timer = Timer(env.device)
        source = epochs = trainer.batches()
        if synthetic:
            fixed = next(epochs)
            epochs.close()  # no decode thread running beside the timed steps
            source = iter(lambda: fixed, None)
        t0 = time.perf_counter()
        for _ in range(warmup):
            trainer.train_step(next(source))
        sync(env.device)
        warmup_s = time.perf_counter() - t0
        rates = []
        for _ in range(repeats):
            timer.start()
            for _ in range(steps):
                trainer.train_step(next(source))
            rates.append(steps * cfg.train.batch_size / timer.stop())
        flops = train_flops_per_image(trainer)
        precision = trainer.precision
        close(trainer, epochs)
    m, s = mean_std(rates)
    name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    tflops = m * flops / 1e12 if flops else None
    return {"img_per_s": m, "img_per_s_std": s, "warmup_s": warmup_s, "steps": steps, "repeats": repeats,
            "train_gflop_per_img": flops / 1e9 if flops else None, "tflops": tflops,
            "mfu": tflops / peak if tflops and peak and precision != "fp32" else None,
            "device": name, "world_size": env.world_size}


def breakdown(cfg: Config, env: distributed.DistEnv, steps: int, warmup: int, repeats: int) -> list[dict]:
    """Where a training step's time goes, by subtraction of nested loops timed on one trainer:
    forward + backward on a fixed batch; + the optimizer step (SGD, LR schedule, EMA/lookahead);
    + fetching real batches (what the pipeline does not hide); and the evaluation per epoch."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, env, run_dir)
        timer, source = Timer(env.device), trainer.batches()
        fixed = next(source)
        loops = {"fwd_bwd": lambda: trainer.forward_backward(fixed), "fixed": lambda: trainer.train_step(fixed),
                 "full": lambda: trainer.train_step(next(source))}
        for fn in loops.values():
            for _ in range(warmup):
                fn()
        ms = {k: [] for k in loops}
        for _ in range(repeats):
            for k, fn in loops.items():
                timer.start()
                for _ in range(steps):
                    fn()
                ms[k].append(1000 * timer.stop() / steps)
        trainer.evaluate()  # warm-up (eval-mode compile)
        evals = []
        for _ in range(repeats):
            sync(env.device)
            t0 = time.perf_counter()
            trainer.evaluate()  # ends in a host sync (all-reduce + .tolist())
            evals.append(1000 * (time.perf_counter() - t0))
        steps_per_epoch = len(trainer.data)
        close(trainer, source)
    m = {k: mean_std(v) for k, v in ms.items()}
    full, epoch_ms = m["full"][0], m["full"][0] * steps_per_epoch
    rows = [("forward + backward (+ metrics, gradient all-reduce)", m["fwd_bwd"][0], m["fwd_bwd"][1]),
            ("optimizer step (SGD, LR schedule, EMA/lookahead)", m["fixed"][0] - m["fwd_bwd"][0], None),
            ("data not hidden by the pipeline", full - m["fixed"][0], None),
            ("whole train step", full, m["full"][1])]
    out = [{"component": c, "ms_per_step": v, "ms_std": sd, "share_of_step": v / full} for c, v, sd in rows]
    e, e_sd = mean_std(evals)
    out.append({"component": f"evaluation, once per epoch ({steps_per_epoch} steps)",
                "ms_per_step": e / steps_per_epoch, "ms_std": e_sd / steps_per_epoch,
                "share_of_epoch": e / (e + epoch_ms)})
    return out


ABLATIONS = {
    "full": [],
    "no AMP (fp32)": ["train.precision=fp32"],
    "no channels_last": ["model.channels_last=false"],
    "no torch.compile": ["model.compile=false"],
    "device-resident data": ["data.pipeline=device"],
    "no data (one fixed batch)": ["<synthetic>"],
}


def loader(cfg: Config, env: distributed.DistEnv, epochs: int) -> dict:
    """The data pipeline alone: train batches per second into the device, normalised and augmented."""
    data, timer, rates, first = train_data(cfg, env), Timer(env.device), [], None
    for epoch in range(epochs + 1):
        timer.start()
        n = sum(x.shape[0] for _, micro in data.epoch(epoch) for x, _ in micro)
        elapsed = timer.stop()
        if epoch == 0:
            first = elapsed  # numba compile and first reads
        else:
            rates.append(n * env.world_size / elapsed)
    m, s = mean_std(rates)
    return {"img_per_s": m, "img_per_s_std": s, "first_epoch_s": first, "epochs": epochs,
            "pipeline": cfg.data.pipeline.value, "world_size": env.world_size}


def tta(cfg: Config, env: distributed.DistEnv, target: float, seeds: int) -> dict:
    """Training seconds until the first evaluation at or above `target`, over several seeds, timed like the
    record scripts: compile and autotune run first in the untimed warm-up (train.warmup_steps, reported as
    warmup_s); time_to_result_s is training + the whitening fit + the final (TTA) evaluation."""
    runs = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as run_dir:
            s = build_trainer(replace(cfg, train=replace(cfg.train, seed=seed)), env, run_dir).fit()
        t, hit = 0.0, None
        for r in s["history"]:
            t += r["epoch_time_s"]
            if hit is None and r.get("test_acc", 0) >= target:
                hit = {"epoch": r["epoch"], "time_s": t}
        runs.append({"seed": seed, "final_acc": s["test_acc"], "train_time_s": s["train_time_s"],
                     "time_to_result_s": s["time_to_result_s"], "warmup_s": s["warmup_s"],
                     "first_step_s": s["first_step_s"], "first_epoch_s": s["first_epoch_s"], "reached": hit})
    accs = [r["final_acc"] for r in runs]
    times = [r["reached"]["time_s"] for r in runs if r["reached"]]
    return {"target": target, "seeds": seeds, "reached": len(times), "acc_mean": mean_std(accs)[0],
            "acc_std": mean_std(accs)[1], "time_to_target_s_mean": mean_std(times)[0] if times else None,
            "time_to_target_s_std": mean_std(times)[1] if times else None, "runs": runs}


def fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 100 else (f"{v:,.0f}" if isinstance(v, float) else str(v))


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dist_resnet.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["throughput", "loader", "tta"])
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (data.dir is required)")
    p.add_argument("--steps", type=int, default=50, help="throughput: timed steps per repeat")
    p.add_argument("--warmup", type=int, default=30, help="throughput: untimed warm-up steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ablate", action="store_true", help="throughput: switch AMP, channels_last, compile, data off")
    p.add_argument("--breakdown", action="store_true",
                   help="throughput: split the step into forward+backward, optimizer, data wait, and eval")
    p.add_argument("--epochs", type=int, default=3, help="loader: timed epochs after the first")
    p.add_argument("--target", type=float, default=0.9, help="tta: target test accuracy (fraction)")
    p.add_argument("--seeds", type=int, default=5, help="tta: seeds 0..N-1")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_intermixed_args(argv)
    overrides = [o for o in args.overrides if not o.startswith("run.dir=")] + ["run.dir=unused"]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"dist_resnet.bench: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def job(env: distributed.DistEnv) -> dict:
        if args.what == "throughput":
            rows = []
            for name, extra in (ABLATIONS.items() if args.ablate else [("full", [])]):
                synthetic = extra == ["<synthetic>"]
                c = cfg if not extra or synthetic else load_config(args.config, overrides + extra)
                try:
                    rows.append({"variant": name, **throughput(c, env, args.steps, args.warmup, args.repeats,
                                                               synthetic)})
                except Exception as e:  # noqa: BLE001 - one broken variant must not hide the others
                    traceback.print_exc()
                    rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
            text = table(rows, ["variant", "img_per_s", "img_per_s_std", "warmup_s", "tflops", "mfu",
                                "train_gflop_per_img", "error"])
            result = {"rows": rows}
            if args.breakdown:
                parts = breakdown(cfg, env, args.steps, args.warmup, args.repeats)
                text += "\n\n" + table(parts, ["component", "ms_per_step", "ms_std", "share_of_step", "share_of_epoch"])
                result["breakdown"] = parts
        elif args.what == "loader":
            result = loader(cfg, env, args.epochs)
            text = table([result], ["pipeline", "img_per_s", "img_per_s_std", "first_epoch_s", "epochs"])
        else:
            result = tta(cfg, env, args.target, args.seeds)
            text = table([result], ["target", "seeds", "reached", "acc_mean", "acc_std", "time_to_target_s_mean",
                                    "time_to_target_s_std"])
        result.update({"what": args.what, "config": to_dict(cfg), "date": time.strftime("%Y-%m-%d")})
        if env.is_main:
            print(text, flush=True)
            if args.out:
                write_json(args.out, result)
        return result

    return distributed.run_job("dist_resnet.bench", cfg.train.device.value, job, (ConfigError, DataError),
                               cfg.train.timeout_s)


if __name__ == "__main__":
    main()
