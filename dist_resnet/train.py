"""Train a CIFAR ResNet from FFCV betons; one code path for 1..N processes.

    python -m dist_resnet.train --config configs/resnet18.yaml data.dir=data/cifar10 run.dir=runs/r18
    torchrun --nproc_per_node=4 -m dist_resnet.train --config configs/resnet18.yaml data.dir=... run.dir=...

Reads top to bottom: beton -> loader -> model -> step -> metrics -> checkpoint.
`train.batch_size` is the GLOBAL batch; each of the N ranks takes batch_size / N.
"""
from __future__ import annotations

import io
import math
import os
import sys
import time
from contextlib import closing, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import attacks, checkpoint, distributed
from .checkpoint import CheckpointError, load_latest, unwrap
from .config import (TTA, Adversarial, Config, ConfigError, NonFinite, Normalization, Precision, load_config,
                     parse_args, resume_changes, to_dict, to_yaml)
from .data.augment import derive_seed
from .data.loader import DataError, TestData, TrainData, check_betons, image_shape, read_manifest, split_indices
from .distributed import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STOPPED, DistEnv, JobExit, StopRequest, all_reduce_sum,
                          broadcast_buffers, spread)
from .faults import fault_point
from .fileio import clean_stale_tmp, write_json, write_text
from .models import Resized, build_model, check_input, files, freeze, load_weights
from .optim import EMA, Lookahead, build_optimizer, build_scheduler

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16, Precision.fp32: torch.float32}


def resolve_precision(precision: Precision, cuda: bool) -> Precision:
    """`auto` is bf16 on GPU and fp32 on CPU."""
    return precision if precision != Precision.auto else (Precision.bf16 if cuda else Precision.fp32)


WHITENING_IMAGES = 5000  # train images that fit a model's data-dependent first layer (fastnet)


class Diverged(JobExit):
    """A non-finite training loss, seen at a log or epoch-end sync; `steps` brackets where it appeared."""

    def __init__(self, message: str, steps: tuple[int, int]):
        super().__init__(EXIT_DIVERGED, message, agreed=True)  # from all-reduced loss sums
        self.steps = steps


