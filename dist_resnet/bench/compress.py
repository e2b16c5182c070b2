"""`python -m dist_resnet.bench compress --data DIR --out DIR`: the accuracy-speed frontier of compression on
this machine, from one trained teacher to every deployable variant, measured on the same test set and cores.

The runs (each `python -m dist_resnet.train` with the cpu preset, its own folder under OUT/runs):

- `teacher`: a wider ResNet-9 (`--teacher-width`, `--teacher-epochs`), one seed; or `--teacher PATH`;
- `small`: the preset's model (`--width`, `--epochs`), trained alone, and `small+kd` the same with the teacher
  distilling (distill.alpha, distill.temperature), each for every seed;
- `pruned-R`: the teacher pruned at each ratio (python -m dist_resnet.prune), then fine-tuned for
  `--finetune-epochs` with the teacher distilling, for every seed.

Then each variant's seed-0 model is exported to ONNX, fp32 and int8 (onnxruntime's static quantization, as
`dist_resnet.export --int8`), both graphs scored on the whole test set, and all graphs' throughput measured in
one process at batch 1 and 64, taking turns (dist_resnet.bench.frontier). It writes OUT/frontier.md (the table,
the goals, the commands), OUT/frontier.json and OUT/frontier.png (accuracy against img/s, fp32 and int8).

Runs that finished are reused and a stopped one resumes (train.resume=true), so a second call continues the
first. `key=value` overrides apply to every training run (e.g. train.batch_size=100 on small data); a variant's
own keys (model.width, train.epochs, the distill.* keys) come after them and win."""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import write_json
from .measure import Deadline, mean_std

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cpu.yaml"


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist_resnet.bench compress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value overrides of every training run")
    p.add_argument("--data", required=True, help="the betons (train and test)")
    p.add_argument("--out", required=True, help="the folder for the runs, graphs, table and plot")
    p.add_argument("--json", help="also write the results here (bench report's part)")
    p.add_argument("--teacher", help="start from this trained teacher (.pt) instead of training one")
    p.add_argument("--teacher-width", type=int, default=32, help="the teacher's model.width (default 32)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="the teacher's train.epochs (default 3)")
    p.add_argument("--width", type=int, default=16, help="the small model's model.width (default 16: the preset's)")
    p.add_argument("--epochs", type=int, default=3, help="the small model's train.epochs (default 3)")
    p.add_argument("--ratios", default="0.3,0.5", help="pruning ratios, comma-separated (default 0.3,0.5)")
    p.add_argument("--importance", default="l1", choices=["l1", "l2", "taylor"], help="pruning importance")
    p.add_argument("--finetune-epochs", type=int, default=2, help="epochs of each pruned model's fine-tune")
    p.add_argument("--alpha", type=float, default=0.7, help="distill.alpha of every distilled run")
    p.add_argument("--temperature", type=float, default=4.0, help="distill.temperature of every distilled run")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 of every run but the teacher's")
    p.add_argument("--speed-seconds", type=float, default=0.5, help="seconds per graph, batch size and round")
    p.add_argument("--calibration", type=int, default=500, help="train images that calibrate the int8 graphs")
    p.add_argument("--deadline-s", type=float, help="start no run later than this many seconds from now")
    return p


@dataclass
class Variant:
    """One deployable model: its name, how it was made, its runs (one per seed) and what was measured."""

    name: str
    how: str
    runs: list[Path] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    file: Path | None = None  # a given model (--teacher), scored on --data's test set by its graphs

    def checkpoint(self) -> Path | None:
        return self.file or next((r / "last.pt" for r in self.runs if (r / "last.pt").is_file()), None)


class Runner:
    """Starts the runs (or reuses the finished ones) and keeps the commands that made them."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.deadline = Deadline(args.deadline_s)
        self.skipped: list[str] = []
        self.commands: dict[str, str] = {}  # name -> the command that made it

    def train(self, name: str, seed: int, keys: list[str]) -> Path | None:
        run_dir = self.out / "runs" / name
        argv = ["dist_resnet.train", "--config", shown(CONFIG), f"data.dir={self.args.data}", f"run.dir={run_dir}",
                f"train.seed={seed}", "run.progress=false", "run.pictures=false", *self.args.overrides, *keys]
        return run_dir if self.call(name, argv + ["train.resume=true"], done=finished(run_dir)) else None

    def call(self, name: str, argv: list[str], done: bool) -> bool:
        """Run `python -m argv` (unless `done`), its output in OUT/logs/NAME.log; whether it finished."""
        self.commands[name] = "python -m " + shlex.join(argv)
        if done:
            return True
        if not self.deadline.allows():
            self.skipped.append(name)
            return False
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.out / "logs" / f"{name}.log", "w") as log:
            left = self.deadline.left()
            try:
                code = subprocess.run([sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT,
                                      timeout=None if left is None else max(1.0, left)).returncode
            except subprocess.TimeoutExpired:
                code = "deadline"
        print(f"[{name}] {'done' if code == 0 else f'failed ({code})'} in {time.perf_counter() - t0:.0f} s "
              f"(log: {self.out / 'logs' / f'{name}.log'})", flush=True)
        if code != 0:
            self.skipped.append(name)
        return code == 0


def shown(path: Path) -> str:
    """`path` relative to the working folder where it lies inside it (configs/cpu.yaml from the repository)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "metrics.json").read_text()).get("completed"))
    except (OSError, json.JSONDecodeError):
        return False


