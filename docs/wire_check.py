"""What DDP puts on the wire between two hosts, and its step time on a shaped link, against docs/SCALING.md.

    sudo python docs/wire_check.py --data data/cifar10 [--shape]       # from a checkout, as root

Two hosts n1, n2 are network namespaces on a private bridge (tests/multinode.py's network, without
Slurm). resnet18 (CIFAR) trains on one rank per host with gloo (`bench throughput` under torchrun, CPU,
8 images per rank). Bytes: the counters of the bridge-side veth of each host, read around two runs of
different step counts, so that what is paid once (rendezvous, DDP's first broadcast) cancels, divided by
the steps between them. `--shape`: the link shaped with tc (tbf at 1 and 10 Gbit/s; this machine's kernel
has no netem, so no added delay) on both hosts, and the measured step time against docs/scaling_model.py's
prediction for that link.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))

from scaling_model import GRAD_BYTES, efficiency  # noqa: E402
from tests.multinode import _network  # noqa: E402

BATCH = 8  # per rank


def counters(bridge_veths: list[str]) -> int:
    """Bytes the hosts sent: the bridge side's rx of each host's veth."""
    return sum(int(Path(f"/sys/class/net/{v}/statistics/rx_bytes").read_text()) for v in bridge_veths)


def run(hosts, data: str, out: Path, steps: int, hook: str, port: int, nnodes: int = 2, repeats: int = 1) -> dict:
    procs = []
    for rank, h in enumerate(hosts):
        enter = h.enter()
        cmd = [*enter[:-1], f"--wd={ROOT}", "--", sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={rank}",
               "--nproc_per_node=1", "--master_addr=n1", f"--master_port={port}", "-m", "dist_resnet.bench",
               "throughput", "--config", str(ROOT / "configs" / "resnet18.yaml"), f"data.dir={data}",
               f"train.batch_size={nnodes * BATCH}", "train.device=cpu", "model.compile=false", "data.pipeline=device",
               f"train.comm_hook={hook}", "train.warmup_steps=2", "train.powersgd_start=2", "--steps", str(steps),
               "--warmup", "2", "--repeats", str(repeats), "--out", str(out / f"{hook}-{steps}-{rank}.json")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    errs = [p.communicate(timeout=900)[1] for p in procs]
    if os.environ.get("WIRE_DEBUG"):
        print(errs[0][-3000:])
    if any(p.returncode for p in procs):
        raise SystemExit(f"a run failed: {errs[0][-2000:]}")
    row = json.loads((out / f"{hook}-{steps}-0.json").read_text())["rows"][0]
    if "error" in row:
        raise SystemExit(f"{hook}, {steps} steps: {row['error']}")
    return row


def shape(hosts, rate: str | None) -> None:
    for h in hosts:
        subprocess.run([*h.enter(), "tc", "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
        if rate:  # tbf only: this machine's kernel has no netem (no added delay; "qdisc kind is unknown")
            subprocess.run([*h.enter(), "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst",
                            "4mb", "latency", "100ms"], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--shape", action="store_true")
    p.add_argument("--hooks", default="none,bf16,powersgd")
    p.add_argument("--unshaped-gbs", type=float, default=2.96,
                   help="the unshaped link's bandwidth for the model: gloo's point-to-point GB/s on this machine "
                        "(docs/allreduce_check.py measured 2.96 over loopback)")
    a = p.parse_args()
    a.data = str(Path(a.data).resolve())
    root = Path(tempfile.mkdtemp(prefix="wire_"))
    bridge, hosts = _network(root, 2)
    veths = [f"{bridge.replace('drnbr', 'drn')}v{i}" for i in (1, 2)]
    try:
        print(f"resnet18, gloo, 2 hosts x 1 rank, {BATCH} images per rank; the model's fp32 gradients: "
              f"{GRAD_BYTES / 1e6:.1f} MB; ring all-reduce over 2 ranks: each sends {GRAD_BYTES / 1e6:.1f} MB per step")
        print("\n| comm_hook | MB sent per step, both hosts | per host | vs the ring's fp32 volume |\n|---|---|---|---|")
        for hook in a.hooks.split(","):
            got = {}
            for steps in (4, 12):
                before = counters(veths)
                run(hosts, a.data, root, steps, hook, 29400 + steps)
                got[steps] = counters(veths) - before
            per_step = (got[12] - got[4]) / 8
            print(f"| {hook} | {per_step / 1e6:.1f} | {per_step / 2e6:.1f} | {per_step / 2 / GRAD_BYTES:.3f} |",
                  flush=True)
        if a.shape:
            alone = run(hosts[:1], a.data, root, 8, "none", 29500, nnodes=1, repeats=3)  # one rank's compute
            rate = alone["img_per_s"]
            print(f"\none rank alone, {BATCH} images per step: {rate:.1f} img/s (compute {1000 * BATCH / rate:.0f} ms "
                  "per step); 3 repeats of 8 steps each below")
            print("\n| link | measured ms per step | model ms per step | model's exposed all-reduce ms | measured / "
                  "model |\n|---|---|---|---|---|")
            for rate_name, bw in (("unshaped", None), ("10gbit", 10e9 / 8), ("1gbit", 1e9 / 8)):
                shape(hosts, None if bw is None else rate_name)
                r = run(hosts, a.data, root, 8, "none", 29600, repeats=3)
                step_ms = 1000 * 2 * BATCH / r["img_per_s"]
                spread = 1000 * 2 * BATCH * r["img_per_s_std"] / r["img_per_s"] ** 2
                model = efficiency(BATCH, 2, rate, bw or a.unshaped_gbs * 1e9, bw or a.unshaped_gbs * 1e9, 0.0)
                predicted = model["t_c_ms"] + model["exposed_ms"]
                print(f"| {rate_name} | {step_ms:.0f} ± {spread:.0f} | {predicted:.0f} | {model['exposed_ms']:.0f} | "
                      f"{step_ms / predicted:.2f} |", flush=True)
            shape(hosts, None)
    finally:
        for h in hosts:
            h.holder.kill()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
