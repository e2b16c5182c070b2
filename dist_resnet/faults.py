"""Fault injection, for the tests that prove a kill at any moment loses nothing.

    DIST_RESNET_FAULT="save:2"      SIGKILL this process the 2nd time it reaches the point "save"
    DIST_RESNET_FAULT="step:7@1"    ... the 7th "step", on rank 1 only

Points: `step` (after an optimizer step), `eval` (inside an evaluation), `write` (inside an atomic
write, after the temp file is written and before it replaces the target), `link` (a checkpoint
is written but last.pt does not point at it yet). Unset, a point costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "DIST_RESNET_FAULT"
_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, rank = rest.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
