"""Every component of a training run, built from the config once, in one order:

    runtime checks -> data opened -> resume point agreed -> weights and normalisation -> seed -> loaders
    -> model chain -> per-rank seed -> optimisation, step, evaluation -> state restored -> run folder.

The order is the run's RNG order (the initial weights come from `train.seed` after the loaders exist,
everything random after that from a per-rank stream), and the checkpoint is restored only once every
component that holds state exists. Checks that need the machine, the world size or the data are made
here, once, before anything is written.
"""
from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import rundir
from ..attacks import Adversary, RobustEval, default_alpha
from ..config import Adversarial, Config, ConfigError, EvalAttack, NonFinite, Normalization, Precision, to_dict
from ..data import sizes
from ..data.augment import derive_seed
from ..data.loader import Feed, TestData, TrainData, check_partition
from ..data.manifest import Betons
from ..data.mix import Mixer, no_mix
from ..data.split import split_indices
from ..distributed import DistEnv, StopRequest
from ..models import build_model, check_input, files, freeze, regularize, to_device, with_input
from ..optim import EMA, Lookahead, build_optimizer, build_scheduler
from ..precision import Amp
from ..tracking import check_installed
from .comm import NoHook, comm_hook
from .evaluation import Evaluator, NoRobustnessCheck, RobustnessCheck
from .monitor import Monitor
from .report import Clock, Report
from .state import (Checkpointer, Keyed, ModelWeights, RollbackOnNonFinite, RunState, StopOnNonFinite,
                    agreed_checkpoint, find_resume_point)
from .step import (DynamicLossScale, EMAHook, FixedLossScale, LookaheadHook, NoLossScale, Step, StepSeed, no_attack,
                   unseeded)
from .warmup import TrainMode, WarmUp, WhitenBias, example_batch, no_warm_up

WHITENING_IMAGES = 5000  # train images that fit a model's data-dependent first layer (fastnet)


def runtime_checks(cfg: Config, env: DistEnv) -> Amp:
    """What the config asks of this machine and world size; the precision to run in."""
    t, cuda = cfg.train, env.device.type == "cuda"
    amp = Amp.on(t.precision, env.device)
    check_installed(cfg)
    if t.loss_scale and amp.precision != Precision.fp16:
        raise ConfigError(f"train.loss_scale={t.loss_scale:g} is for train.precision=fp16 "
                          f"(it is {amp.precision.value})")
    if t.batch_size % (env.world_size * t.accum_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} (global) does not divide by the world size "
                          f"{env.world_size} x train.accum_steps {t.accum_steps}; use a multiple of "
                          f"{env.world_size * t.accum_steps}")
    mixing = cfg.data.mixup_alpha or cfg.data.cutmix_alpha
    if mixing and t.batch_size // (env.world_size * t.accum_steps) % 2:
        raise ConfigError(f"Mixup/CutMix mixes each image with its neighbour, so every micro-batch must be even; "
                          f"train.batch_size={t.batch_size} over {env.world_size} ranks x train.accum_steps "
                          f"{t.accum_steps} gives {t.batch_size // (env.world_size * t.accum_steps)}: use a multiple "
                          f"of {2 * env.world_size * t.accum_steps}")
    if cfg.model.sync_bn and env.distributed and not cuda:
        raise ConfigError("model.sync_bn=true needs GPUs (torch has no CPU SyncBatchNorm); "
                          "on CPU use model.norm=group for batch-independent normalisation")
    if t.deterministic:  # cuBLAS is deterministic only with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not t.deterministic
    return amp


def data_checks(cfg: Config, env: DistEnv, betons: Betons, train_count: int, val_count: int) -> None:
    """What the config asks of this data: images the model takes, batches that fit, ranks with images."""
    sizes.check(cfg.data, betons)
    train_hw = sizes.shapes(cfg.data, betons)[0]
    size = (cfg.data.resize,) * 2 if cfg.data.resize else train_hw
    try:
        check_input(cfg.model.name, *size, f"data.dir={cfg.data.dir}" +
                    (f" with data.resize={cfg.data.resize}" if cfg.data.resize else ""))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    b, world = cfg.train.batch_size, env.world_size
    if train_count < b:
        raise ConfigError(f"the global batch of {b} is larger than the {train_count} train images, so an epoch "
                          f"would have no step; lower train.batch_size (each of {world} ranks would take {b // world})")
    side, translate = min(train_hw), round(cfg.data.translate * min(train_hw) / 32)
    if cfg.data.crop.value == "translate" and cfg.data.translate_pad.value == "reflect" and translate >= side:
        raise ConfigError(f"data.translate_pad=reflect needs a translation below the image side ({side} px); "
                          f"data.translate={cfg.data.translate} gives {translate} px")
    check_partition(world, betons.count("test"), "test")
    check_partition(world, val_count, "validation")


