"""`python -m dist_resnet.bench profile --config C data.dir=D --out DIR/profile.json`: N training steps of
the run that config makes, under torch.profiler, after W untimed steps (numba, compile, autotune).

It writes, beside --out:
- `trace/<host>_<pid>.<time>.pt.trace.json`: the trace, which Perfetto (ui.perfetto.dev) and TensorBoard's
  profiler plugin (`tensorboard --logdir DIR/trace`) open;
- `profile.md`: the step's split into data wait, forward, the teacher (distill.teacher), backward,
  optimizer and the rest of the host's work, then the top operators by self time on the device (on a GPU) and on the host;
- `profile.json`: the same figures.

The split comes from labels the trainer's step carries for a profiler (engine.step.Step.mark), and one
around the wait for the next batch. On a GPU a label's time is its host time: what the host spends
launching that part, or waiting where it syncs. Device time is the sum of the kernels' time.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, tensorboard_trace_handler

from .. import distributed
from ..config import Config
from ..fileio import atomic_write
from .measure import build_trainer, close, sync

PARTS = ("data wait", "forward", "teacher", "backward", "optimizer")
TOP = 15


def profile_steps(cfg: Config, env: distributed.DistEnv, steps: int, warmup: int, out: Path) -> dict:
    """Profile `steps` training steps after `warmup`; the figures, with the trace written under out/trace."""
    cuda = env.device.type == "cuda"
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, env, run_dir)
        source = trainer.batches()
        for _ in range(warmup):
            trainer.train_step(next(source))
        sync(env.device)
        trainer.step.mark = record_function
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with profile(activities=activities, on_trace_ready=tensorboard_trace_handler(str(out / "trace"))) as prof:
            for _ in range(steps):
                with record_function("step"):
                    with record_function("data wait"):
                        batch = next(source)
                    trainer.train_step(batch)
            sync(env.device)
        wall_s = time.perf_counter() - t0
        trainer.step.mark = type(trainer.step).mark
        close(trainer, source)
    events = prof.key_averages()
    return {"steps": steps, "warmup": warmup, "device": torch.cuda.get_device_name(env.device) if cuda else "cpu",
            "batch_size": cfg.train.batch_size, "wall_ms_per_step": 1000 * wall_s / steps,
            "split": split(events, steps), "top_device": top(events, "device") if cuda else [],
            "top_host": top(events, "cpu"), "trace": sorted(p.name for p in (out / "trace").glob("*.json"))}


def split(events, steps: int) -> list[dict]:
    """Host ms per step of each labelled part, and the rest of the step ("other host work")."""
    ms = {e.key: e.cpu_time_total / 1000 / steps for e in events if e.key in (*PARTS, "step")}
    ms["forward"] = ms.get("forward", 0.0) - ms.get("teacher", 0.0)  # the teacher's label sits inside the forward's
    step = ms.get("step", 0.0)
    rows = [{"part": p, "ms_per_step": ms.get(p, 0.0)} for p in PARTS]
    rows.append({"part": "other host work", "ms_per_step": max(0.0, step - sum(r["ms_per_step"] for r in rows))})
    for r in rows:
        r["share"] = r["ms_per_step"] / step if step else None
    rows.append({"part": "whole step", "ms_per_step": step, "share": 1.0 if step else None})
    return rows


def top(events, where: str) -> list[dict]:
    """The operators with the most self time on `where` (cpu or device), labels left out."""
    attr = "self_cpu_time_total" if where == "cpu" else "self_device_time_total"
    ops = [e for e in events if e.key not in (*PARTS, "step") and getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in ops) or 1.0
    ops.sort(key=lambda e: -getattr(e, attr))
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, attr) / 1000, "share": getattr(e, attr) / total}
            for e in ops[:TOP]]


def markdown(result: dict, command: str) -> str:
    lines = [f"# bench profile: {result['steps']} steps after {result['warmup']} untimed, {result['device']}", "",
             "```", command, "```", "",
             f"{result['wall_ms_per_step']:.2f} ms per step under the profiler (batch {result['batch_size']}); "
             "the profiler's own overhead is in it.", "",
             "## The step's split (host time)", "", "| part | ms per step | share |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['ms_per_step']:.2f} | {r['share']:.1%} |" if r["share"] is not None else
              f"| {r['part']} | {r['ms_per_step']:.2f} | n/a |" for r in result["split"]]
    for key, title in (("top_device", "device"), ("top_host", "host")):
        if result[key]:
            lines += ["", f"## Top operators by self time on the {title}", "",
                      "| operator | calls | self ms | share |", "|---|---|---|---|"]
            lines += [f"| `{r['op']}` | {r['calls']} | {r['self_ms']:.2f} | {r['share']:.1%} |" for r in result[key]]
    lines += ["", "Trace: " + ", ".join(f"trace/{t}" for t in result["trace"]) +
              " (ui.perfetto.dev, or `tensorboard --logdir trace`)", ""]
    return "\n".join(lines)


def write(result: dict, out: Path, text: str) -> None:
    atomic_write(out / "profile.md", lambda f: f.write(text.encode()))
