"""Helpers for the tests that compare whole runs and drive launcher processes."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from dist_resnet.checkpoint import load
from tests.conftest import ROOT, TINY


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load(run_dir / "last.pt")["model"]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "img_per_s", "eval_time_s")} for r in history]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights and the same history (times aside), and `b` completed."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"
    ma, mb = metrics(a), metrics(b)
    assert mb["completed"] and without_times(ma["history"]) == without_times(mb["history"])


def relative_distance(a: Path, b: Path) -> float:
    """||wa - wb|| / ||wa|| over all floating-point tensors of the two runs' final weights."""
    wa, wb = weights(a), weights(b)
    keys = [k for k in wa if wa[k].is_floating_point()]
    va, vb = torch.cat([wa[k].flatten() for k in keys]), torch.cat([wb[k].flatten() for k in keys])
    return ((va - vb).norm() / va.norm()).item()


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def start(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def read_until(p: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    out, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        out.append(line)
        if marker in line:
            return "".join(out)
    p.kill()
    raise AssertionError(f"'{marker}' never appeared:\n{''.join(out)[-4000:]}")


def finish(p: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = p.communicate(timeout=timeout)
    return out


def build_trainer(tiny_betons, tmp_path, *overrides):
    """A 1-rank CPU Trainer of the tiny runs, built in-process (its steps driven by the test)."""
    from dist_resnet.config import load_config
    from dist_resnet.distributed import DistEnv
    from dist_resnet.train import Trainer

    cfg = load_config(TINY[1], [*TINY[2:], f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'run'}", *overrides])
    return Trainer(cfg, DistEnv(0, 1, 0, 1, torch.device("cpu")))