def fp16_step_skipped(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the dynamic loss scale skips this step (inf/NaN gradients). Reads the flags that
    `unscale_` left; this host read is the one sync per step that fp16 costs (bf16 has none)."""
    found = scaler._found_inf_per_device(optimizer)  # torch's own record, as GradScaler.step reads it
    return bool(sum(v.item() for v in found.values()))


class Trainer:
    """Construction order: validate, agree on the resume point, data, model, optimisation, and only
    then restore the checkpoint into the objects that now all exist."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.created = time.perf_counter()
        self.cfg, self.env, self.device = cfg, env, env.device
        self.run_dir = Path(cfg.run.dir)
        cuda = self.device.type == "cuda"
        t = cfg.train
        precision = resolve_precision(t.precision, cuda)
        if precision == Precision.bf16 and cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16 but this GPU has no bf16; use train.precision=fp16")
        self.precision, self.amp_dtype = precision, DTYPES[precision]
        self.data_dtype = torch.float32 if cfg.data.fp32_input else self.amp_dtype  # what the loader hands over
        if t.loss_scale and precision != Precision.fp16:
            raise ConfigError(f"train.loss_scale={t.loss_scale:g} is for train.precision=fp16 "
                              f"(it is {precision.value})")
        if t.batch_size % (env.world_size * t.accum_steps):
            raise ConfigError(
                f"train.batch_size={t.batch_size} (global) does not divide by the world size {env.world_size} x "
                f"train.accum_steps {t.accum_steps}; use a multiple of {env.world_size * t.accum_steps}"
            )
        if cfg.model.sync_bn and env.distributed and not cuda:
            raise ConfigError("model.sync_bn=true needs GPUs (torch has no CPU SyncBatchNorm); "
                              "on CPU use model.norm=group for batch-independent normalisation")
        self.batch_per_rank = t.batch_size // env.world_size
        if t.deterministic:  # cuBLAS is deterministic only with a fixed workspace, set before its first use
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = not t.deterministic
        self.manifest = read_manifest(cfg.data.dir)
        check_betons(cfg.data.dir, self.manifest, hashes=cfg.data.verify)

        # ---- the resume point, the same on every rank (or a clear error), checked against this config
        resume = self.find_resume_point()

        # ---- what the model sees: the image size, the normalisation, pretrained weights (a fresh run)
        self.image_shape = image_shape(self.manifest)
        size = (cfg.data.resize,) * 2 if cfg.data.resize else self.image_shape
        try:
            check_input(cfg.model.name, *size, f"data.dir={cfg.data.dir}" +
                        (f" with data.resize={cfg.data.resize}" if cfg.data.resize else ""))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.pretrained = None if resume is not None or not cfg.model.pretrained else (
            files.torchvision_weights(cfg.model.name) if cfg.model.pretrained == "torchvision"
            else files.read(cfg.model.pretrained))
        self.mean, self.std = self.normalization(resume)

        # ---- beton -> loader
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        cl = cfg.model.channels_last
        threads = max(1, (os.cpu_count() or 1) // env.local_world_size)  # FFCV would set its worker count
        train_idx, self.val_idx = split_indices(cfg.data)  # data.val_fraction: held out of the train split
        self.train_data = TrainData(cfg.data, t.batch_size, t.seed, self.device, self.data_dtype, cl,
                                    env.rank, env.world_size, t.accum_steps, threads, self.mean, self.std, train_idx)
        evaluation = (cfg.data, self.batch_per_rank, self.device, self.data_dtype, cl, env.rank, env.world_size,
                      threads, self.mean, self.std)
        self.val_data = TestData(*evaluation, split="train", indices=self.val_idx) if len(self.val_idx) else None
        self.test_data = TestData(*evaluation)
        self.check_data = None  # adversarial training: fixed train images PGD-attacked every epoch (collapse check)
        if t.adversarial != Adversarial.none and cfg.adv.check_images:
            every = np.arange(self.manifest["train"]["count"]) if train_idx is None else train_idx
            rng = np.random.default_rng([t.seed, 0xC4EC])
            self.check_data = TestData(*evaluation, split="train", indices=np.sort(
                rng.choice(every, min(cfg.adv.check_images, len(every)), replace=False)))
        self.total_steps = len(self.train_data) * t.epochs
        if t.max_steps:  # the run ends inside its last epoch
            per = len(self.train_data)
            if not per * (t.epochs - 1) < t.max_steps <= self.total_steps:
                raise ConfigError(f"train.max_steps={t.max_steps} must fall in the last of train.epochs={t.epochs} "
                                  f"epochs of {per} steps: set train.epochs={math.ceil(t.max_steps / per)}")
            self.total_steps = t.max_steps

        # ---- model: pretrained -> (SyncBN) -> freeze -> channels_last -> (resize) -> compile -> DDP
        model = build_model(cfg.model.name, len(self.manifest["classes"]), cfg.model.width, cfg.model.norm.value,
                            cfg.model.residual)
        self.pretrained_report = None
        if self.pretrained is not None:
            self.pretrained_report = files.load_pretrained(model, self.pretrained, self.manifest["classes"])
            r = self.pretrained_report
            self.print(f"pretrained: {r['loaded']} tensors from {r['source']} ({r['kind']}); head {r['head']}; "
                       f"{len(r['missing'])} missing, {len(r['unexpected'])} unexpected (run.dir/pretrained.json)")
        if cfg.model.sync_bn and env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        frozen = freeze(model, cfg.model.freeze)
        if frozen:
            self.print(f"frozen (no training, BatchNorm statistics kept): {', '.join(frozen)}")
        model = model.to(self.device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        self.init_time_s = 0.0  # a data-dependent first layer's fit (fastnet's whitening): part of the timed run
        if hasattr(model, "init_from_data") and resume is None:  # same images on every rank: same weights
            t0 = time.perf_counter()
            model.init_from_data(self.train_data.sample_images(WHITENING_IMAGES))
            self.sync()
            self.init_time_s = time.perf_counter() - t0
        self.model = model  # the unwrapped module: checkpoints hold its state_dict
        self.net = self.with_input(model)  # what a batch goes through
        self.forward = torch.compile(self.net, mode=cfg.model.compile_mode.value) if cfg.model.compile else self.net
        # broadcast_buffers=False: BatchNorm statistics are used only in evaluation, and evaluate() broadcasts
        # rank 0's first; DDP's default would broadcast them before every forward
        self.ddp = (nn.parallel.DistributedDataParallel(self.forward, device_ids=[self.device] if cuda else None,
                                                        broadcast_buffers=False)
                    if env.distributed else self.forward)
        torch.manual_seed(derive_seed(t.seed, env.rank))  # per-rank stream for anything random after init

        # ---- optimisation
        o = cfg.optim
        self.optimizer = build_optimizer(model, o)
        self.scheduler = build_scheduler(self.optimizer, o, len(self.train_data), t.epochs, self.total_steps)
        # fp16: a dynamic loss scale (GradScaler: skips inf steps, one host sync per step), or a fixed one
        self.loss_scale = t.loss_scale if precision == Precision.fp16 else 0.0
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == Precision.fp16 and not t.loss_scale)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
        self.ema = EMA(model, t.ema_decay) if t.ema else None  # weights and BN buffers, every optimizer step
        self.lookahead = Lookahead(model, o.lookahead_decay, o.lookahead_every, self.total_steps) \
            if o.lookahead_every else None
        # adversarial training (train.adversarial) and robust evaluation (train.eval_attack): see attacks.py
        self.adversary, self.robust_eval, self.check_attack = attacks.from_config(
            cfg, self.mean, self.std, self.device, env.rank, env.world_size, self.scale)

        # ---- run state, then the checkpoint into the objects that now all exist
        self.epoch, self.step, self.best_acc, self.history = 0, 0, -1.0, []
        self.best_robust, self.collapses = -1.0, []  # adversarial training: the PGD check's best, its collapses
        self.position: dict | None = None  # where a stopped epoch left off (mid-epoch resume)
        self.rollbacks: list[dict] = []  # train.nonfinite=rollback: what was rolled back, and to where
        self.checked_step = 0  # the last step known to have a finite loss
        self.first_step_s: float | None = None  # process setup + first step (compile, numba, cudnn autotune)
        self.warmup_s: float | None = None  # train.warmup_steps: compile and autotune before the timed run
        self.failure: dict | None = None
        self.confusion: list[list[int]] | None = None  # of the last evaluation
        self.stop = StopRequest(self.run_dir / "STOP")
        self.initial_state: bytes | None = None  # train.nonfinite=rollback before the first checkpoint
        if resume is not None:
            self.restore(*resume)
        elif t.nonfinite == NonFinite.rollback:
            buf = io.BytesIO()
            torch.save(self.state_dict(), buf)
            self.initial_state = buf.getvalue()
        if t.resume and resume is None:
            self.print(f"train.resume=true but {self.run_dir} holds no checkpoint yet: starting from scratch")

        self.tb = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            for p in clean_stale_tmp(self.run_dir):
                self.print(f"removed {p.name}, left by a writer that was killed")
            write_text(self.run_dir / "config.yaml", to_yaml(cfg))
            if self.pretrained_report is not None:
                write_json(self.run_dir / "pretrained.json", self.pretrained_report)
            if self.val_data is not None:  # the split, stored with the run
                write_json(self.run_dir / "split.json", {
                    "val_fraction": cfg.data.val_fraction, "val_seed": cfg.data.val_seed,
                    "train_count": len(self.train_data.indices), "val_count": len(self.val_idx),
                    "val_indices": self.val_idx.tolist()})
            self.tb = SummaryWriter(str(self.run_dir))

    def print(self, *args) -> None:
        if self.env.is_main:
            print(*args, flush=True)

    def memory(self) -> dict:
        """The GPU memory high-water mark (allocator statistics: no sync); nothing on CPU."""
        if self.device.type != "cuda":
            return {}
        return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def with_input(self, net: nn.Module) -> nn.Module:
        """`net` behind the input adapter (`data.resize`), for the model and its EMA alike."""
        return Resized(net, self.cfg.data.resize) if self.cfg.data.resize else net

    def normalization(self, resume: tuple[Path, dict] | None) -> tuple[list[float], list[float]]:
        """The inputs' mean/std (in [0, 1]): a resumed run keeps its own; `auto` follows the weights:
        ImageNet's for torchvision's pretrained weights on a tv_* model, the dataset's otherwise."""
        if resume is not None and resume[1].get("normalize"):
            n = resume[1]["normalize"]
            return n["mean"], n["std"]
        how = self.cfg.data.normalize
        if how == Normalization.auto:
            foreign = self.pretrained is not None and not self.pretrained.ours
            how = Normalization.imagenet if foreign and self.cfg.model.name.startswith("tv_") else Normalization.dataset
        if how == Normalization.imagenet:
            return files.IMAGENET_MEAN, files.IMAGENET_STD
        return self.manifest["mean"], self.manifest["std"]

    # ---------------------------------------------------------------- resume point
    def agreed_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest checkpoint in run.dir that loads, found by every rank alike (ranks that see
        different files, e.g. a run.dir that is not shared between nodes, are a clear error)."""
        found = load_latest(self.run_dir) if self.run_dir.is_dir() else None
        if found is not None:
            for note in found[2]:
                self.print(f"warning: {note}; falling back to an older checkpoint")
        mark = [-1.0, -1.0] if found is None else [float(found[1]["epoch"]), float(found[1]["step"])]
        lo, hi = spread(mark, self.env.control_group)
        if lo != hi:
            raise ConfigError(
                f"the ranks see different checkpoints in run.dir={self.run_dir} (epoch, step from {lo} to {hi}; "
                "-1 = none): run.dir must be one folder that every node shares")
        return None if found is None else found[:2]

    def find_resume_point(self) -> tuple[Path, dict] | None:
        found = self.agreed_checkpoint()
        if found is None:
            return None
        path, state = found
        if not self.cfg.train.resume:
            raise ConfigError(f"{path} exists: pass train.resume=true to continue that run, or choose another run.dir")
        try:
            old = load_config(None, [], base=state["config"])
        except ConfigError as e:
            raise ConfigError(f"{path}'s config does not fit this version of dist_resnet: {e}") from None
        refused, numerics = resume_changes(old, self.cfg)
        data = state.get("data") or {}
        if any(data.get(s) not in (None, self.manifest[s]["sha256"]) for s in ("train", "test")):
            refused["data.dir (beton sha256)"] = (old.data.dir, self.cfg.data.dir)
        if refused:
            why = "; ".join(f"{k}: {a} -> {b}" for k, a, b in ((k, *v) for k, v in refused.items()))
            epochs = (" (train.epochs: the LR schedule is planned over the epochs a run starts with, so another "
                      "count would make the LR jump; to train longer, start a new run from these weights)"
                      if "train.epochs" in refused else "")
            raise ConfigError(
                f"cannot resume from {path}: these settings differ from the checkpoint's and would change the "
                f"run: {why}{epochs}. Use the checkpoint's values ({self.run_dir / 'config.yaml'}) or a new run.dir")
        if numerics:
            self.print("note: resuming with " + "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in numerics.items())
                       + ": the run continues, but no longer bit-identical to an uninterrupted one")
        if state.get("world_size", self.env.world_size) != self.env.world_size:
            self.print(f"note: resuming a run of {state['world_size']} ranks on {self.env.world_size}: the global "
                       "batch, sample order and augmentations are the same")
        return path, state

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        cfg = self.cfg.train
        if self.epoch >= cfg.epochs:
            self.print(f"{self.run_dir} already finished its {cfg.epochs} epochs: nothing to train")
            return self.finish()
        self.print(
            f"{self.cfg.model.name} on {self.device} x{self.env.world_size} ({self.precision.value}), "
            f"global batch {cfg.batch_size}, {len(self.train_data)} steps/epoch, epochs {self.epoch + 1}..{cfg.epochs}"
        )
        if cfg.warmup_steps:
            self.warm_up(cfg.warmup_steps)
        try:
            while self.epoch < cfg.epochs:
                try:
                    record = self.train_epoch(self.epoch)
                except Diverged as d:
                    if cfg.nonfinite == NonFinite.rollback and len(self.rollbacks) < cfg.max_rollbacks:
                        self.rollback(d)
                        continue
                    self.fail(d)
                if record is None:  # stop requested: the checkpoint holds the position inside the epoch
                    return self.finish(stopped=True)
                self.epoch += 1
                val, test = self.evaluations_due()
                if val or test:
                    t0 = time.perf_counter()
                    record.update(self.evaluate(val, test))
                    record["eval_time_s"] = time.perf_counter() - t0  # evaluate() ends in a host sync
                links = self.check_robustness(record)
                self.history.append(record)
                key = "val_acc" if self.val_data is not None else "test_acc"  # selection never sees test with val
                if record.get(key, -1.0) > self.best_acc:
                    links.append("best.pt")
                self.best_acc = max(self.best_acc, record.get(key, -1.0))
                self.log_epoch(record)
                self.save_checkpoint(tuple(links))
                if self.epoch < cfg.epochs and self.stop.agreed(self.env.control_group):
                    self.print(f"stopped ({self.stop.reason}) after epoch {self.epoch}; resume with train.resume=true")
                    return self.finish(stopped=True)
        except torch.cuda.OutOfMemoryError:
            raise JobExit(EXIT_BAD_INPUT, (
                f"error: CUDA out of memory with {self.batch_per_rank // cfg.accum_steps} images per rank and "
                f"micro-batch (train.batch_size={cfg.batch_size} over {self.env.world_size} ranks, "
                f"train.accum_steps={cfg.accum_steps}). Raise train.accum_steps to split each step into smaller "
                "micro-batches with the same result, or lower train.batch_size")) from None
        return self.finish()

    def warm_up(self, steps: int) -> None:
        """torch.compile, cuDNN autotuning and the loader's first-use costs, paid before the timed run as the
        record scripts do: `steps` training steps and an evaluation forward on throw-away data, after which
        the weights, buffers, optimizer, schedule, loss scale, EMA, lookahead and RNGs are restored exactly."""
        t0 = time.perf_counter()
        saved = io.BytesIO()
        torch.save(self.state_dict(), saved)
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        g = torch.Generator(device=self.device).manual_seed(0)
        micro = self.batch_per_rank // self.cfg.train.accum_steps
        fmt = torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format
        x = torch.randn((micro, 3, *self.image_shape), generator=g, device=self.device).to(
            self.data_dtype).contiguous(memory_format=fmt)  # as the loader gives them
        y = torch.randint(0, len(self.manifest["classes"]), (micro,), generator=g, device=self.device)
        self.forward.train()
        stem = self.model.stem if self.cfg.model.whiten_bias_epochs else None
        for i in range(steps):
            if stem is not None:  # both graphs of the whitening bias, trained and frozen, compile now
                stem.train_bias = i % 2 == 0
            self.train_step([(x, y)] * self.cfg.train.accum_steps)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                             enabled=self.precision != Precision.fp32):
            self.forward.eval()
            predict(self.forward, x, self.cfg.train.tta)
            self.forward.train()
        saved.seek(0)
        self.restore(Path("the warm-up's copy"), torch.load(saved, weights_only=True), quiet=True)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], self.device)
        self.sync()
        self.warmup_s = time.perf_counter() - t0
        self.print(f"warm-up: {steps} steps and an evaluation on throw-away data in {self.warmup_s:.1f}s "
                   "(compile, autotune), untimed; the state is restored")

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as backward takes it: scaled for fp16 (dynamically or by train.loss_scale)."""
        return loss * self.loss_scale if self.loss_scale else self.scaler.scale(loss)

    def train_epoch(self, epoch: int) -> dict | None:
        """One epoch from `self.position` (if resuming inside it); None if a stop was agreed."""
        self.forward.train()
        if self.cfg.model.whiten_bias_epochs:  # a forward flag, not requires_grad: no recompile
            self.model.stem.train_bias = epoch < self.cfg.model.whiten_bias_epochs
        pos, self.position = self.position or {"step": 0, "stats": [0.0, 0.0, 0.0], "elapsed": 0.0}, None
        # loss sum, correct, count; a resumed epoch's partial sums (over all ranks) restart on rank 0
        stats = torch.tensor(pos["stats"] if self.env.is_main else [0.0] * 3, dtype=torch.float64, device=self.device)
        window = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, count since last log
        bar = tqdm(total=len(self.train_data), initial=pos["step"], desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                   unit="step", disable=not (self.env.is_main and self.cfg.run.progress), leave=False, file=sys.stdout)
        self.sync()
        start = last_log = ready = time.perf_counter()
        waited, logged_step = 0.0, self.step  # host time spent waiting for the loader since the last log
        with closing(self.train_data.epoch(epoch, pos["step"])) as steps:
            for step, micro_batches in steps:
                waited += time.perf_counter() - ready
                step_stats = self.train_step(micro_batches)
                stats += step_stats  # a NaN/inf loss stays in these sums until the next sync reads them
                window += step_stats[0::2]  # loss sum, count (a view: no index tensor per step)
                self.step += 1
                fault_point("step")
                if self.first_step_s is None:
                    self.sync()
                    self.first_step_s = time.perf_counter() - self.created
                    self.print(f"first step after {self.first_step_s:.1f}s (setup, compile and warm-up)")
                bar.update(1)
                if self.step % self.cfg.train.log_every == 0:  # the only host sync inside the epoch
                    loss_sum, count = all_reduce_sum(window).tolist()
                    self.check_finite(loss_sum)
                    now = time.perf_counter()
                    self.log_scalars({"train/loss": loss_sum / count, "train/img_per_s": count / (now - last_log),
                                      "train/lr": self.scheduler.get_last_lr()[0],
                                      "time/step_ms": 1000 * (now - last_log) / (self.step - logged_step),
                                      "time/data_wait_pct": 100 * waited / (now - last_log), **self.memory()},
                                     self.step)
                    bar.set_postfix(loss=f"{loss_sum / count:.3f}")
                    window.zero_()
                    last_log, waited, logged_step = now, 0.0, self.step
                last = step + 1 == len(self.train_data) or self.step == self.total_steps
                if (step + 1) % self.cfg.train.stop_check_every == 0 and not last \
                        and self.stop.agreed(self.env.control_group):
                    self.sync()
                    bar.close()
                    totals = all_reduce_sum(stats.clone()).tolist()
                    self.check_finite(totals[0])  # never checkpoint a diverged state
                    self.position = {"step": step + 1, "stats": totals,
                                     "elapsed": pos["elapsed"] + time.perf_counter() - start}
                    self.save_checkpoint()
                    self.print(f"stopped ({self.stop.reason}) at epoch {epoch + 1} step {step + 1}/"
                               f"{len(self.train_data)}; resume with train.resume=true")
                    return None
                if self.step == self.total_steps:  # train.max_steps: the run ends inside this epoch
                    break
                ready = time.perf_counter()
        self.sync()
        elapsed = pos["elapsed"] + time.perf_counter() - start
        bar.close()
        loss_sum, correct, count = all_reduce_sum(stats).tolist()
        self.check_finite(loss_sum)
        return {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
                "epoch_time_s": elapsed, "img_per_s": count / elapsed, "lr": self.scheduler.get_last_lr()[0]}

    def check_finite(self, loss_sum: float) -> None:
        """Called with an all-reduced loss sum, so every rank decides alike, at a sync that happens anyway."""
        if math.isfinite(loss_sum):
            self.checked_step = self.step
            return
        steps = (self.checked_step + 1, self.step)
        raise Diverged(
            f"error: training diverged: the loss became NaN or inf between steps {steps[0]} and {steps[1]} "
            f"(epoch {self.epoch + 1}) at optim.lr={self.scheduler.base_lrs[0]:g}. Nothing diverged was saved; "
            f"lower optim.lr and start again, or set train.nonfinite=rollback", steps)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns [loss sum, correct, count] on the device."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.forward_backward(micro_batches)
        self.optimizer_step()
        return out

    def forward_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Accumulate the gradients of the step (all-reduced on the last micro-batch); [loss sum, correct, count]."""
        out = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self.ddp.no_sync() if self.env.distributed and not last else nullcontext():  # all-reduce once
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.precision != Precision.fp32):
                    if self.adversary is not None:  # its gradients are the input's only, through the module
                        x = self.adversary(self.forward, x, y, self.step, i)  # inside DDP: no all-reduce
                    logits = self.ddp(x)
                    loss = self.criterion(logits, y)
                self.scale(loss / len(micro_batches)).backward()
            n = y.numel()  # a host int: no host-to-device copy in the hot loop
            out[0] += loss.detach().double() * n
            out[1] += (logits.detach().argmax(1) == y).sum()
            out[2] += n
        return out

    def optimizer_step(self) -> None:
        """SGD, then the schedule, EMA and lookahead, which count applied steps only: an fp16 step that the
        loss scale skips (inf/NaN gradients) advances none of them."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            skipped = fp16_step_skipped(self.scaler, self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if skipped:
                return
        else:
            if self.loss_scale:  # fixed: unscale in place, no host sync; an inf shows in the loss check
                grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch._foreach_mul_(grads, 1.0 / self.loss_scale)
            self.optimizer.step()
        self.scheduler.step()
        applied = self.scheduler.last_epoch  # optimizer steps applied so far
        if self.ema is not None:
            self.ema.update(applied - 1)
        if self.lookahead is not None:
            self.lookahead.step(applied, final=self.step + 1 == self.total_steps)

    def evaluations_due(self) -> tuple[bool, bool]:
        """(validation, test) after the epoch just ended. Without a validation split the test set is
        evaluated every `eval_every` epochs; with one, validation is, and test at the end of the run and
        every `eval_test_every` epochs."""
        t, e = self.cfg.train, self.epoch
        last, due = e == t.epochs, e % t.eval_every == 0
        if self.val_data is None:
            return False, last or due
        return last or due, last or bool(t.eval_test_every and e % t.eval_test_every == 0)

    def evaluate(self, val: bool = False, test: bool = True) -> dict:
        for module in [self.model] + ([self.ema.module] if self.ema is not None else []):
            broadcast_buffers(module)
        amp = (self.amp_dtype, self.precision != Precision.fp32, self.cfg.train.tta)
        result = {}
        for name, data in (("val", self.val_data if val else None), ("test", self.test_data if test else None)):
            if data is None:
                continue
            r = evaluate(self.forward, data, self.device, *amp, prefix=name,
                         attack=self.robust_eval if name == "test" else None)
            confusion = r.pop("confusion")
            if name == "test":
                self.confusion = confusion  # kept for the end of the run, not in every epoch's record
            result.update(r)
            if self.ema is not None:
                ema = evaluate(self.with_input(self.ema.module), data, self.device, *amp, prefix=name)
                result.update({f"ema_{name}_loss": ema[f"{name}_loss"], f"ema_{name}_acc": ema[f"{name}_acc"]})
        return result

    def check_robustness(self, record: dict) -> list[str]:
        """Adversarial training: PGD on the fixed check images (train images, never test) after every
        epoch, as "Fast is better than free" does to catch catastrophic overfitting, when FGSM training
        collapses and robust accuracy falls to about 0 within an epoch. Returns the links to the new
        checkpoint: best_robust.pt at a new best."""
        if self.check_data is None:
            return []
        broadcast_buffers(self.model)  # every rank attacks with rank 0's BatchNorm statistics
        amp = (self.amp_dtype, self.precision != Precision.fp32)
        r = evaluate(self.forward, self.check_data, self.device, *amp, prefix="check", attack=self.check_attack)
        record.update({"check_acc": r["check_acc"], "check_robust_acc": r["check_robust_acc"]})
        acc, best = r["check_robust_acc"], self.best_robust
        if acc < best - 0.2:
            self.collapses.append({"epoch": self.epoch, "check_robust_acc": acc, "best": best})
            self.print(f"warning: catastrophic overfitting in epoch {self.epoch}: PGD accuracy on the "
                       f"{self.check_data.count} check images fell from {best:.3f} to {acc:.3f}. best_robust.pt keeps "
                       "the most robust epoch; lower adv.alpha, or use train.adversarial=pgd")
        self.best_robust = max(best, acc)
        return ["best_robust.pt"] if acc > best else []

    # ---------------------------------------------------------------- divergence
    def rollback(self, d: Diverged) -> None:
        """All ranks, in lockstep (they saw the same all-reduced loss): back to the newest good
        checkpoint (or the initial state), with half the learning rate."""
        done = self.rollbacks + [{"diverged_steps": list(d.steps)}]
        found = self.agreed_checkpoint()
        if found is not None:
            path, state = found
        else:
            path, state = Path("the initial state"), torch.load(io.BytesIO(self.initial_state), weights_only=True)
        self.restore(path, state, quiet=True)
        factor = 0.5 ** (len(done) - len(state.get("rollbacks", [])))
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        done[-1].update({"to_step": self.step, "lr": self.scheduler.base_lrs[0]})
        self.rollbacks, self.checked_step = done, self.step
        self.print(f"warning: the loss became NaN or inf between steps {d.steps[0]} and {d.steps[1]}: rolled back "
                   f"to {path} (step {self.step}) with optim.lr={self.scheduler.base_lrs[0]:g} "
                   f"(rollback {len(done)} of train.max_rollbacks={self.cfg.train.max_rollbacks})")

    def fail(self, d: Diverged) -> None:
        self.failure = {"kind": "nonfinite_loss", "steps": list(d.steps), "epoch": self.epoch + 1,
                        "rollbacks": len(self.rollbacks)}
        if self.env.is_main:
            self.write_metrics()
        self.finish(stopped=True)
        raise d

    # ---------------------------------------------------------------- metrics
    def log_scalars(self, scalars: dict, step: int) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def log_epoch(self, r: dict) -> None:
        scalars = {"train/epoch_loss": r["train_loss"], "train/acc": r["train_acc"], "time/epoch_s": r["epoch_time_s"],
                   "train/epoch_img_per_s": r["img_per_s"]}
        test = ""
        for name in ("val", "test"):
            if f"{name}_acc" in r:
                scalars.update({f"{name}/loss": r[f"{name}_loss"], f"{name}/acc": r[f"{name}_acc"]})
                test += f" {name} loss {r[f'{name}_loss']:.4f} acc {r[f'{name}_acc']:.4f}"
            if f"{name}_robust_acc" in r:
                scalars[f"{name}/robust_acc"] = r[f"{name}_robust_acc"]
                test += f" robust {r[f'{name}_robust_acc']:.4f}"
            if f"ema_{name}_acc" in r:
                scalars.update({f"{name}/ema_loss": r[f"ema_{name}_loss"], f"{name}/ema_acc": r[f"ema_{name}_acc"]})
                test += f" ema acc {r[f'ema_{name}_acc']:.4f}"
        if "check_robust_acc" in r:
            scalars.update({"check/acc": r["check_acc"], "check/robust_acc": r["check_robust_acc"]})
            test += f" check pgd {r['check_robust_acc']:.3f}"
        self.log_scalars(scalars, r["epoch"])
        self.print(f"epoch {r['epoch']:3d} train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f}{test} "
                   f"| {r['epoch_time_s']:.1f}s {r['img_per_s']:.0f} img/s")
        if self.env.is_main:
            self.write_metrics()

    def summary(self) -> dict:
        evals = [r for r in self.history if "test_acc" in r]
        vals = [r for r in self.history if "val_acc" in r]
        times = [r["epoch_time_s"] for r in self.history]
        return {
            "model": self.cfg.model.name, "world_size": self.env.world_size, "global_batch_size": self.cfg.train.batch_size,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "precision": self.precision.value, "epochs": len(self.history),
            "completed": len(self.history) == self.cfg.train.epochs,
            "stopped": False, "failure": self.failure, "rollbacks": self.rollbacks,
            "test_acc": evals[-1]["test_acc"] if evals else None,
            "test_count": evals[-1]["test_count"] if evals else None,
            "best_test_acc": max((r["test_acc"] for r in evals), default=None),
            "test_robust_acc": evals[-1].get("test_robust_acc") if evals else None,
            "robust_eval": self.robust_eval.describe() if self.robust_eval is not None else None,
            "best_check_robust_acc": self.best_robust if self.check_data is not None else None,
            "collapses": self.collapses,
            "val_acc": vals[-1]["val_acc"] if vals else None,
            "val_count": vals[-1]["val_count"] if vals else None,
            "best_val_acc": max((r["val_acc"] for r in vals), default=None),
            "train_time_s": sum(times),
            "first_epoch_s": times[0] if times else None,  # includes numba + torch.compile warm-up
            "first_step_s": self.first_step_s,  # from Trainer creation; None when resumed past all steps
            "warmup_s": self.warmup_s,  # train.warmup_steps: compile and autotune, outside train_time_s
            "init_time_s": self.init_time_s,  # a data-dependent first layer's fit (fastnet)
            # timed like the record scripts: training + the data-dependent init + the final evaluation
            "time_to_result_s": sum(times) + self.init_time_s + (self.history[-1].get("eval_time_s", 0.0)
                                                                 if self.history else 0.0),
            "eval_time_s": sum(r.get("eval_time_s", 0.0) for r in self.history),
            "steady_img_per_s": (sum(r["img_per_s"] for r in self.history[1:]) / (len(self.history) - 1)
                                 if len(self.history) > 1 else None),
            "history": self.history,
        }

    def write_metrics(self, **extra) -> None:
        write_json(self.run_dir / "metrics.json", {**self.summary(), **extra})

    def finish(self, stopped: bool = False) -> dict:
        """End the run on every rank: the stop request is handled (its file removed), files closed."""
        s = {**self.summary(), "stopped": stopped and self.failure is None}
        self.stop.restore()
        if self.env.is_main:
            (self.run_dir / "STOP").unlink(missing_ok=True)  # handled: the next start must not stop at once
            if s["stopped"]:
                self.write_metrics(stopped=True)
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.env.is_main and s["completed"] and self.confusion is not None:
            self.write_per_class()
        if self.env.is_main and self.history:
            from . import plot

            plot.curves(self.run_dir / "curves.png", [self.run_dir])  # from metrics.json, written by now
        if not stopped and s["test_acc"] is not None:
            self.print(f"done: test acc {s['test_acc']:.4f} on {s['test_count']} images, "
                       f"train time {s['train_time_s']:.1f}s -> {self.run_dir}")
        return s

    def write_per_class(self) -> None:
        """The final evaluation's per-class accuracy and confusion matrix: per_class.json, confusion.png."""
        from . import plot

        classes = self.manifest["classes"]
        write_json(self.run_dir / "per_class.json", {"classes": classes, "accuracy": per_class(self.confusion, classes),
                                                     "confusion": self.confusion})
        plot.confusion(self.run_dir / "confusion.png", self.confusion, classes,
                       f"{self.cfg.model.name}, epoch {self.epoch}")

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Everything a resume needs, in types a weights-only load accepts (tensors, containers,
        numbers, strings)."""
        return {
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "position": self.position, "best_acc": self.best_acc,
            "history": self.history, "ema": self.ema.state_dict() if self.ema is not None else None,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "rollbacks": self.rollbacks, "config": to_dict(self.cfg), "world_size": self.env.world_size,
            "best_robust": self.best_robust, "collapses": self.collapses,
            "data": {s: self.manifest[s]["sha256"] for s in ("train", "test")},
            "classes": self.manifest["classes"], "normalize": {"mean": self.mean, "std": self.std},
            "image_shape": list(self.image_shape),
        }

    def save_checkpoint(self, links: tuple[str, ...] = ()) -> None:
        if self.env.is_main:
            checkpoint.save(self.state_dict(), self.run_dir, self.cfg.train.keep_last, links)

    def restore(self, path: Path, state: dict, quiet: bool = False) -> None:
        load_weights(self.model, state["model"], str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:  # switched on at this resume: average from the trained weights, not the random initial ones
                self.ema.reset()
                self.print("train.ema switched on at this resume: the average starts from the restored weights")
        if self.lookahead is not None:  # a change of lookahead is refused at resume, so its state is there
            self.lookahead.load_state_dict(state["lookahead"])
        self.epoch, self.step, self.position = state["epoch"], state["step"], state.get("position")
        self.best_acc, self.history = state["best_acc"], state["history"]
        self.rollbacks, self.checked_step = state.get("rollbacks", []), state["step"]
        self.best_robust, self.collapses = state.get("best_robust", -1.0), state.get("collapses", [])
        if not quiet:
            inside = f", step {self.position['step']} of epoch {self.epoch + 1}" if self.position else ""
            self.print(f"resumed from {path} at epoch {self.epoch}{inside} (global step {self.step})")


def predict(model: nn.Module, x: torch.Tensor, tta: TTA = TTA.none) -> torch.Tensor:
    """fp32 logits of `x`, averaged over the test-time augmented views."""
    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(v).float() + model(v.flip(3)).float())

    if tta == TTA.none:
        return model(x).float()
    logits = mirrored(x)
    if tta == TTA.flip_translate:  # the image shifted 1 px up-left and down-right, borders reflected
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        logits = 0.5 * logits + 0.25 * sum(mirrored(v.contiguous(memory_format=fmt)) for v in shifted)
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, data: TestData, device: torch.device, amp_dtype: torch.dtype, amp: bool,
             tta: TTA = TTA.none, prefix: str = "test", attack: attacks.RobustEval | None = None) -> dict:
    """Loss, accuracy and the confusion matrix (rows: true class, columns: predicted) over the whole
    test set, each image counted once across ranks. Everything stays on the device until the end.
    With `attack`, also the accuracy under it (`<prefix>_robust_acc`, of the model without TTA)."""
    was_training = model.training
    model.eval()
    c = data.num_classes
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct, count, correct under attack
    confusion = torch.zeros(c * c, dtype=torch.float64, device=device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
        for i, (x, y) in enumerate(data):
            fault_point("eval")
            logits = predict(model, x, tta)
            pred = logits.argmax(1)
            totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
            totals[1] += (pred == y).sum()
            totals[2] += y.numel()
            confusion.scatter_add_(0, y * c + pred, torch.ones_like(y, dtype=torch.float64))  # no sync
            if attack is not None:
                totals[3] += attack(model, x, y, i).sum()
    model.train(was_training)
    loss_sum, correct, count, robust = all_reduce_sum(totals).tolist()
    if int(count) != data.count:  # each test image exactly once across ranks
        raise RuntimeError(f"evaluated {int(count)} images, expected {data.count}")
    matrix = all_reduce_sum(confusion).view(c, c).long().tolist()
    return {f"{prefix}_loss": loss_sum / count, f"{prefix}_acc": correct / count, f"{prefix}_count": int(count),
            **({f"{prefix}_robust_acc": robust / count} if attack is not None else {}), "confusion": matrix}


def per_class(confusion: list[list[int]], classes: list[str]) -> dict:
    """Per-class accuracy (recall) from a confusion matrix."""
    return {name: (row[i] / sum(row) if sum(row) else None) for i, (name, row) in enumerate(zip(classes, confusion))}


def main(argv: list[str] | None = None) -> dict | None:
    cfg = parse_args(argv)

    def job(env: DistEnv) -> dict:
        summary = Trainer(cfg, env).fit()
        if summary["stopped"]:
            raise JobExit(EXIT_STOPPED)  # stopped with a checkpoint: "resume later", not "finished"
        return summary

    return distributed.run_job("dist_resnet.train", cfg.train.device.value, job,
                               (ConfigError, DataError, CheckpointError), cfg.train.timeout_s)


if __name__ == "__main__":
    main()
