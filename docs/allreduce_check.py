"""Check the ring all-reduce cost model of docs/SCALING.md on what this machine has: gloo over loopback.

    python docs/allreduce_check.py [--ranks 2] [--repeats 5]

Measures, between `--ranks` processes, the point-to-point bandwidth B (send/recv of the same bytes) and
the all-reduce time of 1 to 44.7 MB (ResNet-18's fp32 gradients), and prints the all-reduce time against
the ring formula t = 2 (N - 1) / N * S / B (+ a per-call latency fitted from the smallest size).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESNET18_BYTES = 11_173_962 * 4  # 44.7 MB


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.mean(ts), statistics.stdev(ts) if len(ts) > 1 else 0.0


def worker(rank: int, world: int, port: int, repeats: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    big = torch.ones(RESNET18_BYTES // 4)

    def p2p():  # rank 0 -> 1 and back: 2 S bytes cross the link
        if rank == 0:
            dist.send(big, 1)
            dist.recv(big, 1)
        elif rank == 1:
            dist.recv(big, 0)
            dist.send(big, 0)

    t, _ = timed(p2p, repeats)
    bandwidth = 2 * RESNET18_BYTES / t
    rows = []
    for mb in (1, 4, 16, RESNET18_BYTES / 1e6):
        x = torch.ones(int(mb * 1e6) // 4)
        mean, std = timed(lambda: dist.all_reduce(x), repeats)
        rows.append((mb, mean, std))
    latency = rows[0][1] - 2 * (world - 1) / world * 1e6 / bandwidth
    if rank == 0:
        print(f"gloo, {world} ranks on one host: point-to-point bandwidth B = {bandwidth / 1e9:.2f} GB/s, "
              f"latency fitted at 1 MB = {latency * 1e3:.2f} ms")
        print("| size MB | all-reduce ms (mean ± std) | ring formula ms | measured / formula |")
        print("|---|---|---|---|")
        for mb, mean, std in rows:
            pred = 2 * (world - 1) / world * mb * 1e6 / bandwidth + latency
            print(f"| {mb:.1f} | {mean * 1e3:.1f} ± {std * 1e3:.1f} | {pred * 1e3:.1f} | {mean / pred:.2f} |")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a.ranks, port, a.repeats), nprocs=a.ranks)


if __name__ == "__main__":
    main()
