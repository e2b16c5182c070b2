"""Schema + YAML preset + dotted overrides -> one typed, checked `Config`; and back to YAML or a dict.

OmegaConf validates keys and types against the schema before anything starts, the section checks
(config.checks) validate the values, and the resolved tree is written to `run.dir/config.yaml` and
into every checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from .checks import check
from .schema import Config, ConfigError

PRESETS = Path(__file__).resolve().parents[2] / "configs"


def _explain(err: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]  # OmegaConf appends full_key, types...
    if isinstance(err, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        where = f"'{parent}'" if parent else "the top level"
        return f"unknown config key '{key}'. Valid keys in {where}: {', '.join(valid)}"
    return f"bad value for '{key}': {msg}"


def _preset(path: str | Path) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        presets = sorted(x.name for x in PRESETS.glob("*.yaml"))
        raise ConfigError(f"config file {p} not found. Presets: {', '.join(presets)}")
    try:
        return OmegaConf.load(p)  # PyYAML's safe loader underneath: tags never construct objects
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not plain YAML: {str(e).splitlines()[0]}") from None


def merged(path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None) -> DictConfig:
    """Schema <- `base` (e.g. a checkpoint's config) <- YAML preset <- `key=value` overrides, typed by the
    schema, required keys possibly still missing (`???`); raises ConfigError."""
    schema = OmegaConf.structured(Config)
    if base is not None and base.get("model", {}).get("name") == "fastnet" and "residual" not in base["model"]:
        base = {**base, "model": {**base["model"], "residual": True}}  # fastnet's shape before model.residual
    try:
        cfg = schema if base is None else OmegaConf.merge(schema, base)
        if path is not None:
            cfg = OmegaConf.merge(cfg, _preset(path))
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override '{o}' is not of the form key=value (e.g. train.epochs=10)")
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, schema)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None) -> Config:
    """The typed, checked config: `merged(...)` with every required key set; raises ConfigError."""
    cfg = merged(path, overrides, base)
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"required config keys not set: {', '.join(missing)} (e.g. {missing[0]}=PATH)")
        obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except MissingMandatoryValue as e:  # pragma: no cover - caught by missing_keys above
        raise ConfigError(f"required config key not set: {e.full_key}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, OmegaConf.structured(Config))) from None
    check(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys of a config dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
