"""Every component of a training run, built from the config once, in one order:

    the checks (engine.plan) -> seed -> loaders -> model chain -> per-rank seed -> optimisation, step,
    evaluation -> state restored -> run folder.

The order is the run's RNG order (the initial weights come from `train.seed` after the loaders exist,
everything random after that from a per-rank stream), and the checkpoint is restored only once every
component that holds state exists. Every check that needs the machine, the world size or the data is made
first, by `engine.plan.plan` (which `--check` runs too), before anything is built or written.
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import rundir
from ..attacks import Adversary, RobustEval, default_alpha
from ..config import Adversarial, Config, EvalAttack, NonFinite, Precision, load_config, to_dict
from ..data import sizes
from ..data.augment import derive_seed
from ..data.loader import Feed, TestData, TrainData
from ..data.manifest import Betons
from ..data.mix import Mixer, no_mix
from ..distributed import DistEnv, StopRequest
from ..models import files, freeze, to_device, with_input
from ..optim import EMA, Lookahead, build_optimizer, build_scheduler
from ..precision import Amp
from ..trained import placed
from .comm import NoHook, comm_hook
from .distill import NoTeacher, Teacher, no_distill
from .evaluation import Evaluator, NoRobustnessCheck, RobustnessCheck
from .monitor import Monitor
from .plan import Plan, built, plan
from .report import Clock, Report
from .state import Checkpointer, Keyed, ModelWeights, RollbackOnNonFinite, RunState, StopOnNonFinite, agreed_checkpoint
from .step import (DynamicLossScale, EMAHook, FixedLossScale, LookaheadHook, NoLossScale, Step, StepSeed, no_attack,
                   unseeded)
from .warmup import TrainMode, TrainSide, WarmUp, WhitenBias, example_batch, no_warm_up

WHITENING_IMAGES = 5000  # train images that fit a model's data-dependent first layer (fastnet)


def runtime_setup(cfg: Config) -> None:
    """Settings of torch for the whole process, once the checks have passed."""
    if cfg.train.deterministic:  # cuBLAS is deterministic only with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic


def make_feed(cfg: Config, env: DistEnv, p: Plan) -> Feed:
    """How the loaders hand batches over: in the AMP dtype (fp32 with data.fp32_input), in the run's memory
    format, on this rank."""
    return Feed(env.device, p.amp.input_dtype(cfg.data.fp32_input), p.channels_last, p.mean, p.std, env.rank,
                env.world_size, env.threads)


@dataclass
class Data:
    train: TrainData
    val: TestData | None
    test: TestData
    check: TestData | None  # adversarial training's collapse check: fixed train images
    split: dict | None  # the validation split, as split.json records it


def train_data(cfg: Config, env: DistEnv) -> TrainData:
    """The train loader alone, as a run makes it (bench loader): no model, no run folder."""
    p = plan(cfg, env, lambda *a: None)
    t = cfg.train
    return TrainData(p.betons, cfg.data, make_feed(cfg, env, p), t.batch_size, t.seed, t.accum_steps, p.train_idx)


def build_data(cfg: Config, env: DistEnv, p: Plan, feed: Feed) -> Data:
    t, betons, val_idx = cfg.train, p.betons, p.val_idx
    train = TrainData(betons, cfg.data, feed, t.batch_size, t.seed, t.accum_steps, p.train_idx)
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


def model_chain(cfg: Config, env: DistEnv, p: Plan, train: TrainData, report: Report,
                clock: Clock) -> tuple[nn.Module, dict | None]:
    """pretrained -> (SyncBN) -> freeze -> device, channels_last -> a data-dependent first layer's fit."""
    m, betons, pretrained, fresh = cfg.model, p.betons, p.pretrained, p.resume is None
    model = built(cfg, len(betons.classes), p.widths)  # a pruned model in its own widths
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
    model = to_device(model, env.device, p.channels_last)
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


def teacher(cfg: Config, env: DistEnv, p: Plan) -> Teacher | NoTeacher:
    """distill.teacher as the run uses it: placed as it trained (memory format, input resize), compiled with
    the run's compile settings; or no teacher."""
    if p.teacher is None:
        return NoTeacher()
    trained = load_config(None, [], base=p.teacher.config)
    net, _ = placed(p.teacher, trained, trained, len(p.betons.classes), env.device)
    net = net.eval().requires_grad_(False)
    net = torch.compile(net, mode=cfg.model.compile_mode.value) if cfg.model.compile else net
    return Teacher(p.teacher, net, p.mean, p.std, cfg.distill.alpha, cfg.distill.temperature, env.device)


def optimisation(cfg: Config, env: DistEnv, amp: Amp, model: nn.Module, forward: nn.Module, ddp: nn.Module,
                 state: RunState, mean: list[float], std: list[float], report: Report, distill=no_distill):
    """The step (SGD or Muon, its schedule and loss scale, the adversary, EMA and lookahead); the EMA (or None) and
    the attacks of evaluation (the test-time one, the collapse check's), for the evaluator."""
    o, t = cfg.optim, cfg.train
    optimizer = build_optimizer(model, o, torch.distributed.group.WORLD if env.distributed else None)
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
    step = Step(ddp, forward, criterion, optimizer, scheduler, scale, adversary, hooks, amp, env.distributed, seed, mix,
                distill)
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
             step.loss_scale, *step.hooks, state, evaluator, nonfinite, evaluator.check, hook, step.distill]
    return Checkpointer(Path(cfg.run.dir), cfg.train.keep_last, env.is_main, parts, meta, state, report.say,
                        cfg.train.checkpoint_every)


def epoch_hooks(cfg: Config, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
                say) -> list:
    return ([TrainMode(forward)] + ([WhitenBias(model.stem, cfg.model.whiten_bias_epochs, optimizer)]
                                    if cfg.model.whiten_bias_epochs else [])
            + ([TrainSide(cfg.data, say)] if cfg.data.res_end else []))


def build(cfg: Config, env: DistEnv) -> Components:
    """Every component of the run, in the run's RNG order, with the checkpoint restored (or the run folder
    started) last. Raises ConfigError, DataError or CheckpointError before anything is written."""
    report = Report(cfg, env)
    clock = Clock(env.device, report.say)
    p = plan(cfg, env, report.say)  # every check, before anything is built: what --check runs
    runtime_setup(cfg)
    amp, betons, resume, mean, std = p.amp, p.betons, p.resume, p.mean, p.std
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    feed = make_feed(cfg, env, p)
    data = build_data(cfg, env, p, feed)
    state = RunState(p.steps_per_epoch, cfg.train.epochs, p.total_steps,
                     {"precision": amp.precision.value, "why": amp.why})
    model, loaded = model_chain(cfg, env, p, data.train, report, clock)
    forward, ddp = wrap(cfg, env, model)
    hook = comm_hook(cfg, env, ddp, report.say)  # train.comm_hook: before the first step
    torch.manual_seed(derive_seed(cfg.train.seed, env.rank))  # per-rank stream for anything random after init
    step, ema, robust, check_attack = optimisation(cfg, env, amp, model, forward, ddp, state, mean, std, report,
                                                   teacher(cfg, env, p))
    evaluator = evaluation(cfg, amp, model, forward, ema, data, robust, check_attack, report)
    nonfinite = nonfinite_policy(cfg, env, state, step, report)
    saver = checkpointer(cfg, env, betons, mean, std, model, step, state, evaluator, nonfinite, report, hook)
    hooks, t = epoch_hooks(cfg, model, forward, step.optimizer, report.say), cfg.train
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
