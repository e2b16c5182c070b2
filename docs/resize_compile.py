"""Progressive resizing under torch.compile: one static graph per train side, or one dynamic graph?

    python docs/resize_compile.py [--model resnet9] [--width 16] [--sides 32 64] [--batch 64] [--steps 20]

Trains the model with inductor at each side in turn, twice: (a) torch's default, automatic dynamic shapes
(the first side compiles a static graph, the second a graph with the side symbolic, which later sides reuse);
(b) `torch._dynamo.config.automatic_dynamic_shapes = False`: a static graph per side (dynamo's cache holds 8).
For each: the compile time at each side (the first step there) and the steady step time (mean ± std over
--steps), with the graph count. The trainer's warm-up compiles every side of the ramp before the timed run
either way (dist_resnet.engine.warmup); this says which graphs the timed steps then run. Measures and prints.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


def run(model_fn, sides: list[int], batch: int, steps: int, dynamic_auto: bool) -> list[dict]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch._dynamo.config.automatic_dynamic_shapes = dynamic_auto
    torch.manual_seed(0)
    model = model_fn().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = torch.compile(model)
    rows = []
    for side in sides:
        x = torch.randn(batch, 3, side, side).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))

        def one() -> float:
            t0 = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16):
                loss = F.cross_entropy(step(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        first = one()
        times = [one() for _ in range(steps)]
        rows.append({"side": side, "first_step_s": first, "step_ms": 1e3 * np.mean(times),
                     "step_ms_std": 1e3 * np.std(times, ddof=1), "graphs": counters["stats"]["unique_graphs"]})
    torch._dynamo.config.automatic_dynamic_shapes = True
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet9")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--sides", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    from dist_resnet.models import build_model

    def model_fn():
        return build_model(args.model, 10, args.width)

    print(f"{args.model} width {args.width}, batch {args.batch}, bf16 autocast, inductor, CPU threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    print("| graphs | side | compile (first step) | step ms | graphs so far |\n|---|---|---|---|---|")
    for name, auto in (("dynamic (torch's default)", True), ("static per side", False)):
        for r in run(model_fn, args.sides, args.batch, args.steps, auto):
            print(f"| {name} | {r['side']} | {r['first_step_s']:.1f} s | {r['step_ms']:.1f} ± {r['step_ms_std']:.1f} "
                  f"| {r['graphs']} |", flush=True)


if __name__ == "__main__":
    main()
