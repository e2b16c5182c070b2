"""`python -m dist_resnet.bench report --data DIR --out DIR`: every figure this project publishes, in one
time budget, as report.md and report.json.

On a GPU (default budget 480 s): the loader alone; resnet18's training throughput with its ablations and
step breakdown (bf16 against fp32 is the ablation's first two rows); the fast preset over 5 seeds (test
accuracy and training time, mean ± std); the resnet18 preset's time-to-accuracy once; resnet18's profile
(bench profile: a trace, the top operators, the step's split); an adversarial training step's throughput
and the epoch time it implies. On a CPU (default budget 1800 s): the cpu preset's throughput in fp32
against bf16, its profile, its time-to-accuracy, the int8 ONNX export of the model it trained against
the fp32 graph, and a small compression frontier with that model as the teacher (bench compress).

Each part is one command of this package, run as its own process: the report shows that command, and
running it again alone gives the same measurement. A part gets its share of the budget plus what the
parts before it left over; it is told its deadline (`--deadline-s`), so a part of several runs stops
between two of them and names what it skipped, and it is stopped if it runs past the deadline anyway. One
call therefore never runs much past its budget, and says what it did not measure.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..fileio import atomic_write, write_json
from ..precision import cpu_bf16_support

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SLACK_S = 10.0  # a part's start (imports) and end (teardown), outside its own deadline
QUICK = {"steps": "1", "warmup": "1", "repeats": "2", "seeds": "2", "epochs": "1", "speed": "0.02",
         "calibration": "64"}  # --quick: a smoke test


@dataclass
class Part:
    """One measurement: its name, what it measures, the command that makes it (after `python -m`), and its
    share of the budget."""

    name: str
    title: str
    argv: list[str]
    share: float
    needs: str = ""  # the part that must have finished before it runs (int8 exports cpu_tta's model)
    result: dict = field(default_factory=dict)


def workers() -> str:
    return str(max(1, min(16, len(os.sched_getaffinity(0)))))


def gpu_parts(data: str, q: Callable[[str, str], str]) -> list[Part]:
    d, w = f"data.dir={data}", f"data.num_workers={workers()}"
    bench = ["dist_resnet.bench"]

    def cfg(name: str) -> list[str]:
        return ["--config", str(CONFIGS / f"{name}.yaml")]

    return [
        Part("fast", "fast preset: time-to-accuracy over 5 seeds",
             [*bench, "tta", *cfg("fast"), d, "--target", "0.905", "--seeds", q("seeds", "5")], 0.24),
        Part("throughput", "resnet18 training throughput: ablations (bf16 against fp32 first) and step breakdown",
             [*bench, "throughput", *cfg("resnet18"), d, w, "--ablate", "--breakdown", "--steps", q("steps", "40"),
              "--warmup", q("warmup", "20"), "--repeats", q("repeats", "3")], 0.30),
        Part("loader", "the loader alone (resnet18's FFCV pipeline into the device)",
             [*bench, "loader", *cfg("resnet18"), d, w, "--epochs", q("epochs", "3")], 0.08),
        Part("resnet18_tta", "resnet18 preset: time-to-accuracy, one seed",
             [*bench, "tta", *cfg("resnet18"), d, w, "--target", "0.90", "--seeds", "1"], 0.26),
        Part("profile", "resnet18: torch.profiler over 20 steps (the trace, the top operators, the step's split)",
             [*bench, "profile", *cfg("resnet18"), d, w, "--steps", q("steps", "20"), "--warmup", q("warmup", "20")],
             0.07),
        Part("adversarial", "adversarial preset (FGSM-RS, PreAct ResNet-18): training throughput",
             [*bench, "throughput", *cfg("adversarial"), d, w, "--steps", q("steps", "30"), "--warmup",
              q("warmup", "10"), "--repeats", q("repeats", "3")], 0.12),
    ]


def cpu_parts(data: str, out: Path, q: Callable[[str, str], str]) -> list[Part]:
    d, cpu = f"data.dir={data}", ["--config", str(CONFIGS / "cpu.yaml")]
    ckpt = out / "runs" / "seed-0" / "last.pt"
    return [
        Part("precision", "cpu preset: training throughput in fp32 against bf16",
             ["dist_resnet.bench", "throughput", *cpu, d, "--compare", "train.precision=fp32,bf16",
              "--steps", q("steps", "20"), "--warmup", q("warmup", "5"), "--repeats", q("repeats", "3")], 0.12),
        Part("profile", "cpu preset: torch.profiler over 10 steps (the trace, the top operators, the step's split)",
             ["dist_resnet.bench", "profile", *cpu, d, "--steps", q("steps", "10"), "--warmup", q("warmup", "3")],
             0.04),
        Part("cpu_tta", "cpu preset: time-to-accuracy, one seed (its model is kept for the int8 part)",
             ["dist_resnet.bench", "tta", *cpu, d, "--target", "0.84", "--seeds", "1", "--keep", str(out / "runs")],
             0.70),
        Part("int8", "int8 ONNX export of that model against its fp32 graph",
             ["dist_resnet.export", str(ckpt), "--format", "onnx", "--int8", "--out", str(out / "model-int8.onnx"),
              "--verify-test-set", "--speed-seconds", q("speed", "0.5"), "--calibration", q("calibration", "256"),
              f"data.dir={data}"], 0.18, needs="cpu_tta"),
        Part("compress", "compression frontier, small: that model as the teacher, a width-8 student alone and "
                         "distilled, the teacher pruned at 0.5 and fine-tuned (the full one: bench compress)",
             ["dist_resnet.bench", "compress", "--data", data, "--out", str(out / "compress"), "--teacher", str(ckpt),
              "--width", "8", "--epochs", q("epochs", "2"), "--ratios", "0.5", "--finetune-epochs", "1", "--seeds",
              "1", "--speed-seconds", q("speed", "0.5"), "--calibration", q("calibration", "500")], 0.45,
             needs="cpu_tta"),
    ]


def hardware() -> dict:
    """What the figures were measured on."""
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)), "cpu_bf16": cpu_bf16_support(), "commit": commit()}
    if torch.cuda.is_available():
        info.update({"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                     "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                     "driver": nvidia_smi("driver_version"), "cudnn": torch.backends.cudnn.version()})
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=CONFIGS.parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_part(part: Part, extra: list[str], out: Path, limit: float, done: set[str]) -> None:
    """Run `part` as its own process within `limit` seconds; its JSON (even a partial one) into part.result."""
    if part.needs and part.needs not in done:
        part.result = {"status": "skipped", "reason": f"it needs what part {part.needs} makes, which did not finish"}
        return
    if limit < SLACK_S + 2:
        part.result = {"status": "skipped", "reason": f"time budget ({limit:.0f} s left)"}
        return
    target = out / "parts" / f"{part.name}.json"
    target.unlink(missing_ok=True)
    deadline = [] if part.argv[0] != "dist_resnet.bench" else ["--deadline-s", f"{limit - SLACK_S:.0f}"]
    own_folder = part.argv[0] == "dist_resnet.export" or part.argv[1:2] == ["compress"]  # --out is theirs
    output = ["--json" if own_folder else "--out", str(target)]
    argv = [sys.executable, "-m", *part.argv, *extra, *output, *deadline]
    part.result["command"] = "python -m " + shlex.join([*part.argv, *extra])
    t0 = time.perf_counter()
    with open(out / "parts" / f"{part.name}.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its loader threads and compile workers too
            code = proc.wait()
    part.result["seconds"] = round(time.perf_counter() - t0, 1)
    measured = json.loads(target.read_text()) if target.exists() else None
    status = ("done" if code == 0 and measured else "stopped at the time budget" if code == -signal.SIGKILL
              else f"failed (exit {code}; see parts/{part.name}.log)")
    part.result.update({"status": status, "measured": measured})


def main(args) -> dict:
    from .summary import markdown

    # the betons: --data DIR, or data.dir=DIR as every other bench command (and train) takes them
    given = {o.split("=", 1)[1] for o in args.overrides if o.startswith("data.dir=")} | ({args.data} - {None})
    args.overrides = [o for o in args.overrides if not o.startswith("data.dir=")]
    if not args.out or len(given) != 1:
        print("dist_resnet.bench report: error: give the betons once (--data DIR or data.dir=DIR"
              + (f"; given: {', '.join(sorted(given))}" if given else "") + ") and --out DIR (the report's folder)",
              file=sys.stderr)
        raise SystemExit(2)
    args.data = given.pop()
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    gpu = args.parts == "gpu" or (args.parts == "auto" and torch.cuda.is_available())
    budget = args.budget_s or (480.0 if gpu else 1800.0)

    def q(key: str, value: str) -> str:
        return QUICK[key] if args.quick else value

    parts = gpu_parts(args.data, q) if gpu else cpu_parts(args.data, out, q)
    if args.only:
        parts = [p for p in parts if p.name in args.only.split(",")]
    report = {"kind": "gpu" if gpu else "cpu", "budget_s": budget, "hardware": hardware(), "overrides": args.overrides,
              "parts": []}
    end, share_left = time.monotonic() + budget, sum(p.share for p in parts)
    for part in parts:
        left = end - time.monotonic()
        limit = left * part.share / share_left  # its share of what is left: earlier savings carry forward
        share_left -= part.share
        print(f"[{part.name}] {part.title}: up to {limit:.0f} s", flush=True)
        extra = list(args.overrides) if part.argv[0] == "dist_resnet.bench" else []
        run_part(part, extra, out, limit, {p["name"] for p in report["parts"] if p["status"] == "done"})
        print(f"[{part.name}] {part.result['status']} in {part.result.get('seconds', 0)} s", flush=True)
        report["parts"].append({"name": part.name, "title": part.title, **part.result})
        write_json(out / "report.json", report)  # after every part: a stopped report keeps what it measured
    report["total_s"] = round(budget - (end - time.monotonic()), 1)
    write_json(out / "report.json", report)
    text = markdown(report)
    atomic_write(out / "report.md", lambda f: f.write(text.encode()))
    print(text)
    return report
