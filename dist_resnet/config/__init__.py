"""One typed config tree: dataclass schema + YAML preset + dotted overrides.

- `schema`: one small dataclass per section; `Config` composes them.
- `checks`: the values, validated per section before anything starts.
- `load`: merging, loading, and back to YAML or a dict.
- `resume`: which keys a resume may change.
- `cli`: `--config`, `--help`, `--print-config`.
"""
from .checks import check
from .cli import field_comments, parse_args, schema_help
from .load import flatten, load_config, merged, to_dict, to_yaml
from .resume import RESUME_HARMLESS, RESUME_NUMERICS, resume_changes
from .schema import (SECTIONS, TTA, AdvConfig, AdvInit, Adversarial, CompileMode, Config, ConfigError, Crop, DataConfig,
                     Device, EvalAttack, ModelConfig, Norm, NonFinite, Normalization, OptimConfig, OptimizerName, Order, Pad, Pipeline,
                     Precision, RunConfig, Schedule, TrainConfig)

__all__ = ["check", "field_comments", "parse_args", "schema_help", "flatten", "load_config", "merged", "to_dict",
           "to_yaml", "RESUME_HARMLESS", "RESUME_NUMERICS", "resume_changes", "SECTIONS", "TTA", "AdvConfig",
           "AdvInit", "Adversarial", "CompileMode", "Config", "ConfigError", "Crop", "DataConfig", "Device", "EvalAttack",
           "ModelConfig", "Norm", "NonFinite", "Normalization", "OptimConfig", "OptimizerName", "Order", "Pad", "Pipeline", "Precision",
           "RunConfig", "Schedule", "TrainConfig"]
