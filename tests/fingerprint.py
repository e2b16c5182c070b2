"""The fingerprint of a finished run: sha256 of its metrics.json history (times left out) and of the
weights in last.pt, so that two runs, or one run before and after a change, compare in one line.

    python tests/fingerprint.py RUN_DIR [RUN_DIR ...]

The redesign of issue 16 was checked with it: a deterministic 2-epoch `configs/cpu.yaml` run on the
full CIFAR-10 copy, at the commit before the redesign and after it, must print the same two hashes.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

TIMES = ("epoch_time_s", "img_per_s", "eval_time_s")


def fingerprint(run_dir: Path) -> dict[str, str]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = [{k: v for k, v in r.items() if k not in TIMES} for r in metrics["history"]]
    h_hist = hashlib.sha256(json.dumps(history, sort_keys=True).encode()).hexdigest()
    weights = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    h_w = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].contiguous()
        h_w.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h_w.update(t.numpy().tobytes())
    return {"history": h_hist, "weights": h_w.hexdigest(), "epochs": str(len(history)),
            "test_acc": str(metrics.get("test_acc"))}


if __name__ == "__main__":
    for d in sys.argv[1:]:
        f = fingerprint(Path(d))
        print(f"{d}: history {f['history'][:16]} weights {f['weights'][:16]} "
              f"({f['epochs']} epochs, test_acc {f['test_acc']})")
