"""Config validation, one function per section, run by `load_config` before anything starts.

The value ranges are one table (`RULES`: a test, what the values must be, the keys it applies to);
each section's function applies its keys, then the few checks that relate two keys. Checks that need the machine, the world size or the data (the
batch against the train images, bf16 on this GPU, ...) are made once, when the trainer is built
(dist_resnet.engine.build).
"""
from __future__ import annotations

from typing import Any, Callable

from .. import models
from .schema import AdvConfig, Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig

Rule = tuple[Callable[[Any], bool], str, tuple[str, ...]]  # test, what the values must be, the dotted keys


def at_least(n: float) -> Callable[[Any], bool]:
    return lambda v: v >= n


def above(n: float) -> Callable[[Any], bool]:
    return lambda v: v > n


def within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


# every key with a range, grouped by what it must be
RULES: list[Rule] = [
    (at_least(2), ">= 2 (PowerSGD's warm start needs a step of plain all-reduce before it)", ("train.powersgd_start",)),
    (at_least(1), ">= 1", ("train.powersgd_rank",)),
    (at_least(1), ">= 1", ("data.batches_ahead", "data.num_workers", "model.width", "train.epochs",
                           "train.batch_size", "train.accum_steps", "train.eval_every", "train.log_every",
                           "train.stop_check_every", "train.keep_last", "adv.steps", "adv.eval_steps",
                           "adv.eval_restarts", "adv.check_steps")),
    (at_least(0), ">= 0 (0 = off)", ("data.mixup_alpha", "data.cutmix_alpha")),
    (within(0, 1), "in [0, 1]", ("data.mix_prob", "data.switch_prob")),
    (at_least(0), ">= 0", ("data.val_seed", "data.fold", "data.translate", "optim.momentum", "optim.weight_decay",
                           "train.seed", "train.max_rollbacks", "train.early_stop_min_delta")),
    (at_least(0), ">= 0 (0 = as stored)", ("data.res", "data.test_res")),
    (within(0, 1, lo_open=True), "in (0, 1] (a share of the shorter side)", ("data.test_crop_ratio",)),
    (at_least(0), ">= 0 (0 = off)", ("data.res_end", "data.resize", "data.cutout", "model.whiten_bias_epochs",
                                     "optim.lookahead_every", "train.eval_test_every", "train.max_steps", "train.checkpoint_every",
                                     "train.loss_scale", "train.warmup_steps", "adv.check_images",
                                     "train.early_stop_patience")),
    (above(0), "> 0", ("optim.lr", "optim.head_lr_scale", "optim.norm_bias_lr_scale", "train.timeout_s",
                       "adv.eval_alpha")),
    (within(0, 1, hi_open=True), "in [0, 1)", ("data.val_fraction", "optim.label_smoothing", "model.dropout",
                                               "model.drop_path")),
    (within(0, 1, True, True), "in (0, 1)", ("optim.lookahead_decay", "train.ema_decay")),
    (above(0), "> 0", ("optim.muon_lr",)),
    (within(0, 1, hi_open=True), "in [0, 1)", ("optim.muon_momentum",)),
    (at_least(1), ">= 1", ("optim.muon_ns_steps",)),
    (within(0, 1), "in [0, 1]", ("distill.alpha",)),
    (above(0), "> 0", ("distill.temperature",)),
    (within(0, 1), "in [0, 1] (a factor of optim.lr)", ("optim.lr_start", "optim.lr_end")),
    (within(0, 1, lo_open=True), "in (0, 1] (1 = off)", ("optim.layer_decay",)),
    (within(0, 255, lo_open=True), "in (0, 255] pixel levels (0-255) of the [0, 1] image", ("adv.eps",)),
    (at_least(0), ">= 0 (0 = automatic)", ("adv.alpha",)),
    (at_least(0), ">= 0 (0 = at the end only)", ("adv.eval_every",)),
]


