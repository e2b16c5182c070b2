"""A crash in torch's oneDNN on CPU: the weight gradient of a strided 1x1 convolution in channels_last with few
input channels writes out of bounds (docs/TRAINING.md, "A crash in oneDNN on CPU").

    python docs/onednn_1x1.py [--reps 20] [--dtype fp32|bf16] [--out scan.json]

Each shape runs in its own process (one thread, as a rank of the suite runs), since a corrupted heap ends the
process some steps later: a segfault (-11), "double free or corruption" (-6), a bus error (-7), or a hang (the
process is then killed after --timeout seconds). For each shape that survives, the gradients in channels_last are
compared with those in contiguous memory (the largest difference relative to the largest gradient). The smallest
reproducer, for an upstream report, is printed first.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

REPRODUCER = """import torch
torch.set_num_threads(1)
conv = torch.nn.Conv2d(4, 8, kernel_size=1, stride=2, bias=False).to(memory_format=torch.channels_last)
x = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
for _ in range(50):
    conv(x).sum().backward()  # the weight gradient
print("survived")
"""

CASE = """import json, sys, torch
ic, oc, k, s, side, n, reps, dtype = json.loads(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn(n, ic, side, side)
def grads(fmt):
    conv = torch.nn.Conv2d(ic, oc, k, s, k // 2, bias=False)
    torch.manual_seed(1)
    torch.nn.init.normal_(conv.weight)
    conv = conv.to(memory_format=fmt)
    xi = x.contiguous(memory_format=fmt).requires_grad_()
    for _ in range(reps):
        conv.weight.grad, xi.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y = conv(xi)
        y.float().square().sum().backward()
    return conv.weight.grad, xi.grad
a, b = grads(torch.channels_last), grads(torch.contiguous_format)
rel = [((u - v).abs().max() / v.abs().max()).item() for u, v in zip(a, b)]
print(json.dumps({"dW": rel[0], "dX": rel[1]}))
"""


def run(case: list, timeout: float) -> dict:
    try:
        p = subprocess.run([sys.executable, "-c", CASE, json.dumps(case)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": f"hung (killed after {timeout:g} s)"}
    if p.returncode:
        last = (p.stderr.strip().splitlines() or [""])[-1][:60]
        return {"outcome": f"exit {p.returncode}" + (f" ({last})" if last and "Traceback" not in last else "")}
    return {"outcome": "ok", **json.loads(p.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20, help="forward+backward passes per shape")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    import torch

    mkldnn = next((line.strip() for line in torch.__config__.show().splitlines() if "DNN v" in line), "?")
    print(f"torch {torch.__version__}, {mkldnn}, kernels at {torch.backends.cpu.get_cpu_capability()}\n")
    print("Smallest reproducer (a segfault or 'double free or corruption' on AVX2 and AVX512 CPUs):\n")
    print(REPRODUCER)
    shapes = [(ic, 8, 1, 2) for ic in (1, 2, 3, 4, 6, 7, 8, 12, 15, 16, 24, 32)]
    shapes += [(4, 8, 1, 1), (4, 8, 3, 2), (4, 8, 3, 1)]  # controls: no stride, a 3x3 kernel
    rows = []
    print(f"| in channels | out | kernel | stride | channels_last, {args.dtype}, 24 x 64 x 64, {args.reps} passes | "
          "dW vs contiguous | dX vs contiguous |")
    print("|---|---|---|---|---|---|---|")
    for ic, oc, k, s in shapes:
        r = run([ic, oc, k, s, 64, 24, args.reps, args.dtype], args.timeout)
        rows.append({"in": ic, "out": oc, "kernel": k, "stride": s, **r})
        diff = (f"{r['dW']:.1e} | {r['dX']:.1e}" if r["outcome"] == "ok" else "- | -")
        print(f"| {ic} | {oc} | {k}x{k} | {s} | {r['outcome']} | {diff} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "onednn": mkldnn, "dtype": args.dtype, "reps": args.reps,
                       "capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
