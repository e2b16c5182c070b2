"""One typed config tree: dataclass schema + YAML preset + dotted overrides.

Each component owns a small dataclass; `Config` composes them. OmegaConf
validates keys and types against the schema before anything starts, and the
resolved tree is written to `run.dir/config.yaml` and into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException


class Precision(str, Enum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Schedule(str, Enum):
    onecycle = "onecycle"  # linear warm-up to lr, linear decay to 0
    cosine = "cosine"  # linear warm-up to lr, cosine decay to 0


class Pipeline(str, Enum):
    ffcv = "ffcv"  # FFCV decodes and copies every batch (any data size)
    device = "device"  # the beton is read once into device memory; batches are gathered there


class Normalization(str, Enum):
    auto = "auto"  # imagenet for torchvision's pretrained weights (tv_* models), else dataset
    dataset = "dataset"  # the train split's per-channel mean/std, from the manifest
    imagenet = "imagenet"  # (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)


class Norm(str, Enum):
    batch = "batch"  # BatchNorm (SyncBatchNorm across ranks with model.sync_bn=true)
    group = "group"  # GroupNorm(8 groups): batch-independent, so DDP equals one big batch exactly


class Pad(str, Enum):
    zeros = "zeros"  # translate pads with 0 after normalisation, i.e. the dataset mean
    reflect = "reflect"  # translate pads with the mirrored border


class TTA(str, Enum):
    none = "none"
    flip = "flip"  # mean logits of the image and its mirror (2 views)
    flip_translate = "flip_translate"  # flip x {none, 1 px up-left, 1 px down-right}, weights 1/2, 1/4, 1/4


class CompileMode(str, Enum):  # torch.compile(mode=...); the names use _ where torch's modes use -
    default = "default"
    reduce_overhead = "reduce-overhead"  # CUDA graphs
    max_autotune = "max-autotune"  # Triton/cuBLAS autotuning + CUDA graphs (long first compile)
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class NonFinite(str, Enum):
    stop = "stop"  # end the run (exit code 3), keeping the last good checkpoint
    rollback = "rollback"  # reload the last good checkpoint, halve the LR, go on (at most train.max_rollbacks times)


class Adversarial(str, Enum):
    none = "none"
    fgsm = "fgsm"  # one signed-gradient step (with adv.init=random: FGSM-RS, "Fast is better than free")
    pgd = "pgd"  # adv.steps signed-gradient steps (Madry et al.)


class EvalAttack(str, Enum):
    none = "none"
    pgd = "pgd"  # PGD with adv.eval_steps and adv.eval_restarts at every test evaluation: test/robust_acc


class AdvInit(str, Enum):
    random = "random"  # uniform in the eps-ball
    zero = "zero"


class Device(str, Enum):
    auto = "auto"  # cuda:{LOCAL_RANK} when CUDA is available, else cpu
    cuda = "cuda"
    cpu = "cpu"


@dataclass
class DataConfig:
    dir: str = MISSING  # folder with train.beton, test.beton, manifest.json
    pipeline: Pipeline = Pipeline.ffcv  # ffcv: decode every batch; device: decode once into device memory
    num_workers: int = 8  # FFCV decode threads per rank
    batches_ahead: int = 2  # FFCV prefetch depth; must be >= 1
    os_cache: bool = True  # share the beton through the page cache
    flip: bool = True  # random horizontal flip (train only)
    translate: int = 2  # random translation of up to N pixels of a 32-px image, scaled to the image side
    translate_pad: Pad = Pad.zeros  # what a translation shifts in: zeros (the mean) or the mirrored border
    flip_alternate: bool = False  # derandomised flip: random in epoch 1, then each image flips every other epoch
    cutout: int = 0  # side of a square (cutout x cutout, clipped at the border) zeroed at a random centre; 0 = off
    verify: bool = False  # check every beton's sha256 against the manifest before training (sizes: always)
    resize: int = 0  # upsample every batch to resize x resize on the device before the model; 0 = off
    normalize: Normalization = Normalization.auto  # whose mean/std the inputs are normalised with
    fp32_input: bool = False  # normalise in fp32 and feed fp32 batches (fastnet's whitening stem then runs in fp32)
    val_fraction: float = 0.0  # hold out this class-stratified fraction of the train split for validation
    val_seed: int = 0  # which images are held out (fixed across seeds and sweep trials)


@dataclass
class ModelConfig:
    name: str = "resnet18"  # see dist_resnet.models.MODELS
    width: int = 64  # base width (resnet9 family: widths w, 2w, 4w, 8w)
    norm: Norm = Norm.batch  # BatchNorm, or GroupNorm (independent of the batch size)
    sync_bn: bool = False  # SyncBatchNorm over all ranks (GPU only; torch has no CPU SyncBatchNorm)
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPU and CPU)
    compile: bool = True  # torch.compile the model (GPU or CPU; on CPU it is often slower and slow to build)
    compile_mode: CompileMode = CompileMode.default  # torch.compile's mode (_ for -)
    pretrained: str = ""  # start from: our .pt checkpoint, a torchvision .pth, a .safetensors, or "torchvision"
    freeze: str = "none"  # none | backbone (a linear probe) | a stage name: it and every stage before it
    residual: bool = False  # fastnet: a residual around each stage's second conv (airbench's stage has none)
    whiten_bias_epochs: int = 0  # fastnet: train the whitening bias this many epochs, then freeze it; 0 = always


@dataclass
class OptimConfig:
    lr: float = 0.2  # peak learning rate for train.batch_size
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum (needs momentum > 0)
    weight_decay: float = 5e-4  # never applied to BatchNorm weights or biases
    label_smoothing: float = 0.1  # of the cross-entropy loss, in [0, 1)
    schedule: Schedule = Schedule.onecycle  # per-step LR: linear warm-up, then linear or cosine decay
    warmup_epochs: float = 1.0  # may be fractional
    lr_start: float = 0.0  # warm-up starts from this LR factor: step s < W gets start + (1 - start)(s + 1)/W
    lr_end: float = 0.0  # the decay ends at this factor: the last step gets end + (1 - end)/(T - W)
    norm_bias_lr_scale: float = 1.0  # LR multiplier of normalisation-layer biases (no weight decay on them)
    norm_bias_decay: bool = False  # decay normalisation biases too, as much per step as the weights (wd / scale)
    bias_decay: bool = False  # weight decay on the other biases too (fastnet's whitening bias, as airbench)
    head_lr_scale: float = 1.0  # LR multiplier of the classification head (fine-tuning: often 10)
    layer_decay: float = 1.0  # layer-wise LR decay: stage d of S gets lr x layer_decay^(S - d); 1 = off
    lookahead_every: int = 0  # lookahead: every k steps pull the weights to a slow average (0 = off)
    lookahead_decay: float = 0.95  # per-step decay of the slow average, ramped up as (t / T)^3


@dataclass
class TrainConfig:
    epochs: int = 20  # fixed for a run: a resume may not change it (the LR schedule spans them)
    max_steps: int = 0  # end after this many optimizer steps, inside the last epoch (airbench: 476 of 10 x 48); 0 = all
    batch_size: int = 512  # GLOBAL batch size, split evenly across ranks
    accum_steps: int = 1  # micro-batches per optimizer step on each rank (all-reduce on the last only)
    seed: int = 0  # >= 0: initial weights, sample order and augmentation all derive from it
    ema: bool = False  # keep an EMA of the weights (and BN buffers), evaluated beside the raw model
    ema_decay: float = 0.999  # per optimizer step
    precision: Precision = Precision.auto  # autocast dtype: auto = bf16 on GPU, fp32 on CPU
    device: Device = Device.auto  # auto: cuda:{LOCAL_RANK} when CUDA is available, else cpu
    resume: bool = False  # continue from run.dir's newest checkpoint that loads (config changes are checked)
    keep_last: int = 2  # checkpoints kept (ckpt-<step>.pt); last.pt and best.pt link to the newest and the best
    timeout_s: float = 600.0  # a collective waits this long for a rank that died or hangs, then the run ends
    nonfinite: NonFinite = NonFinite.stop  # what a NaN/inf loss does (checked at log_every and epoch end)
    max_rollbacks: int = 3  # train.nonfinite=rollback: how many times before giving up
    eval_every: int = 1  # epochs between evaluations (the last epoch always evaluates)
    eval_test_every: int = 0  # with a validation split: epochs between test evaluations (0 = at the end only)
    tta: TTA = TTA.none  # test-time augmentation of every evaluation
    log_every: int = 50  # steps between host syncs for logging
    stop_check_every: int = 10  # steps between checks for a stop request (SIGUSR1/SIGTERM or run.dir/STOP)
    deterministic: bool = False  # deterministic kernels where torch has them (slower); sets CUBLAS_WORKSPACE_CONFIG
    loss_scale: float = 0.0  # fp16: 0 = dynamic (GradScaler, one host sync per step); > 0 = this fixed scale, no sync
    warmup_steps: int = 0  # untimed steps on throw-away data first (compile, autotune); the state is restored exactly
    adversarial: Adversarial = Adversarial.none  # train on adversarial examples (adv.*): none | fgsm | pgd
    eval_attack: EvalAttack = EvalAttack.none  # also report accuracy under PGD (adv.eval_*) at each test evaluation


@dataclass
class AdvConfig:
    eps: float = 8.0  # L-inf radius in pixel levels (0-255) of the [0, 1] image, for training and evaluation
    alpha: float = 0.0  # step size in pixel levels; 0 = 1.25 eps for fgsm, 2.5 eps / steps for pgd
    steps: int = 7  # train.adversarial=pgd: attack steps per training step (fgsm: 1)
    init: AdvInit = AdvInit.random  # the attack's start: random in the ball (FGSM-RS) or the image itself
    eval_alpha: float = 2.0  # step size of the evaluation PGD, in pixel levels
    eval_steps: int = 20  # steps of the evaluation PGD (train.eval_attack=pgd)
    eval_restarts: int = 1  # random restarts of the evaluation PGD; an image counts if it withstands all
    check_images: int = 512  # adversarial training: train images PGD-attacked every epoch to catch a collapse
    check_steps: int = 10  # steps of that check's PGD (alpha = adv.eval_alpha)


@dataclass
class RunConfig:
    dir: str = MISSING  # output folder: config.yaml, metrics.json, checkpoints, TensorBoard
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """A config that cannot run; the message says which key and what is valid."""


def _explain(err: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        where = f"'{parent}'" if parent else "the top level"
        return f"unknown config key '{key}'. Valid keys in {where}: {', '.join(valid)}"
    return f"bad value for '{key}': {msg}"


def merged(path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None) -> DictConfig:
    """Schema <- `base` (e.g. a checkpoint's config) <- YAML preset <- `key=value` overrides, typed by the
    schema, required keys possibly still missing (`???`); raises ConfigError."""
    schema = OmegaConf.structured(Config)
    if base is not None and base.get("model", {}).get("name") == "fastnet" and "residual" not in base["model"]:
        base = {**base, "model": {**base["model"], "residual": True}}  # fastnet's shape before model.residual
    try:
        cfg = schema if base is None else OmegaConf.merge(schema, base)
        if path is not None:
            p = Path(path)
            if not p.is_file():
                presets = sorted(x.name for x in (Path(__file__).parent.parent / "configs").glob("*.yaml"))
                raise ConfigError(f"config file {p} not found. Presets: {', '.join(presets)}")
            try:
                preset = OmegaConf.load(p)  # PyYAML's safe loader underneath: tags never construct objects
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {p} is not plain YAML: {str(e).splitlines()[0]}") from None
            cfg = OmegaConf.merge(cfg, preset)
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
    _check(obj)
    return obj


def _check(cfg: Config) -> None:
    from .models import check_model

    try:
        check_model(cfg.model.name, cfg.model.norm.value, cfg.model.width, cfg.model.freeze)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.pretrained == "torchvision" and not cfg.model.name.startswith("tv_"):
        raise ConfigError(f"model.pretrained=torchvision needs a torchvision model (tv_resnet18, tv_resnet34, "
                          f"tv_resnet50), not model.name={cfg.model.name}; pass a weights file instead")
    if not 0 <= cfg.data.val_fraction < 1 or cfg.data.val_seed < 0 or cfg.train.eval_test_every < 0:
        raise ConfigError("'data.val_fraction' must be in [0, 1), 'data.val_seed' and 'train.eval_test_every' >= 0")
    if cfg.data.resize < 0 or cfg.optim.head_lr_scale <= 0 or not 0 < cfg.optim.layer_decay <= 1:
        raise ConfigError("'data.resize' must be >= 0 (0 = off), 'optim.head_lr_scale' > 0 and "
                          "'optim.layer_decay' in (0, 1] (1 = off)")
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_every": cfg.train.eval_every,
        "train.log_every": cfg.train.log_every,
        "train.accum_steps": cfg.train.accum_steps,
        "train.stop_check_every": cfg.train.stop_check_every,
        "data.batches_ahead": cfg.data.batches_ahead,
        "data.num_workers": cfg.data.num_workers,
        "model.width": cfg.model.width,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"bad value for '{key}': {value}; it must be >= 1")
    if cfg.train.seed < 0:
        raise ConfigError(f"bad value for 'train.seed': {cfg.train.seed}; it must be >= 0")
    if cfg.train.max_steps < 0 or cfg.train.loss_scale < 0 or cfg.model.whiten_bias_epochs < 0:
        raise ConfigError("'train.max_steps', 'train.loss_scale' and 'model.whiten_bias_epochs' must be >= 0 (0 = off)")
    if cfg.model.name != "fastnet" and (cfg.model.residual or cfg.model.whiten_bias_epochs):
        raise ConfigError(f"model.residual and model.whiten_bias_epochs apply to model.name=fastnet, not "
                          f"{cfg.model.name}")
    if cfg.train.warmup_steps < 0:
        raise ConfigError(f"bad value for 'train.warmup_steps': {cfg.train.warmup_steps}; it must be >= 0 (0 = off)")
    if cfg.train.keep_last < 1:
        raise ConfigError(f"bad value for 'train.keep_last': {cfg.train.keep_last}; it must be >= 1")
    if cfg.train.timeout_s <= 0 or cfg.train.max_rollbacks < 0:
        raise ConfigError("'train.timeout_s' must be > 0 and 'train.max_rollbacks' >= 0")
    if cfg.optim.momentum < 0 or cfg.optim.weight_decay < 0:
        raise ConfigError("'optim.momentum' and 'optim.weight_decay' must be >= 0")
    if cfg.optim.nesterov and cfg.optim.momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 (it is {cfg.optim.momentum}); "
                          "set optim.nesterov=false for plain SGD")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"bad value for 'optim.lr': {cfg.optim.lr}; it must be > 0")
    if not 0 <= cfg.optim.label_smoothing < 1:
        raise ConfigError("bad value for 'optim.label_smoothing': it must be in [0, 1)")
    if not 0 < cfg.train.ema_decay < 1:
        raise ConfigError("bad value for 'train.ema_decay': it must be in (0, 1)")
    if cfg.data.translate < 0 or cfg.data.cutout < 0:
        raise ConfigError("'data.translate' and 'data.cutout' must be >= 0")
    if cfg.data.flip_alternate and not cfg.data.flip:
        raise ConfigError("data.flip_alternate=true needs data.flip=true")
    for key in ("lr_start", "lr_end"):
        if not 0 <= getattr(cfg.optim, key) <= 1:
            raise ConfigError(f"bad value for 'optim.{key}': it must be in [0, 1] (a factor of optim.lr)")
    if cfg.optim.norm_bias_lr_scale <= 0:
        raise ConfigError("bad value for 'optim.norm_bias_lr_scale': it must be > 0")
    a = cfg.adv
    if not 0 < a.eps <= 255 or a.alpha < 0 or a.eval_alpha <= 0 or a.check_images < 0:
        raise ConfigError(f"'adv.eps' must be in (0, 255] pixel levels (it is {a.eps:g}), 'adv.alpha' >= 0 "
                          "(0 = automatic), 'adv.eval_alpha' > 0 and 'adv.check_images' >= 0 (0 = off)")
    for key in ("steps", "eval_steps", "eval_restarts", "check_steps"):
        if getattr(a, key) < 1:
            raise ConfigError(f"bad value for 'adv.{key}': {getattr(a, key)}; it must be >= 1")
    if cfg.optim.lookahead_every < 0 or not 0 < cfg.optim.lookahead_decay < 1:
        raise ConfigError("'optim.lookahead_every' must be >= 0 (0 = off) and 'optim.lookahead_decay' in (0, 1)")


# What a resume may change. Every other key shapes the run's trajectory and must match the checkpoint's.
RESUME_HARMLESS = (
    "run.dir", "run.progress", "train.resume", "train.log_every", "train.stop_check_every", "train.eval_every",
    "train.tta", "train.keep_last", "train.eval_test_every", "train.timeout_s", "train.nonfinite", "train.max_rollbacks",
    "train.ema", "train.ema_decay",  # the EMA only watches the weights; a new one starts from the restored ones
    "data.dir",  # compared by the betons' sha256 instead: a moved folder resumes, different data does not
    "data.num_workers", "data.batches_ahead", "data.os_cache", "data.verify",
    "model.pretrained",  # only the first start reads it: a resume takes the weights from the checkpoint
    "data.pipeline",  # ffcv and device give the very same batches (tests/test_loader.py)
    "train.warmup_steps",  # restores the state exactly (tests/test_train.py)
    "train.eval_attack", "adv.eval_alpha", "adv.eval_steps", "adv.eval_restarts",  # evaluation only
    "adv.check_images", "adv.check_steps",  # the collapse check reads the weights; it changes none
)
# Allowed too, but the resumed run is then no longer bit-identical to an uninterrupted one.
RESUME_NUMERICS = ("train.device", "model.compile", "model.compile_mode", "model.channels_last", "train.deterministic")


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(old: Config, new: Config) -> tuple[dict, dict]:
    """(refused, numerics): the changed keys that alter the run's trajectory, and those that only
    alter its floating point; each maps key -> (old value, new value)."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    numerics = {k: v for k, v in changed.items() if k in RESUME_NUMERICS}
    refused = {k: v for k, v in changed.items() if k not in RESUME_HARMLESS and k not in RESUME_NUMERICS}
    return refused, numerics


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "adv": AdvConfig,
            "run": RunConfig}
_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+?(?:=[^#]*)?#\s*(.+?)\s*$")


def field_comments(cls: type) -> dict[str, str]:
    """The one-line comment after each field of a schema dataclass, read from this file's source."""
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


def parse_args(argv: Sequence[str] | None = None, prog: str = "dist_resnet.train") -> Config:
    """`--config PRESET.yaml key=value ...` -> Config; exits with a clear message on error.
    `--help` lists every key of the schema; `--print-config` prints the resolved config and exits."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description="Options are dotted overrides, e.g. train.epochs=10.",
                                epilog=schema_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset, e.g. configs/resnet18.yaml")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config tree")
    args = p.parse_intermixed_args(argv)  # overrides may sit on either side of --options
    try:
        if args.print_config:
            cfg = merged(args.config, args.overrides)
            if not OmegaConf.missing_keys(cfg):
                load_config(args.config, args.overrides)  # the same checks as a run
            print(OmegaConf.to_yaml(cfg), end="")
            raise SystemExit(0)
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