def pretrained_weights(cfg: Config, resume: tuple[Path, dict] | None) -> files.ModelFile | None:
    """The weights a fresh run starts from (model.pretrained); a resumed run takes its checkpoint's."""
    m = cfg.model
    if resume is not None or not m.pretrained:
        return None
    return files.torchvision_weights(m.name) if m.pretrained == "torchvision" else files.read(m.pretrained)


def normalization(cfg: Config, betons: Betons, pretrained: files.ModelFile | None,
                  resume: tuple[Path, dict] | None) -> tuple[list[float], list[float]]:
    """The inputs' mean/std (in [0, 1]): a resumed run keeps its own; `auto` follows the weights:
    ImageNet's for torchvision's pretrained weights on a tv_* model, the dataset's otherwise."""
    if resume is not None and resume[1].get("normalize"):
        n = resume[1]["normalize"]
        return n["mean"], n["std"]
    how = cfg.data.normalize
    if how == Normalization.auto:
        foreign = pretrained is not None and not pretrained.ours
        how = Normalization.imagenet if foreign and cfg.model.name.startswith("tv_") else Normalization.dataset
    if how == Normalization.imagenet:
        return files.IMAGENET_MEAN, files.IMAGENET_STD
    return betons.manifest["mean"], betons.manifest["std"]


def make_feed(cfg: Config, env: DistEnv, amp: Amp, mean: list[float], std: list[float]) -> Feed:
    """How the loaders hand batches over: in the AMP dtype (fp32 with data.fp32_input), on this rank."""
    return Feed(env.device, amp.input_dtype(cfg.data.fp32_input), cfg.model.channels_last, mean,
                std, env.rank, env.world_size, env.threads)


@dataclass
class Data:
    train: TrainData
    val: TestData | None
    test: TestData
    check: TestData | None  # adversarial training's collapse check: fixed train images
    split: dict | None  # the validation split, as split.json records it


def open_train(cfg: Config, env: DistEnv, betons: Betons, feed: Feed) -> tuple[TrainData, np.ndarray]:
    """The train loader (without the validation split, if one is held out) and the validation indices."""
    t = cfg.train
    d = cfg.data
    train_idx, val_idx = split_indices(betons, d.val_fraction, d.val_seed, d.folds, d.fold)
    data_checks(cfg, env, betons, betons.count("train") if train_idx is None else len(train_idx), len(val_idx))
    return TrainData(betons, cfg.data, feed, t.batch_size, t.seed, t.accum_steps, train_idx), val_idx


def train_data(cfg: Config, env: DistEnv) -> TrainData:
    """The train loader alone, as a run makes it (bench loader): no model, no run folder."""
    amp = runtime_checks(cfg, env)
    betons = Betons.open(cfg.data.dir, cfg.data.verify)
    return open_train(cfg, env, betons, make_feed(cfg, env, amp, *normalization(cfg, betons, None, None)))[0]


def build_data(cfg: Config, env: DistEnv, betons: Betons, feed: Feed) -> Data:
    t = cfg.train
    train, val_idx = open_train(cfg, env, betons, feed)
    train_idx = train.order.indices
    per_rank = t.batch_size // env.world_size
    val = TestData(betons, cfg.data, feed, per_rank, split="train", indices=val_idx) if len(val_idx) else None
    test = TestData(betons, cfg.data, feed, per_rank)
    check = None
    if t.adversarial != Adversarial.none and cfg.adv.check_images:
        every = np.arange(betons.count("train")) if train_idx is None else train_idx
        rng = np.random.default_rng([t.seed, 0xC4EC])
        picked = np.sort(rng.choice(every, min(cfg.adv.check_images, len(every)), replace=False))
        check = TestData(betons, cfg.data, feed, per_rank, split="train", indices=picked)
    split = None if val is None else {
        "val_fraction": cfg.data.val_fraction, "val_seed": cfg.data.val_seed,
        **({"folds": cfg.data.folds, "fold": cfg.data.fold} if cfg.data.folds else {}), "train_count": len(train.indices),
        "val_count": len(val_idx), "val_indices": val_idx.tolist()}
    return Data(train, val, test, check, split)


