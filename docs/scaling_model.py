"""The DDP efficiency model of docs/SCALING.md: prints its tables from the stated inputs.

    python docs/scaling_model.py [--img-per-s 40300] [--nvlink-gbs 370] [--ib-gbs 42] [--latency-us 6]

Per step and GPU: compute t_c = b / R (b images per GPU, R the single-GPU rate of the full trainer),
backward ~ 2/3 of it. DDP all-reduces the fp32 gradients (S = 44.7 MB for ResNet-18) in 25 MB buckets,
each launched as soon as backward has produced it, so all but the last bucket overlap backward. Ring
all-reduce of s bytes over N GPUs: 2 (N - 1) / N * s / B + 2 (N - 1) * alpha, with B the bus bandwidth per
GPU (NVLink inside a node of 8, InfiniBand across nodes) and alpha the per-hop latency (inside a node:
alpha / 4). Exposed time = the last bucket's all-reduce + whatever of the others outlasts backward.
Efficiency = t_c / (t_c + exposed).
"""
from __future__ import annotations

import argparse

GRAD_BYTES = 11_173_962 * 4  # ResNet-18, fp32 gradients (bf16 autocast keeps fp32 parameters)
BUCKET = 25 * 2**20  # DDP's default bucket_cap_mb
GPUS_PER_NODE = 8


def allreduce_s(nbytes: float, n: int, bw: float, alpha: float) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * alpha


def efficiency(b: int, n: int, rate: float, nvlink: float, ib: float, alpha: float, accum: int = 1) -> dict:
    t_c = accum * b / rate
    backward = 2 / 3 * b / rate  # only the last micro-batch's backward overlaps the all-reduce
    bw, a = (nvlink, alpha / 4) if n <= GPUS_PER_NODE else (ib, alpha)
    last = GRAD_BYTES - BUCKET * (GRAD_BYTES // BUCKET)  # the bucket of the first layers, ready last
    t_all, t_last = allreduce_s(GRAD_BYTES, n, bw, a), allreduce_s(last, n, bw, a)
    exposed = t_last + max(0.0, t_all - t_last - backward)
    return {"t_c_ms": 1e3 * t_c, "allreduce_ms": 1e3 * t_all, "exposed_ms": 1e3 * exposed,
            "efficiency": t_c / (t_c + exposed), "hidden": t_all - t_last <= backward}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img-per-s", type=float, default=40_300, help="single-GPU training rate R (img/s)")
    p.add_argument("--nvlink-gbs", type=float, default=370, help="all-reduce bus bandwidth inside a node (GB/s)")
    p.add_argument("--ib-gbs", type=float, default=42, help="all-reduce bus bandwidth across nodes, per GPU (GB/s)")
    p.add_argument("--latency-us", type=float, default=6, help="per-hop latency across nodes (us)")
    a = p.parse_args()
    args = (a.img_per_s, a.nvlink_gbs * 1e9, a.ib_gbs * 1e9, a.latency_us * 1e-6)
    print(f"R = {a.img_per_s:.0f} img/s per GPU, NVLink {a.nvlink_gbs} GB/s, InfiniBand {a.ib_gbs} GB/s per GPU, "
          f"latency {a.latency_us} us; S = {GRAD_BYTES / 1e6:.1f} MB")
    print("\n| GPUs | global batch | per GPU | compute ms | all-reduce ms | exposed ms | efficiency | hidden |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (4, 8, 32, 128):
        for global_batch in (512, 256 * n):
            b = global_batch // n
            r = efficiency(b, n, *args)
            print(f"| {n} | {global_batch} | {b} | {r['t_c_ms']:.2f} | {r['allreduce_ms']:.2f} | "
                  f"{r['exposed_ms']:.2f} | {100 * r['efficiency']:.0f} % | {'yes' if r['hidden'] else 'no'} |")
    print("\ntrain.accum_steps at 128 GPUs, 64 images per GPU per micro-batch:")
    print("| accum_steps | global batch | efficiency |")
    print("|---|---|---|")
    for k in (1, 2, 4, 8):
        print(f"| {k} | {64 * 128 * k} | {100 * efficiency(64, 128, *args, accum=k)['efficiency']:.0f} % |")
    print("\nsmallest per-GPU batch whose all-reduce is hidden behind backward (all but the last bucket):")
    for n in (8, 32, 128):
        b = next(b for b in range(1, 4096) if efficiency(b, n, *args)["hidden"])
        print(f"  {n} GPUs: {b} images per GPU (global {b * n})")


if __name__ == "__main__":
    main()
