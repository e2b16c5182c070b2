"""The config on the command line: `--config PRESET.yaml key=value ...`, `--help` listing every key of the
schema with its type, default and comment, and `--print-config`."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from enum import Enum
from typing import Sequence

from omegaconf import MISSING, OmegaConf

from ..distributed import EXIT_BAD_INPUT, record_outcome
from .load import load_config, merged
from .schema import SECTIONS, Config, ConfigError

_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+?(?:=[^#]*)?#\s*(.+?)\s*$")


def field_comments(cls: type) -> dict[str, str]:
    """The one-line comment after each field of a schema dataclass, read from the schema's source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def schema_help() -> str:
    """Every config key, grouped by section: its type, default, allowed values and the schema's comment."""
    lines = ["config keys (set them in a preset or as key=value; `--print-config` shows the result):"]
    for section, cls in SECTIONS.items():
        lines.append(f"\n{section}:")
        comments, hints = field_comments(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            kind = "|".join(e.value for e in t) if isinstance(t, type) and issubclass(t, Enum) else t.__name__
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # a list: its factory's
            default = "required" if value is MISSING else repr(value.value if isinstance(value, Enum) else value)
            lines.append(f"  {section}.{f.name} ({kind}, {default})")
            if f.name in comments:
                lines.append(f"      {comments[f.name]}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None, prog: str = "dist_resnet.train",
               check: typing.Callable[[Config, list[int]], None] | None = None) -> Config:
    """`--config PRESET.yaml key=value ...` -> Config; exits with a clear message on error.
    `--help` lists every key of the schema; `--print-config` prints the resolved config and exits;
    `--check` runs `check(cfg, world_sizes)` too (the caller's checks of the machine and the data, for each world
    size the run may have: --world-size) and exits 0, or 2 with one line."""
    # the keys' list only for --help: it reads the schema's source (inspect, ast), which every run need not do; an
    # in-process run in the suite once hit CPython 3.11's "AST constructor recursion depth mismatch" there
    wants_help = any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(prog=prog, description="Options are dotted overrides, e.g. train.epochs=10.",
                                epilog=schema_help() if wants_help else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset, e.g. configs/resnet18.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config tree")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    p.add_argument("--check", action="store_true",
                   help="check the config and the data folder, then exit: 0, or one line and 2 (the launch scripts "
                        "run this before torchrun, whose own failure report is 25 lines and exit 1)")
    p.add_argument("--world-size", type=int, nargs="+", metavar="N",
                   help="with --check: the number of processes the run will have, or several (an elastic range's "
                        "ends); default: $WORLD_SIZE, or 1")
    args = p.parse_intermixed_args(argv)  # overrides may sit on either side of --options
    try:
        if args.print_config:
            cfg = merged(args.config, args.overrides)
            if not OmegaConf.missing_keys(cfg):
                load_config(args.config, args.overrides)  # the same checks as a run
            print(OmegaConf.to_yaml(cfg), end="")
            raise SystemExit(0)
        cfg = load_config(args.config, args.overrides)
        worlds = args.world_size or [int(os.environ.get("WORLD_SIZE", 1))]
        if min(worlds) < 1:
            raise ConfigError(f"--world-size {' '.join(map(str, worlds))}: every size must be at least 1")
    except (ConfigError, ValueError, RuntimeError) as e:
        _bad_input(prog, f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}")
    if not args.check:
        return cfg
    try:
        if check is not None:
            check(cfg, worlds)
    except (ValueError, RuntimeError) as e:  # ConfigError, DataError, CheckpointError: as the run says them
        _bad_input(prog, f"error: {e}")
    print(f"{prog}: config and data ok")
    raise SystemExit(0)


def _bad_input(prog: str, message: str) -> typing.NoReturn:
    record_outcome(EXIT_BAD_INPUT, message)  # for a launcher that reads it (slurm/train.sh)
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT) from None
