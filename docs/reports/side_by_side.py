"""The fast preset side by side with airbench94_muon (Jordan, 2024), on one GPU, on the same data, in one call.

    python docs/reports/side_by_side.py --betons .gpu/data --airbench .gpu/airbench94_muon.py --seeds 5 --out /tmp/sbs

- airbench94_muon.py is a copy of the public file (KellerJordan/cifar10-airbench), never committed here
  (../shared/GPU.md says how to bring it). Its code runs as it is; the one change is its number of runs
  (`range(200)` -> `range(--seeds)`). Its data is this project's betons, written where it reads them
  (`cifar10/train.pt`, `cifar10/test.pt`: uint8 N x 32 x 32 x 3, int64 labels, the class names) in the
  betons' order, so both read the very same images.
- The preset: `python -m dist_resnet.bench tta --config configs/fast.yaml`, the same number of seeds.
- Times: airbench's own (CUDA events over the whitening fit, the training epochs and the TTA evaluation,
  after an untimed warm-up run); the preset's `time_to_result_s` (training + the whitening fit + the final
  TTA evaluation, after its untimed warm-up steps): the same span.

It writes side_by_side.md and side_by_side.json in --out, with both logs. Without a GPU, `--no-airbench`
runs the preset's side alone (airbench needs CUDA), which is how the tests run it.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RUNS = re.compile(r"for run in range\(200\)")


def airbench_data(betons: Path, out: Path) -> None:
    """cifar10/train.pt and test.pt as airbench reads them, from the betons (raw images, their order)."""
    import numpy as np
    import torch

    from dist_resnet.data import beton

    classes = json.loads((betons / "manifest.json").read_text())["classes"]
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        path = str(betons / f"{split}.beton")
        n = len(beton.table(path)["label"])
        images, labels = beton.read_raw(path, np.arange(n))
        torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels), "classes": classes},
                   out / f"{split}.pt")


def patched(source: str, seeds: int) -> str:
    """airbench94_muon.py with `seeds` runs instead of 200: the only change."""
    text, n = RUNS.subn(f"for run in range({seeds})", source)
    if n != 1:
        raise SystemExit("error: this airbench94_muon.py has no `for run in range(200)`: bring the public file")
    return text


def airbench_results(log: str) -> list[dict]:
    """Each run's final row of airbench's table (`|  run  |  eval  | ... |`): TTA accuracy and seconds."""
    runs = []
    for line in log.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[1] == "eval":
            runs.append({"tta_val_acc": float(cells[4]), "time_seconds": float(cells[5])})
    return runs


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run(cmd: list[str], log: Path, cwd: Path = ROOT) -> str:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    log.write_text(p.stdout + p.stderr)
    print(f"{' '.join(cmd[:4])} ... exit {p.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    return p.stdout


def side(name: str, accs: list[float], times: list[float], command: str) -> dict:
    (a, a_sd), (t, t_sd) = mean_std(accs), mean_std(times)
    return {"name": name, "runs": len(accs), "acc_mean": a, "acc_std": a_sd, "time_s_mean": t, "time_s_std": t_sd,
            "accs": accs, "times": times, "command": command}


def markdown(rows: list[dict], gpu: str) -> str:
    def pm(m, s, scale=1.0, d=2):
        return "n/a" if m is None else f"{m * scale:.{d}f} ± {s * scale:.{d}f}"

    lines = [f"# The fast preset beside airbench94_muon: {gpu}, {time.strftime('%Y-%m-%d')}", "",
             "| | runs | TTA accuracy (%) | time (s) |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['runs']} | {pm(r['acc_mean'], r['acc_std'], 100)} | "
              f"{pm(r['time_s_mean'], r['time_s_std'])} |" for r in rows]
    if len(rows) == 2 and rows[0]["time_s_mean"] and rows[1]["time_s_mean"]:
        ratio = rows[0]["time_s_mean"] / rows[1]["time_s_mean"]
        lines += ["", f"Time ratio, preset / airbench94_muon: **{ratio:.2f}** (goals: ≤ 1.00, then ≤ 0.80; the "
                      "preset's accuracy goal: ≥ 90.5 %)"]
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betons", required=True, type=Path)
    p.add_argument("--airbench", type=Path, help="a copy of airbench94_muon.py")
    p.add_argument("--no-airbench", action="store_true", help="the preset's side only (no CUDA here)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the preset (tiny runs in the tests)")
    args = p.parse_args(argv)
    if not args.no_airbench and not (args.airbench and args.airbench.is_file()):
        p.error("give --airbench PATH (a copy of airbench94_muon.py), or --no-airbench")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    fast = ["-m", "dist_resnet.bench", "tta", "--config", str(ROOT / "configs" / "fast.yaml"),
            f"data.dir={args.betons}", "--target", "0.905", "--seeds", str(args.seeds), *args.overrides,
            "--out", str(args.out / "fast.json")]
    run([sys.executable, *fast], args.out / "fast.log")
    measured = json.loads((args.out / "fast.json").read_text())["runs"]
    rows.append(side("configs/fast.yaml", [r["final_acc"] for r in measured],
                     [r["time_to_result_s"] for r in measured], "python " + " ".join(fast)))
    gpu = "no GPU"
    if not args.no_airbench:
        import torch

        gpu = torch.cuda.get_device_name(0)
        work = args.out / "airbench"
        airbench_data(args.betons, work / "cifar10")
        (work / "airbench94_muon.py").write_text(patched(args.airbench.read_text(), args.seeds))
        runs = airbench_results(run([sys.executable, "airbench94_muon.py"], args.out / "airbench.log", cwd=work))
        rows.append(side("airbench94_muon", [r["tta_val_acc"] for r in runs], [r["time_seconds"] for r in runs],
                         f"python airbench94_muon.py (range({args.seeds}), data from {args.betons})"))
    result = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (args.out / "side_by_side.json").write_text(json.dumps(result, indent=1))
    text = markdown(rows, gpu)
    (args.out / "side_by_side.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
