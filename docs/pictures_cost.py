"""What the two PNGs at the end of a run cost: a tiny run's CPU time with run.pictures=true and false.

    python docs/pictures_cost.py --data DIR [--epochs 2] [--repeats 3]

The run is the test suite's tiny run (tests/conftest.py TINY: resnet9 at width 8, batch 100, fp32) on DIR,
as the suite starts most of them: forked from a process that has already imported torch, FFCV, matplotlib
and the trainer (tests/launch.py PRELOAD), so that the import is not counted. Each run's CPU time (its
process's, every thread) is taken alternately with and without the pictures, --repeats times each, and printed
as mean ± std. Measures and prints.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_seconds(argv: list[str]) -> float:
    """One run of the trainer forked from this process: its CPU time in seconds."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        t0 = time.process_time()
        importlib.import_module("dist_resnet.train").main(argv)
        os.write(write, f"{time.process_time() - t0}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    if status or not out:
        raise SystemExit(f"the run failed (status {status})")
    return float(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="betons (the suite uses its 1,000-image tiny_betons)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from tests.conftest import TINY
    from tests.launch import PRELOAD

    for module in PRELOAD:
        importlib.import_module(module)
    base = [o for o in TINY if not o.startswith("run.pictures=")]
    times: dict[str, list[float]] = {"true": [], "false": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for pictures in times:
                run_dir = Path(tmp) / "run"
                shutil.rmtree(run_dir, ignore_errors=True)
                times[pictures].append(cpu_seconds([*base, f"data.dir={args.data}", f"run.dir={run_dir}",
                                                    f"train.epochs={args.epochs}", f"run.pictures={pictures}"]))
    for pictures, t in times.items():
        print(f"run.pictures={pictures}: {statistics.mean(t):.2f} ± {statistics.stdev(t):.2f} s of CPU "
              f"({args.repeats} runs of {args.epochs} epochs)")
    print(f"the PNGs: {1 - statistics.mean(times['false']) / statistics.mean(times['true']):.0%} of a run's CPU")


if __name__ == "__main__":
    main()