def total_steps(cfg: Config, per_epoch: int) -> int:
    """All epochs' steps, or train.max_steps, which must end the run inside its last epoch."""
    t = cfg.train
    if not t.max_steps:
        return per_epoch * t.epochs
    if not per_epoch * (t.epochs - 1) < t.max_steps <= per_epoch * t.epochs:
        raise ConfigError(f"train.max_steps={t.max_steps} must fall in the last of train.epochs={t.epochs} "
                          f"epochs of {per_epoch} steps: set train.epochs={math.ceil(t.max_steps / per_epoch)}")
    return t.max_steps


def model_chain(cfg: Config, env: DistEnv, betons: Betons, pretrained: files.ModelFile | None, train: TrainData,
                fresh: bool, report: Report, clock: Clock) -> tuple[nn.Module, dict | None]:
    """pretrained -> (SyncBN) -> freeze -> device, channels_last -> a data-dependent first layer's fit."""
    m = cfg.model
    model = build_model(m.name, len(betons.classes), m.width, m.norm.value, m.residual, m.blurpool)
    regularize(model, m.dropout, m.drop_path)
    loaded = None
    if pretrained is not None:
        loaded = files.load_pretrained(model, pretrained, betons.classes)
        report.say(f"pretrained: {loaded['loaded']} tensors from {loaded['source']} ({loaded['kind']}); head "
                   f"{loaded['head']}; {len(loaded['missing'])} missing, {len(loaded['unexpected'])} unexpected "
                   "(run.dir/pretrained.json)")
    if m.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = freeze(model, m.freeze)
    if frozen:
        report.say(f"frozen (no training, BatchNorm statistics kept): {', '.join(frozen)}")
    model = to_device(model, env.device, m.channels_last)
    fitted = pretrained is not None and "stem.weight" in pretrained.weights  # fine-tuning keeps a pretrained stem
    if hasattr(model, "init_from_data") and fresh and not fitted:  # same images on every rank: same weights
        t0 = time.perf_counter()
        model.init_from_data(train.sample_images(WHITENING_IMAGES))
        clock.sync()
        clock.init_time_s = time.perf_counter() - t0
    return model, loaded


def wrap(cfg: Config, env: DistEnv, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(forward: the model behind its input adapter (data.resize), compiled; ddp: what a batch goes through).
    broadcast_buffers=False: BatchNorm statistics are used only in evaluation, which broadcasts rank 0's
    first; DDP's default would broadcast them before every forward."""
    net = with_input(model, cfg.data.resize)
    if cfg.train.adversarial != Adversarial.none or cfg.train.eval_attack != EvalAttack.none:
        # an attack adds graphs of the one forward (an input that needs its gradient, in training and in
        # evaluation, each at the batch sizes of the splits): past dynamo's limit of 8 the forward would
        # silently run uncompiled
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(config, name, max(getattr(config, name), 16))
    # progressive resizing: a static graph per train side, each compiled in the warm-up (docs/resize_compile.py:
    # as fast as one dynamic graph or faster, and the dynamic one recompiled at a third side anyway)
    static = {"dynamic": False} if cfg.data.res_end else {}
    forward = torch.compile(net, mode=cfg.model.compile_mode.value, **static) if cfg.model.compile else net
    cuda = env.device.type == "cuda"
    ddp = (nn.parallel.DistributedDataParallel(forward, device_ids=[env.device] if cuda else None,
                                               **NO_BUFFER_SYNC) if env.distributed else forward)
    return forward, ddp


# DDP's buffer broadcast before every forward, off: torch 2.13 renamed `broadcast_buffers` (deprecated, with a
# warning at every start) to `forward_sync_buffers`. The new one still syncs the buffers once at init, which
# changes nothing here: every rank builds the same BatchNorm buffers from the seed, or loads the same checkpoint.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                  inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
                  else {"broadcast_buffers": False})


