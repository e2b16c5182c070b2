"""The measurements of `dist_resnet.bench`: throughput (with its ablations and breakdown), the loader
alone, and time-to-accuracy. Each builds what a training run builds (the Trainer, or its train data) and
times what the run does. Warm-up (numba, torch.compile, cudnn autotune) is timed apart and excluded;
steady state is timed with CUDA events on GPU. A `Deadline` lets a measurement of several runs stop
between two of them and say what it left out, so one call fits a time slot."""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..config import Config
from ..engine.build import train_data
from ..train import Trainer

# Dense bf16 tensor-core peaks (vendor datasheets), matched on torch's device name in this order: the PCIe
# and NVL parts run at lower clocks and power than the SXM part that the plain name means.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0)]


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


class Deadline:
    """Seconds left to a measurement of several runs (None: no limit). `allows(cost)` says whether a run
    that takes about `cost` seconds still fits; what does not fit is skipped, and reported so."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def allows(self, cost: float = 0.0) -> bool:
        return self.end is None or time.monotonic() + cost <= self.end


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

    # a copy: a backward through the trainer's own parameters would fire DDP's gradient hooks outside a step
    # (a collective the other ranks do not expect, which a comm hook such as PowerSGD turns into a mismatch)
    model, side = copy.deepcopy(trainer.model), trainer.cfg.data.resize
    h, w = (side, side) if side else trainer.data.betons.image_shape  # what the model sees, not the beton
    x = torch.randn(2, 3, h, w, device=next(model.parameters()).device)
    try:
        with FlopCounterMode(display=False) as counter:
            model(x).float().sum().backward()
    except Exception:  # noqa: BLE001 - a counter failure must not fail the benchmark
        return None
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
        precision, steps_per_epoch = trainer.precision, len(trainer.data)
        close(trainer, epochs)
    m, s = mean_std(rates)
    name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    peak = peak_tflops(name)
    tflops = m * flops / 1e12 if flops else None
    return {"img_per_s": m, "img_per_s_std": s, "warmup_s": warmup_s, "steps": steps, "repeats": repeats,
            "train_gflop_per_img": flops / 1e9 if flops else None, "tflops": tflops,
            "mfu": tflops / peak if tflops and peak and precision != "fp32" else None,
            "device": name, "world_size": env.world_size, "precision": precision,
            "epoch_s": steps_per_epoch * cfg.train.batch_size / m}  # an epoch's training steps at this rate


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

    def difference(a: str, b: str) -> tuple[float, float]:
        """m[a] - m[b], and the spread of that difference (the two loops' std combined)."""
        return m[a][0] - m[b][0], (m[a][1] ** 2 + m[b][1] ** 2) ** 0.5

    rows = [("forward + backward (+ metrics, gradient all-reduce)", *m["fwd_bwd"]),
            ("optimizer step (SGD, LR schedule, EMA/lookahead)", *difference("fixed", "fwd_bwd")),
            ("data not hidden by the pipeline", *difference("full", "fixed")),
            ("whole train step", *m["full"])]
    out = []
    for c, v, sd in rows:
        # a difference of two timed loops smaller than twice its spread (or below 0) is not a measurement
        noisy = v < 0 or (repeats > 1 and abs(v) < 2 * sd)
        out.append({"component": c, "ms_per_step": v, "ms_std": sd, "share_of_step": v / full,
                    "note": f"within the noise of {repeats} repeats: raise --repeats/--steps" if noisy else ""})
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


def tta(cfg: Config, env: distributed.DistEnv, target: float, seeds: int, deadline: Deadline | None = None,
        keep: str | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """Training seconds until the first evaluation at or above `target`, over several seeds, timed like the
    record scripts: compile and autotune run first in the untimed warm-up (train.warmup_steps, reported as
    warmup_s); time_to_result_s is training + the whitening fit + the final (TTA) evaluation. A seed that
    would not end before `deadline` (judged by the last seed's time: the first one's includes the cold
    compile, which the later ones find in inductor's cache) is skipped; `keep`: each seed's run
    folder is kept there (keep/seed-N), e.g. for an export of the trained model."""
    deadline, runs, skipped = deadline or Deadline(None), [], []
    for seed in range(seeds):
        if runs and not deadline.allows(runs[-1]["wall_s"]):
            skipped = list(range(seed, seeds))
            break
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = str(Path(keep) / f"seed-{seed}") if keep else tmp
            s = build_trainer(replace(cfg, train=replace(cfg.train, seed=seed)), env, run_dir).fit()
        t, hit = 0.0, None
        for r in s["history"]:
            t += r["epoch_time_s"]
            if hit is None and r.get("test_acc", 0) >= target:
                hit = {"epoch": r["epoch"], "time_s": t}
        runs.append({"seed": seed, "final_acc": s["test_acc"], "train_time_s": s["train_time_s"],
                     "time_to_result_s": s["time_to_result_s"], "warmup_s": s["warmup_s"],
                     "first_step_s": s["first_step_s"], "first_epoch_s": s["first_epoch_s"], "reached": hit,
                     "wall_s": time.perf_counter() - t0})
        if progress is not None:
            progress(tta_summary(target, seeds, runs, list(range(seed + 1, seeds))))
    return tta_summary(target, seeds, runs, skipped)


def tta_summary(target: float, seeds: int, runs: list[dict], skipped: list[int]) -> dict:
    accs = [r["final_acc"] for r in runs]
    times = [r["reached"]["time_s"] for r in runs if r["reached"]]
    train = [r["train_time_s"] for r in runs]
    return {"target": target, "seeds": seeds, "ran": len(runs), "skipped_seeds": skipped, "reached": len(times),
            "acc_mean": mean_std(accs)[0] if accs else None, "acc_std": mean_std(accs)[1] if accs else None,
            "train_time_s_mean": mean_std(train)[0] if train else None,
            "train_time_s_std": mean_std(train)[1] if train else None,
            "time_to_target_s_mean": mean_std(times)[0] if times else None,
            "time_to_target_s_std": mean_std(times)[1] if times else None, "runs": runs}


def ablation(variants: list[tuple[str, Config | None]], env: distributed.DistEnv, steps: int, warmup: int,
             repeats: int, deadline: Deadline | None = None, progress: Callable[[list], None] | None = None) -> list:
    """One throughput row per (name, config) variant (config None: one fixed batch, no data pipeline, of the
    first variant's config). A variant that fails gets its error in its row and the others still run; one
    that would not end before `deadline` (judged by the last one's time) is skipped."""
    deadline, rows = deadline or Deadline(None), []
    for name, c in variants:
        if rows and not deadline.allows(rows[-1]["wall_s"]):
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        t0 = time.perf_counter()
        try:
            rows.append({"variant": name, **throughput(c or variants[0][1], env, steps, warmup, repeats, c is None)})
        except Exception as e:  # noqa: BLE001 - one broken variant must not hide the others
            traceback.print_exc()
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
        rows[-1]["wall_s"] = time.perf_counter() - t0
        if progress is not None:
            progress(rows)
    return rows


def fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 100 else (f"{v:,.0f}" if isinstance(v, float) else str(v))


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