def _apply(section: str, values: object) -> None:
    for ok, requirement, keys in RULES:
        for key in keys:
            name = key.split(".", 1)[1]
            if key.startswith(section + ".") and not ok(v := getattr(values, name)):
                shown = f"{v:g}" if isinstance(v, float) else v
                raise ConfigError(f"bad value for '{key}': {shown}; it must be {requirement}")


def check_data(d: DataConfig) -> None:
    _apply("data", d)
    if d.folds == 1 or d.folds < 0:
        raise ConfigError(f"bad value for 'data.folds': {d.folds}; it must be >= 2 (0 = off)")
    if d.folds and d.val_fraction:
        raise ConfigError(f"data.folds={d.folds} holds out a fold as the validation split: leave data.val_fraction "
                          f"at 0 (it is {d.val_fraction:g})")
    if d.fold >= max(d.folds, 1) and (d.folds or d.fold):
        raise ConfigError(f"bad value for 'data.fold': {d.fold}; it must be in 0..{max(d.folds - 1, 0)}"
                          + ("" if d.folds else " (set data.folds=K first)"))
    if d.flip_alternate and not d.flip:
        raise ConfigError("data.flip_alternate=true needs data.flip=true")
    check_crop(d)


def _pair(d: DataConfig, key: str, ok: Callable[[float, float], bool], requirement: str) -> None:
    v = list(getattr(d, key))
    if len(v) != 2 or not ok(*v):
        raise ConfigError(f"bad value for 'data.{key}': {v}; it must be {requirement}")


def _set(d, key: str) -> bool:
    """Whether `key` of a section (data, optim) differs from its default."""
    import dataclasses

    f = next(f for f in dataclasses.fields(d) if f.name == key)
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return list(getattr(d, key)) != list(default) if isinstance(default, list) else getattr(d, key) != default


def _shown(v: object) -> str:
    return f"[{','.join(f'{x:g}' for x in v)}]" if isinstance(v, (list, tuple)) else f"{v:g}"


def _needs(section: str, values, keys: tuple[str, ...], needs: str, on: bool) -> None:
    """ConfigError for the first of `keys` set away from its default while `needs` (the key it refines) is not."""
    for key in keys:
        if not on and _set(values, key):
            raise ConfigError(f"{section}.{key}={_shown(getattr(values, key))} applies only with {needs}, which is not "
                              f"set: set {needs}, or leave {section}.{key} out (it would be ignored)")


def check_crop(d: DataConfig) -> None:
    """The random-resized crop, the train and test resolutions and progressive resizing."""
    _pair(d, "rrc_scale", lambda a, b: 0 < a <= b <= 1, "[min, max] with 0 < min <= max <= 1 (shares of the area)")
    _pair(d, "rrc_ratio", lambda a, b: 0 < a <= b, "[min, max] with 0 < min <= max (width / height)")
    _pair(d, "res_ramp", lambda a, b: 0 <= a <= b, "[E0, E1] with 0 <= E0 <= E1 (epochs)")
    rrc = d.crop.value == "rrc"
    _needs("data", d, ("rrc_scale", "rrc_ratio"), "data.crop=rrc", rrc)
    _needs("data", d, ("test_crop_ratio",), "data.test_res", bool(d.test_res))
    _needs("data", d, ("res_ramp",), "data.res_end", bool(d.res_end))
    if d.res and not rrc:
        raise ConfigError(f"data.res={d.res} sets the size of the random-resized crop: set data.crop=rrc "
                          "(to upsample fixed-size images, use data.resize)")
    if rrc and d.resize:
        raise ConfigError(f"data.crop=rrc crops and resizes while decoding, to data.res: leave data.resize at 0 "
                          f"(it is {d.resize}) and set data.res={d.resize}")
    if d.res_end:
        if not (rrc and d.res):
            raise ConfigError(f"data.res_end={d.res_end} grows the train side from data.res: set data.crop=rrc "
                              "and data.res (e.g. 160)")
        if d.res_end < d.res or d.res_ramp[1] <= d.res_ramp[0]:
            raise ConfigError(f"progressive resizing needs data.res_end >= data.res ({d.res_end} < {d.res}?) and "
                              f"data.res_ramp=[E0,E1] with E0 < E1 (it is {list(d.res_ramp)})")