def variants(args, runner: Runner) -> list[Variant]:
    """Train, prune and fine-tune every variant (what finished before is reused)."""
    seeds = range(args.seeds)
    if args.teacher:
        teacher = Variant("teacher", f"given: {Path(args.teacher).name}", file=Path(args.teacher))
        teacher_pt = args.teacher
    else:
        teacher = Variant("teacher", f"resnet9 width {args.teacher_width}, {args.teacher_epochs} epochs")
        run = runner.train("teacher", 0, [f"model.width={args.teacher_width}", f"train.epochs={args.teacher_epochs}"])
        teacher.runs = [run] if run else []
        teacher_pt = str(runner.out / "runs" / "teacher" / "last.pt")
    out = [teacher]
    if teacher.checkpoint() is None:
        return out
    kd = [f"distill.teacher={teacher_pt}", f"distill.alpha={args.alpha}", f"distill.temperature={args.temperature}"]
    small = [f"model.width={args.width}", f"train.epochs={args.epochs}"]
    for name, how, keys in (("small", "alone", small), ("small+kd", "with the teacher distilling", small + kd)):
        v = Variant(name, f"resnet9 width {args.width}, {args.epochs} epochs, {how}")
        v.runs = [r for s in seeds if (r := runner.train(f"{name}-s{s}", s, keys))]
        out.append(v)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        pruned = runner.out / f"pruned-{ratio:g}.pt"
        made = runner.call(f"prune-{ratio:g}", ["dist_resnet.prune", teacher_pt, "--ratio", f"{ratio:g}", "--out",
                                                 str(pruned), "--importance", args.importance, f"data.dir={args.data}"],
                           done=pruned.is_file())
        v = Variant(f"pruned-{ratio:g}", f"teacher pruned at {ratio:g} ({args.importance}), fine-tuned "
                                        f"{args.finetune_epochs} epochs with the teacher distilling")
        if made:
            keys = [f"model.width={teacher_width(args, teacher_pt)}", f"model.pretrained={pruned}",
                    f"train.epochs={args.finetune_epochs}", *kd]
            v.runs = [r for s in seeds if (r := runner.train(f"pruned-{ratio:g}-s{s}", s, keys))]
        out.append(v)
    return out


def teacher_width(args, teacher_pt: str) -> int:
    """The teacher's model.width (the pruned model is built from its config, then resized to its record)."""
    if not args.teacher:
        return args.teacher_width
    from ..models import files

    return int(files.read(teacher_pt).config["model"]["width"])


def accuracies(v: Variant) -> None:
    """The runs' final test accuracy (each run's own evaluation): mean and std over the seeds."""
    accs = [json.loads((r / "metrics.json").read_text())["test_acc"] for r in v.runs if finished(r)]
    if accs:
        mean, std = mean_std(accs)
        v.measured.update({"test_acc": accs, "acc_mean": mean, "acc_std": std, "seeds": len(accs),
                           "train_time_s": [json.loads((r / "metrics.json").read_text()).get("train_time_s")
                                            for r in v.runs if finished(r)]})


def main(argv: list[str]) -> dict:
    from . import frontier

    args = arguments().parse_intermixed_args(argv)
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        ratios = []
    if not ratios or not all(0 < r < 1 for r in ratios) or args.seeds < 1 or min(args.epochs, args.teacher_epochs,
                                                                                   args.finetune_epochs) < 1:
        print(f"dist_resnet.bench compress: error: --ratios {args.ratios} must be numbers in (0, 1), --seeds and "
              "every --*epochs >= 1", file=sys.stderr)
        raise SystemExit(2)
    if not (Path(args.data) / "manifest.json").is_file():
        print(f"dist_resnet.bench compress: error: --data {args.data} holds no betons (manifest.json): prepare "
              "them with python -m dist_resnet.data.prepare", file=sys.stderr)
        raise SystemExit(2)
    runner = Runner(args)
    t0 = time.perf_counter()
    found = variants(args, runner)
    for v in found:
        accuracies(v)
        v.commands = [c for k, c in runner.commands.items() if k == v.name or k.startswith(f"{v.name}-s")
                      or k == f"prune-{v.name.split('-', 1)[-1]}"]
    result = frontier.measure(found, args, runner.skipped)
    result.update({"total_s": round(time.perf_counter() - t0, 1),
                   "command": "python -m dist_resnet.bench compress " + shlex.join(argv)})
    frontier.write(result, Path(args.out))
    if args.json:
        write_json(args.json, result)
    return result