def attacks(cfg: Config, env: DistEnv, mean: list[float], std: list[float], scale) -> tuple:
    """(the training attack, the test-time attack, the collapse check's attack); no_attack / None where off."""
    a, t, dev = cfg.adv, cfg.train, env.device
    adversary, check = no_attack, None
    if t.adversarial != Adversarial.none:
        kind = t.adversarial.value
        adversary = Adversary(kind, a.eps, a.alpha or default_alpha(kind, a.eps, a.steps), a.steps,
                              a.init.value == "random", mean, std, dev, t.seed, env.rank, env.world_size,
                              t.batch_size, scale)
        check = RobustEval(a.eps, a.eval_alpha, a.check_steps, 1, mean, std, dev, env.rank, t.seed)
    robust = (RobustEval(a.eps, a.eval_alpha, a.eval_steps, a.eval_restarts, mean, std, dev, env.rank, t.seed)
              if t.eval_attack != EvalAttack.none else None)
    return adversary, robust, check


def loss_scale(cfg: Config, amp: Amp):
    if amp.precision != Precision.fp16:
        return NoLossScale()
    return FixedLossScale(cfg.train.loss_scale) if cfg.train.loss_scale else DynamicLossScale(amp.device)


@dataclass
class Components:
    """What `build` hands the trainer."""

    model: nn.Module  # unwrapped: checkpoints hold its state_dict
    data: TrainData
    step: Step
    state: RunState
    evaluator: Evaluator
    checkpointer: Checkpointer
    report: Report
    clock: Clock
    nonfinite: StopOnNonFinite
    stop: StopRequest
    warmup: object
    hooks: list
    classes: list[str]


