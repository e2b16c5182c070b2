"""The config on the command line: `--config PRESET.yaml key=value ...`, `--help` listing every key of the
schema with its type, default and comment, and `--print-config`."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
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
            default = "required" if f.default is MISSING else repr(f.default.value if isinstance(f.default, Enum)
                                                                   else f.default)
            lines.append(f"  {section}.{f.name} ({kind}, {default})")
            if f.name in comments:
                lines.append(f"      {comments[f.name]}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None, prog: str = "dist_resnet.train",
               check: typing.Callable[[Config], None] | None = None) -> Config:
    """`--config PRESET.yaml key=value ...` -> Config; exits with a clear message on error.
    `--help` lists every key of the schema; `--print-config` prints the resolved config and exits;
    `--check` runs `check(cfg)` too (the caller's checks of the data) and exits 0, or 2 with one line."""
    p = argparse.ArgumentParser(prog=prog, description="Options are dotted overrides, e.g. train.epochs=10.",
                                epilog=schema_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset, e.g. configs/resnet18.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config tree")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    p.add_argument("--check", action="store_true",
                   help="check the config and the data folder, then exit: 0, or one line and 2 (the launch scripts "
                        "run this before torchrun, whose own failure report is 25 lines and exit 1)")
    args = p.parse_intermixed_args(argv)  # overrides may sit on either side of --options
    try:
        if args.print_config:
            cfg = merged(args.config, args.overrides)
            if not OmegaConf.missing_keys(cfg):
                load_config(args.config, args.overrides)  # the same checks as a run
            print(OmegaConf.to_yaml(cfg), end="")
            raise SystemExit(0)
        cfg = load_config(args.config, args.overrides)
        if args.check:
            if check is not None:
                check(cfg)
            print(f"{prog}: config and data ok")
            raise SystemExit(0)
        return cfg
    except (ConfigError, ValueError, RuntimeError) as e:  # ConfigError, or the caller's DataError
        message = f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}"
        record_outcome(EXIT_BAD_INPUT, message)  # for a launcher that reads it (slurm/train.sh)
        print(f"{prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
