"""Train a CIFAR ResNet from FFCV betons; one code path for 1..N processes.

    python -m dist_resnet.train --config configs/resnet18.yaml data.dir=data/cifar10 run.dir=runs/r18
    torchrun --nproc_per_node=4 -m dist_resnet.train --config configs/resnet18.yaml data.dir=... run.dir=...

Reads top to bottom: beton -> loader -> model -> step -> metrics -> checkpoint.
`train.batch_size` is the GLOBAL batch; each of the N ranks takes batch_size / N.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed
from .checkpoint import load, save_atomic, unwrap
from .config import TTA, Config, ConfigError, Precision, parse_args, to_dict, to_yaml
from .data.augment import derive_seed
from .data.loader import DataError, TestData, TrainData, read_manifest
from .distributed import DistEnv, StopRequest, all_reduce_sum, broadcast_buffers
from .models import build_model
from .optim import EMA, Lookahead, build_optimizer, build_scheduler

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16, Precision.fp32: torch.float32}


def resolve_precision(precision: Precision, cuda: bool) -> Precision:
    """`auto` is bf16 on GPU and fp32 on CPU."""
    return precision if precision != Precision.auto else (Precision.bf16 if cuda else Precision.fp32)


WHITENING_IMAGES = 5000  # train images that fit a model's data-dependent first layer (fastnet)


class Trainer:
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
        if t.batch_size % (env.world_size * t.accum_steps):
            raise ConfigError(
                f"train.batch_size={t.batch_size} (global) does not divide by the world size {env.world_size} x "
                f"train.accum_steps {t.accum_steps}; use a multiple of {env.world_size * t.accum_steps}"
            )
        if cfg.model.sync_bn and env.distributed and not cuda:
            raise ConfigError("model.sync_bn=true needs GPUs (torch has no CPU SyncBatchNorm); "
                              "on CPU use model.norm=group for batch-independent normalisation")
        self.batch_per_rank = t.batch_size // env.world_size
        self.ckpt_path = self.run_dir / "last.pt"
        resuming = t.resume and self.ckpt_path.exists()
        if self.ckpt_path.exists() and not t.resume:
            raise ConfigError(
                f"{self.ckpt_path} exists: pass train.resume=true to continue that run, or choose another run.dir"
            )
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        torch.backends.cudnn.benchmark = not t.deterministic
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # ---- beton -> loader
        self.manifest = read_manifest(cfg.data.dir)
        cl = cfg.model.channels_last
        self.train_data = TrainData(cfg.data, t.batch_size, t.seed, self.device, self.amp_dtype, cl,
                                    env.rank, env.world_size, t.accum_steps)
        self.test_data = TestData(cfg.data, self.batch_per_rank, self.device, self.amp_dtype, cl,
                                  env.rank, env.world_size)
        if not cuda:  # FFCV sets torch's thread count to its worker count; give compute the cores back
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))

        # ---- model: (SyncBN) -> channels_last -> compile -> DDP
        model = build_model(cfg.model.name, len(self.manifest["classes"]), cfg.model.width, cfg.model.norm.value)
        if cfg.model.sync_bn and env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        if hasattr(model, "init_from_data") and not resuming:  # same images on every rank: same weights
            model.init_from_data(self.train_data.sample_images(WHITENING_IMAGES))
        self.model = model  # the unwrapped module: checkpoints hold its state_dict
        self.forward = torch.compile(model, mode=cfg.model.compile_mode.value) if cfg.model.compile else model
        self.ddp = (nn.parallel.DistributedDataParallel(self.forward, device_ids=[self.device] if cuda else None)
                    if env.distributed else self.forward)
        self.ema = EMA(model, t.ema_decay) if t.ema else None  # weights and BN buffers, every optimizer step
        torch.manual_seed(derive_seed(t.seed, env.rank))  # per-rank stream for anything random after init

        # ---- optimisation
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, len(self.train_data), t.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == Precision.fp16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        o = cfg.optim
        self.lookahead = (Lookahead(model, o.lookahead_decay, o.lookahead_every, len(self.train_data) * t.epochs)
                          if o.lookahead_every else None)

        self.epoch, self.step, self.best_acc, self.history = 0, 0, -1.0, []
        self.first_step_s: float | None = None  # process setup + first step (compile, numba, cudnn autotune)
        self.position: dict | None = None  # where a stopped epoch left off (mid-epoch resume)
        self.stop = StopRequest(self.run_dir / "STOP")
        if resuming:
            self.load_checkpoint(self.ckpt_path)
        elif t.resume:
            self.print(f"train.resume=true but {self.ckpt_path} does not exist yet: starting from scratch")

        self.tb = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            self.tb = SummaryWriter(str(self.run_dir))

    def print(self, *args) -> None:
        if self.env.is_main:
            print(*args, flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        cfg = self.cfg.train
        self.print(
            f"{self.cfg.model.name} on {self.device} x{self.env.world_size} ({self.precision.value}), "
            f"global batch {cfg.batch_size}, {len(self.train_data)} steps/epoch, epochs {self.epoch + 1}..{cfg.epochs}"
        )
        while self.epoch < cfg.epochs:
            record = self.train_epoch(self.epoch)
            if record is None:  # stop requested: the checkpoint holds the position inside the epoch
                return self.finish(stopped=True)
            self.epoch += 1
            if self.epoch == cfg.epochs or self.epoch % cfg.eval_every == 0:
                t0 = time.perf_counter()
                record.update(self.evaluate())
                record["eval_time_s"] = time.perf_counter() - t0  # evaluate() ends in a host sync
            self.history.append(record)
            best = record.get("test_acc", -1.0) > self.best_acc
            self.best_acc = max(self.best_acc, record.get("test_acc", -1.0))
            self.log_epoch(record)
            self.save_checkpoint(best)
        return self.finish()

    def train_epoch(self, epoch: int) -> dict | None:
        """One epoch from `self.position` (if resuming inside it); None if a stop was agreed."""
        self.forward.train()
        pos, self.position = self.position or {"step": 0, "stats": [0.0, 0.0, 0.0], "elapsed": 0.0}, None
        # loss sum, correct, count; a resumed epoch's partial sums (over all ranks) restart on rank 0
        stats = torch.tensor(pos["stats"] if self.env.is_main else [0.0] * 3, dtype=torch.float64, device=self.device)
        window = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, count since last log
        bar = tqdm(total=len(self.train_data), initial=pos["step"], desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                   unit="step", disable=not (self.env.is_main and self.cfg.run.progress), leave=False, file=sys.stdout)
        self.sync()
        start = last_log = time.perf_counter()
        for step, micro_batches in self.train_data.epoch(epoch, pos["step"]):
            step_stats = self.train_step(micro_batches)
            stats += step_stats
            window += step_stats[0::2]  # loss sum, count (a view: no index tensor per step)
            self.step += 1
            if self.first_step_s is None:
                self.sync()
                self.first_step_s = time.perf_counter() - self.created
                self.print(f"first step after {self.first_step_s:.1f}s (setup, compile and warm-up)")
            bar.update(1)
            if self.step % self.cfg.train.log_every == 0:  # the only host sync inside the epoch
                loss_sum, count = all_reduce_sum(window).tolist()
                now = time.perf_counter()
                self.log_scalars({"train/loss": loss_sum / count, "train/img_per_s": count / (now - last_log),
                                  "train/lr": self.scheduler.get_last_lr()[0]}, self.step)
                bar.set_postfix(loss=f"{loss_sum / count:.3f}")
                window.zero_()
                last_log = now
            if (step + 1) % self.cfg.train.stop_check_every == 0 and step + 1 < len(self.train_data) \
                    and self.stop.agreed(self.env.control_group):
                self.sync()
                bar.close()
                self.position = {"step": step + 1, "stats": all_reduce_sum(stats.clone()).tolist(),
                                 "elapsed": pos["elapsed"] + time.perf_counter() - start}
                self.save_checkpoint(best=False)
                self.print(f"stopped ({self.stop.reason}) at epoch {epoch + 1} step {step + 1}/{len(self.train_data)}; "
                           f"resume with train.resume=true")
                return None
        self.sync()
        elapsed = pos["elapsed"] + time.perf_counter() - start
        bar.close()
        loss_sum, correct, count = all_reduce_sum(stats).tolist()
        return {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
                "epoch_time_s": elapsed, "img_per_s": count / elapsed, "lr": self.scheduler.get_last_lr()[0]}

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
                    logits = self.ddp(x)
                    loss = self.criterion(logits, y)
                self.scaler.scale(loss / len(micro_batches)).backward()
            n = y.numel()  # a host int: no host-to-device copy in the hot loop
            out[0] += loss.detach().double() * n
            out[1] += (logits.detach().argmax(1) == y).sum()
            out[2] += n
        return out

    def optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.step)
        if self.lookahead is not None:
            self.lookahead.step(self.step + 1)

    def evaluate(self) -> dict:
        for module in [self.model] + ([self.ema.module] if self.ema is not None else []):
            broadcast_buffers(module)
        amp = (self.amp_dtype, self.precision != Precision.fp32, self.cfg.train.tta)
        result = evaluate(self.forward, self.test_data, self.device, *amp)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.test_data, self.device, *amp)
            result.update({"ema_test_loss": ema["test_loss"], "ema_test_acc": ema["test_acc"]})
        return result

    # ---------------------------------------------------------------- metrics
    def log_scalars(self, scalars: dict, step: int) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def log_epoch(self, r: dict) -> None:
        scalars = {"train/epoch_loss": r["train_loss"], "train/acc": r["train_acc"], "time/epoch_s": r["epoch_time_s"],
                   "train/epoch_img_per_s": r["img_per_s"]}
        if "test_acc" in r:
            scalars.update({"test/loss": r["test_loss"], "test/acc": r["test_acc"]})
        if "ema_test_acc" in r:
            scalars.update({"test/ema_loss": r["ema_test_loss"], "test/ema_acc": r["ema_test_acc"]})
        self.log_scalars(scalars, r["epoch"])
        test = f" test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f}" if "test_acc" in r else ""
        test += f" ema acc {r['ema_test_acc']:.4f}" if "ema_test_acc" in r else ""
        self.print(f"epoch {r['epoch']:3d} train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f}{test} "
                   f"| {r['epoch_time_s']:.1f}s {r['img_per_s']:.0f} img/s")
        if self.env.is_main:
            self.write_metrics()

    def summary(self) -> dict:
        evals = [r for r in self.history if "test_acc" in r]
        times = [r["epoch_time_s"] for r in self.history]
        return {
            "model": self.cfg.model.name, "world_size": self.env.world_size, "global_batch_size": self.cfg.train.batch_size,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "precision": self.precision.value, "epochs": len(self.history),
            "completed": len(self.history) == self.cfg.train.epochs,
            "test_acc": evals[-1]["test_acc"] if evals else None,
            "test_count": evals[-1]["test_count"] if evals else None,
            "best_test_acc": max((r["test_acc"] for r in evals), default=None),
            "train_time_s": sum(times),
            "first_epoch_s": times[0] if times else None,  # includes numba + torch.compile warm-up
            "first_step_s": self.first_step_s,  # from Trainer creation; None when resumed past all steps
            "eval_time_s": sum(r.get("eval_time_s", 0.0) for r in self.history),
            "steady_img_per_s": (sum(r["img_per_s"] for r in self.history[1:]) / (len(self.history) - 1)
                                 if len(self.history) > 1 else None),
            "history": self.history,
        }

    def write_metrics(self) -> None:
        path = self.run_dir / "metrics.json"
        tmp = path.with_name(".metrics.json.tmp")
        tmp.write_text(json.dumps(self.summary(), indent=2) + "\n")
        os.replace(tmp, path)

    def finish(self, stopped: bool = False) -> dict:
        s = self.summary()
        self.stop.restore()
        if self.tb is not None:
            self.tb.close()
        if not stopped and s["test_acc"] is not None:
            self.print(f"done: test acc {s['test_acc']:.4f} on {s['test_count']} images, "
                       f"train time {s['train_time_s']:.1f}s -> {self.run_dir}")
        return s

    # ---------------------------------------------------------------- checkpoint
    def save_checkpoint(self, best: bool) -> None:
        if not self.env.is_main:
            return
        state = {
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "position": self.position, "best_acc": self.best_acc,
            "history": self.history, "ema": self.ema.state_dict() if self.ema is not None else None,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "config": to_dict(self.cfg), "world_size": self.env.world_size,
        }
        save_atomic(state, self.ckpt_path)
        if best:
            save_atomic(state, self.run_dir / "best.pt")
        if self.position is not None:  # a stop was handled: the next start must not stop at once
            (self.run_dir / "STOP").unlink(missing_ok=True)

    def load_checkpoint(self, path: Path) -> None:
        state = load(path, self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.lookahead is not None and state.get("lookahead") is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        self.epoch, self.step, self.position = state["epoch"], state["step"], state.get("position")
        self.best_acc, self.history = state["best_acc"], state["history"]
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
             tta: TTA = TTA.none) -> dict:
    """Loss and accuracy over the whole test set, each image counted once across ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
        for x, y in data:
            logits = predict(model, x, tta)
            totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += y.numel()
    model.train(was_training)
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    if int(count) != data.count:  # each test image exactly once across ranks
        raise RuntimeError(f"evaluated {int(count)} images, expected {data.count}")
    return {"test_loss": loss_sum / count, "test_acc": correct / count, "test_count": int(count)}


def main(argv: list[str] | None = None) -> dict | None:
    cfg = parse_args(argv)
    return distributed.run_job("dist_resnet.train", cfg.train.device.value, lambda env: Trainer(cfg, env).fit(),
                               (ConfigError, DataError))


if __name__ == "__main__":
    main()