def check_model(m: ModelConfig) -> None:
    try:
        models.check_model(m.name, m.norm.value, m.width, m.freeze)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _apply("model", m)
    if m.pretrained == "torchvision" and not m.name.startswith("tv_"):
        raise ConfigError(f"model.pretrained=torchvision needs a torchvision model (tv_resnet18, tv_resnet34, "
                          f"tv_resnet50), not model.name={m.name}; pass a weights file instead")
    if m.drop_path and not models.has_residual_branches(m.name, m.residual):
        raise ConfigError(f"model.drop_path={m.drop_path:g} drops residual branches, and model.name={m.name} has none: "
                          "use model.dropout, or model.residual=true (fastnet with a residual in each stage)")
    if m.blurpool and not m.name.startswith("tv_"):
        raise ConfigError(f"model.blurpool blurs before strided convolutions of the torchvision ResNets (tv_resnet18, "
                          f"tv_resnet34, tv_resnet50); model.name={m.name} has none to blur")
    if m.name != "fastnet" and (m.residual or m.whiten_bias_epochs):
        raise ConfigError(f"model.residual and model.whiten_bias_epochs apply to model.name=fastnet, not {m.name}")


def check_optim(o: OptimConfig) -> None:
    _apply("optim", o)
    if o.nesterov and o.momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 (it is {o.momentum}); "
                          "set optim.nesterov=false for plain SGD")
    _needs("optim", o, ("muon_lr", "muon_momentum", "muon_ns_steps"), "optim.name=muon", o.name.value == "muon")


def check_train(t: TrainConfig) -> None:
    _apply("train", t)
    if t.comm_hook.value == "powersgd" and t.warmup_steps < 2:
        raise ConfigError(f"train.comm_hook=powersgd needs train.warmup_steps >= 2 (it is {t.warmup_steps}): DDP "
                          "re-orders its gradient buckets after its first step, PowerSGD's state follows that order, "
                          "and a resumed run must find it so before it trains")


def check_adv(a: AdvConfig) -> None:
    _apply("adv", a)


def check_across(cfg: Config) -> None:
    """The checks that relate keys of two sections."""
    t, d = cfg.train, cfg.data
    if (d.mixup_alpha or d.cutmix_alpha) and t.adversarial.value != "none":
        raise ConfigError(f"Mixup/CutMix (data.mixup_alpha, data.cutmix_alpha) and train.adversarial="
                          f"{t.adversarial.value} do not combine here: the attack is made against one label per "
                          "image, not a mixed one; train with one of them")
    if d.res_end and d.res_ramp[1] > t.epochs:
        raise ConfigError(f"data.res_ramp={list(d.res_ramp)} ends after the run's {t.epochs} epochs: "
                          f"set its end to at most train.epochs")
    if t.early_stop_patience and not (d.val_fraction or d.folds):
        raise ConfigError(f"train.early_stop_patience={t.early_stop_patience} needs a validation split to watch "
                          "(early stopping never looks at the test set): set data.val_fraction, e.g. 0.1, or data.folds")


def check_finite(cfg: Config) -> None:
    """No float key may be nan or inf (a range check lets inf through where it has no upper bound: an
    infinite data.mixup_alpha drew a NaN lambda, and the run died blaming optim.lr)."""
    import dataclasses
    import math

    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            v = getattr(values, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"bad value for '{section.name}.{f.name}': {v}; it must be a finite number")


def check_distill(d) -> None:
    _apply("distill", d)
    _needs("distill", d, ("alpha", "temperature"), "distill.teacher=PATH", bool(d.teacher))


def check(cfg: Config) -> None:
    """Every section's values; ConfigError naming the first bad key, its value and what it must be."""
    check_finite(cfg)
    check_model(cfg.model)
    check_data(cfg.data)
    check_optim(cfg.optim)
    check_train(cfg.train)
    check_adv(cfg.adv)
    check_distill(cfg.distill)
    check_across(cfg)
