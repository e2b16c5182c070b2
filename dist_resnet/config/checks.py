"""Config validation, one function per section, run by `load_config` before anything starts.

Each section's value ranges are a table of rules (key, test, what it must be); the few checks that
relate two keys follow the table. Checks that need the machine, the world size or the data (the
batch against the train images, bf16 on this GPU, ...) are made once, when the trainer is built
(dist_resnet.engine.build).
"""
from __future__ import annotations

from typing import Any, Callable

from .. import models
from .schema import AdvConfig, Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig

Rule = tuple[str, Callable[[Any], bool], str]  # key, ok(value), what the value must be


def at_least(n: float) -> Callable[[Any], bool]:
    return lambda v: v >= n


def above(n: float) -> Callable[[Any], bool]:
    return lambda v: v > n


def within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


DATA: list[Rule] = [
    ("val_fraction", within(0, 1, hi_open=True), "in [0, 1)"),
    ("val_seed", at_least(0), ">= 0"),
    ("resize", at_least(0), ">= 0 (0 = off)"),
    ("batches_ahead", at_least(1), ">= 1"),
    ("num_workers", at_least(1), ">= 1"),
    ("translate", at_least(0), ">= 0"),
    ("cutout", at_least(0), ">= 0 (0 = off)"),
]
MODEL: list[Rule] = [
    ("width", at_least(1), ">= 1"),
    ("whiten_bias_epochs", at_least(0), ">= 0 (0 = off)"),
]
OPTIM: list[Rule] = [
    ("lr", above(0), "> 0"),
    ("momentum", at_least(0), ">= 0"),
    ("weight_decay", at_least(0), ">= 0"),
    ("label_smoothing", within(0, 1, hi_open=True), "in [0, 1)"),
    ("head_lr_scale", above(0), "> 0"),
    ("layer_decay", within(0, 1, lo_open=True), "in (0, 1] (1 = off)"),
    ("lr_start", within(0, 1), "in [0, 1] (a factor of optim.lr)"),
    ("lr_end", within(0, 1), "in [0, 1] (a factor of optim.lr)"),
    ("norm_bias_lr_scale", above(0), "> 0"),
    ("lookahead_every", at_least(0), ">= 0 (0 = off)"),
    ("lookahead_decay", within(0, 1, True, True), "in (0, 1)"),
]
TRAIN: list[Rule] = [
    *((k, at_least(1), ">= 1") for k in ("epochs", "batch_size", "accum_steps", "eval_every", "log_every",
                                          "stop_check_every", "keep_last")),
    ("seed", at_least(0), ">= 0"),
    *((k, at_least(0), ">= 0 (0 = off)") for k in ("eval_test_every", "max_steps", "loss_scale", "warmup_steps")),
    ("timeout_s", above(0), "> 0"),
    ("max_rollbacks", at_least(0), ">= 0"),
    ("ema_decay", within(0, 1, True, True), "in (0, 1)"),
]
ADV: list[Rule] = [
    ("eps", within(0, 255, lo_open=True), "in (0, 255] pixel levels (0-255) of the [0, 1] image"),
    ("alpha", at_least(0), ">= 0 (0 = automatic)"),
    ("eval_alpha", above(0), "> 0"),
    ("check_images", at_least(0), ">= 0 (0 = off)"),
    *((k, at_least(1), ">= 1") for k in ("steps", "eval_steps", "eval_restarts", "check_steps")),
]


def _apply(section: str, values: object, rules: list[Rule]) -> None:
    for key, ok, requirement in rules:
        v = getattr(values, key)
        if not ok(v):
            shown = f"{v:g}" if isinstance(v, float) else v
            raise ConfigError(f"bad value for '{section}.{key}': {shown}; it must be {requirement}")


def check_data(d: DataConfig) -> None:
    _apply("data", d, DATA)
    if d.flip_alternate and not d.flip:
        raise ConfigError("data.flip_alternate=true needs data.flip=true")


def check_model(m: ModelConfig) -> None:
    try:
        models.check_model(m.name, m.norm.value, m.width, m.freeze)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _apply("model", m, MODEL)
    if m.pretrained == "torchvision" and not m.name.startswith("tv_"):
        raise ConfigError(f"model.pretrained=torchvision needs a torchvision model (tv_resnet18, tv_resnet34, "
                          f"tv_resnet50), not model.name={m.name}; pass a weights file instead")
    if m.name != "fastnet" and (m.residual or m.whiten_bias_epochs):
        raise ConfigError(f"model.residual and model.whiten_bias_epochs apply to model.name=fastnet, not {m.name}")


def check_optim(o: OptimConfig) -> None:
    _apply("optim", o, OPTIM)
    if o.nesterov and o.momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 (it is {o.momentum}); "
                          "set optim.nesterov=false for plain SGD")


def check_train(t: TrainConfig) -> None:
    _apply("train", t, TRAIN)


def check_adv(a: AdvConfig) -> None:
    _apply("adv", a, ADV)


def check(cfg: Config) -> None:
    """Every section's values; ConfigError naming the first bad key, its value and what it must be."""
    check_model(cfg.model)
    check_data(cfg.data)
    check_optim(cfg.optim)
    check_train(cfg.train)
    check_adv(cfg.adv)