def optimisation(cfg: Config, env: DistEnv, amp: Amp, model: nn.Module, forward: nn.Module, ddp: nn.Module,
                 state: RunState, mean: list[float], std: list[float], report: Report):
    """The step (SGD, its schedule and loss scale, the adversary, EMA and lookahead); the EMA (or None) and
    the attacks of evaluation (the test-time one, the collapse check's), for the evaluator."""
    o, t = cfg.optim, cfg.train
    optimizer = build_optimizer(model, o)
    scheduler = build_scheduler(optimizer, o, state.steps_per_epoch, t.epochs, state.total_steps)
    scale = loss_scale(cfg, amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    ema = EMA(model, t.ema_decay) if t.ema else None  # weights and BN buffers, every optimizer step
    hooks = [EMAHook(ema, report.say)] if ema is not None else []
    if o.lookahead_every:
        hooks.append(LookaheadHook(Lookahead(model, o.lookahead_decay, o.lookahead_every, state.total_steps),
                                   state.total_steps))
    adversary, robust, check = attacks(cfg, env, mean, std, scale.scale)
    seed = StepSeed(t.seed, env.rank) if cfg.model.dropout or cfg.model.drop_path else unseeded
    d = cfg.data
    mix = (Mixer(d.mixup_alpha, d.cutmix_alpha, d.mix_prob, d.switch_prob, t.seed)
           if d.mixup_alpha or d.cutmix_alpha else no_mix)
    step = Step(ddp, forward, criterion, optimizer, scheduler, scale, adversary, hooks, amp, env.distributed, seed, mix)
    return step, ema, robust, check


def nonfinite_policy(cfg: Config, env: DistEnv, state: RunState, step: Step, report: Report) -> StopOnNonFinite:
    if cfg.train.nonfinite == NonFinite.rollback:
        return RollbackOnNonFinite(state, step.scheduler, step.optimizer, cfg.train.max_rollbacks,
                                   lambda: agreed_checkpoint(Path(cfg.run.dir), env, report.say), report.say)
    return StopOnNonFinite(state, step.scheduler)


def evaluation(cfg: Config, amp: Amp, model: nn.Module, forward: nn.Module, ema: EMA | None, data: Data,
               robust: RobustEval | None, check_attack: RobustEval | None, report: Report) -> Evaluator:
    """The evaluations after an epoch: the model's, the EMA's copy, robust accuracy, the collapse check."""
    t = cfg.train
    check = (RobustnessCheck(forward, model, data.check, check_attack, amp, report.say) if data.check is not None
             else NoRobustnessCheck())
    averages = [("ema", with_input(ema.module, cfg.data.resize))] if ema is not None else []
    buffers = [model] + ([ema.module] if ema is not None else [])
    return Evaluator(forward, buffers, averages, data.val, data.test, amp, t.tta, robust, check, t.epochs,
                     t.eval_every, t.eval_test_every, cfg.adv.eval_every, Monitor.from_config(cfg, data.val is not None))


def checkpointer(cfg: Config, env: DistEnv, betons: Betons, mean: list[float], std: list[float], model: nn.Module,
                 step: Step, state: RunState, evaluator: Evaluator, nonfinite: StopOnNonFinite,
                 report: Report, hook: NoHook) -> Checkpointer:
    """The Checkpointer over every component that holds state, in restore order, and the run's facts."""
    meta = {"config": to_dict(cfg), "world_size": env.world_size, "data": betons.sha256, "classes": betons.classes,
            "normalize": {"mean": mean, "std": std},
            "image_shape": list(sizes.shapes(cfg.data, betons)[1])}  # the test side: evaluate, predict, export
    parts = [ModelWeights(model), Keyed("optimizer", step.optimizer), Keyed("scheduler", step.scheduler),
             step.loss_scale, *step.hooks, state, evaluator, nonfinite, evaluator.check, hook]
    return Checkpointer(Path(cfg.run.dir), cfg.train.keep_last, env.is_main, parts, meta, state, report.say,
                        cfg.train.checkpoint_every)


def epoch_hooks(cfg: Config, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer) -> list:
    return [TrainMode(forward)] + ([WhitenBias(model.stem, cfg.model.whiten_bias_epochs, optimizer)]
                                   if cfg.model.whiten_bias_epochs else [])


def build(cfg: Config, env: DistEnv) -> Components:
    """Every component of the run, in the run's RNG order, with the checkpoint restored (or the run folder
    started) last. Raises ConfigError, DataError or CheckpointError before anything is written."""
    report = Report(cfg, env)
    clock = Clock(env.device, report.say)
    amp = runtime_checks(cfg, env)
    betons = Betons.open(cfg.data.dir, cfg.data.verify)
    resume = find_resume_point(cfg, env, betons, report.say)  # the same on every rank, or a clear error
    pretrained = pretrained_weights(cfg, resume)
    mean, std = normalization(cfg, betons, pretrained, resume)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    feed = make_feed(cfg, env, amp, mean, std)
    data = build_data(cfg, env, betons, feed)
    state = RunState(len(data.train), cfg.train.epochs, total_steps(cfg, len(data.train)))
    model, loaded = model_chain(cfg, env, betons, pretrained, data.train, resume is None, report, clock)
    forward, ddp = wrap(cfg, env, model)
    hook = comm_hook(cfg, env, ddp, report.say)  # train.comm_hook: before the first step
    torch.manual_seed(derive_seed(cfg.train.seed, env.rank))  # per-rank stream for anything random after init
    step, ema, robust, check_attack = optimisation(cfg, env, amp, model, forward, ddp, state, mean, std, report)
    evaluator = evaluation(cfg, amp, model, forward, ema, data, robust, check_attack, report)
    nonfinite = nonfinite_policy(cfg, env, state, step, report)
    saver = checkpointer(cfg, env, betons, mean, std, model, step, state, evaluator, nonfinite, report, hook)
    hooks, t = epoch_hooks(cfg, model, forward, step.optimizer), cfg.train
    eval_sizes = sorted({n for d in (data.val, data.test, data.check) if d is not None for n in d.batch_sizes()})
    warmup = (WarmUp(t.warmup_steps, step, forward, hooks, saver, clock, example_batch(cfg, env, betons, feed),
                     t.accum_steps, amp, t.tta, report.say, eval_sizes, [a for a in (robust, check_attack) if a],
                     sizes.train_sides(cfg.data, t.epochs) if cfg.data.res_end else [])
              if t.warmup_steps else no_warm_up)
    stop = StopRequest(Path(cfg.run.dir) / rundir.STOP)
    start(cfg, resume, saver, nonfinite, report, loaded, data.split, state)
    return Components(model, data.train, step, state, evaluator, saver, report, clock, nonfinite, stop, warmup,
                      hooks, betons.classes)


def start(cfg: Config, resume: tuple[Path, dict] | None, checkpointer: Checkpointer, nonfinite: StopOnNonFinite,
          report: Report, pretrained: dict | None, split: dict | None, state: RunState) -> None:
    """Now that every component exists: the checkpoint restored into them (or a fresh run begun), then
    rank 0's run folder."""
    if resume is not None:
        checkpointer.restore(*resume)
    else:
        nonfinite.begin(checkpointer)
    if cfg.train.resume and resume is None:
        report.say(f"train.resume=true but {cfg.run.dir} holds no checkpoint yet: starting from scratch")
    report.open(pretrained, split, state.step if resume is not None else None)
