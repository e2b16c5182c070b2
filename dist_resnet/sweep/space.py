"""The search space: `KEY=SPEC` entries (or a YAML file of `KEY: SPEC`), checked against the config's keys."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import flatten

_SPEC = re.compile(r"^(log|float|int|choice)\((.*)\)$")


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message says why and what to do."""


@dataclass
class Param:
    key: str
    kind: str  # log | float | int | choice
    values: tuple  # (low, high) or the choices

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.key, int(low), int(high))
        return trial.suggest_float(self.key, float(low), float(high), log=self.kind == "log")


def _value(text: str):
    """A number (5e-4 too, which YAML 1.1 reads as a string), else what YAML makes of it."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_param(key: str, spec) -> Param:
    if isinstance(spec, list):
        return Param(key, "choice", tuple(spec))
    text = str(spec).strip()
    if text.startswith("[") and text.endswith("]"):
        return Param(key, "choice", tuple(_value(v) for v in text[1:-1].split(",") if v.strip()))
    m = _SPEC.match(text)
    if not m:
        raise SweepError(f"search space '{key}={text}': use log(a,b), float(a,b), int(a,b), choice(x,...) or [x,...]")
    kind, values = m.group(1), tuple(_value(v) for v in m.group(2).split(","))
    if kind != "choice":
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
            raise SweepError(f"search space '{key}={text}': {kind}(a,b) takes two numbers a < b")
        if kind == "log" and values[0] <= 0:
            raise SweepError(f"search space '{key}={text}': log(a,b) needs a > 0")
    return Param(key, kind, values)


def parse_space(entries: list[str], base_keys: set[str]) -> list[Param]:
    """`KEY=SPEC` entries and YAML files of `KEY: SPEC`, checked against the config's keys."""
    items: list[tuple[str, object]] = []
    for entry in entries:
        if entry.endswith((".yaml", ".yml")) and Path(entry).is_file():
            loaded = yaml.safe_load(Path(entry).read_text()) or {}
            if not isinstance(loaded, dict):
                raise SweepError(f"search space file {entry} must hold KEY: SPEC lines")
            items += list(flatten(loaded).items())
        elif "=" in entry:
            k, v = entry.split("=", 1)
            items.append((k.strip(), v))
        else:
            raise SweepError(f"search space entry '{entry}' is neither KEY=SPEC nor a .yaml file")
    params = [parse_param(k, v) for k, v in items]
    for p in params:
        if p.key not in base_keys:
            raise SweepError(f"search space key '{p.key}' is not a config key (see python -m dist_resnet.train --help)")
    if not params:
        raise SweepError("an empty search space: give --space KEY=SPEC (e.g. --space 'optim.lr=log(0.05,2)')")
    return params

