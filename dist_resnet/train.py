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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed
from .checkpoint import load, save_atomic, unwrap
from .config import Config, ConfigError, Precision, parse_args, to_dict, to_yaml
from .data.loader import DataError, TestData, TrainData, read_manifest
from .distributed import DistEnv, all_reduce_sum
from .models import build_model
from .optim import build_optimizer, build_scheduler

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16, Precision.fp32: torch.float32}


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.run_dir = Path(cfg.run.dir)
        cuda = self.device.type == "cuda"
        t = cfg.train
        precision = t.precision if t.precision != Precision.auto else (Precision.bf16 if cuda else Precision.fp32)
        if precision == Precision.bf16 and cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16 but this GPU has no bf16; use train.precision=fp16")
        self.precision, self.amp_dtype = precision, DTYPES[precision]
        if t.batch_size % env.world_size:
            raise ConfigError(
                f"train.batch_size={t.batch_size} (global) does not divide by the world size {env.world_size}; "
                f"use a multiple of {env.world_size}"
            )
        self.batch_per_rank = t.batch_size // env.world_size
        self.ckpt_path = self.run_dir / "last.pt"
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
        self.train_data = TrainData(cfg.data, self.batch_per_rank, t.seed, self.device, self.amp_dtype, cl,
                                    env.rank, env.world_size)
        self.test_data = TestData(cfg.data, self.batch_per_rank, self.device, self.amp_dtype, cl,
                                  env.rank, env.world_size)
        if not cuda:  # FFCV sets torch's thread count to its worker count; give compute the cores back
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))

        # ---- model: channels_last -> compile -> DDP
        model = build_model(cfg.model.name, len(self.manifest["classes"]), cfg.model.width).to(self.device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the unwrapped module: checkpoints hold its state_dict
        self.forward = torch.compile(model) if cfg.model.compile else model
        self.ddp = (nn.parallel.DistributedDataParallel(self.forward, device_ids=[self.device] if cuda else None)
                    if env.distributed else self.forward)

        # ---- optimisation
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, len(self.train_data), t.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == Precision.fp16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

        self.epoch, self.step, self.best_acc, self.history = 0, 0, -1.0, []
        if t.resume and self.ckpt_path.exists():
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
            record = {"epoch": self.epoch + 1, **self.train_epoch(self.epoch)}
            self.epoch += 1
            if self.epoch == cfg.epochs or self.epoch % cfg.eval_every == 0:
                record.update(self.evaluate())
            self.history.append(record)
            best = record.get("test_acc", -1.0) > self.best_acc
            self.best_acc = max(self.best_acc, record.get("test_acc", -1.0))
            self.log_epoch(record)
            self.save_checkpoint(best)
        return self.finish()

    def train_epoch(self, epoch: int) -> dict:
        self.forward.train()
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        window = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, count since last log
        bar = tqdm(total=len(self.train_data), desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", unit="step",
                   disable=not (self.env.is_main and self.cfg.run.progress), leave=False, file=sys.stdout)
        self.sync()
        start = last_log = time.perf_counter()
        for x, y in self.train_data.epoch(epoch):
            loss, correct = self.train_step(x, y)
            n = y.numel()
            stats += torch.stack([loss * n, correct, torch.tensor(n, device=self.device)]).double()
            window += torch.stack([loss * n, torch.tensor(n, device=self.device)]).double()
            self.step += 1
            bar.update(1)
            if self.step % self.cfg.train.log_every == 0:  # the only host sync inside the epoch
                loss_sum, count = all_reduce_sum(window).tolist()
                now = time.perf_counter()
                self.log_scalars({"train/loss": loss_sum / count, "train/img_per_s": count / (now - last_log),
                                  "train/lr": self.scheduler.get_last_lr()[0]}, self.step)
                bar.set_postfix(loss=f"{loss_sum / count:.3f}")
                window.zero_()
                last_log = now
        self.sync()
        elapsed = time.perf_counter() - start
        bar.close()
        loss_sum, correct, count = all_reduce_sum(stats).tolist()
        return {"train_loss": loss_sum / count, "train_acc": correct / count, "epoch_time_s": elapsed,
                "img_per_s": count / elapsed, "lr": self.scheduler.get_last_lr()[0]}

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.precision != Precision.fp32):
            logits = self.ddp(x)
            loss = self.criterion(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.forward.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.precision != Precision.fp32):
            for x, y in self.test_data:
                logits = self.forward(x).float()
                totals += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum(),
                                       torch.tensor(y.numel(), device=self.device)]).double()
        loss_sum, correct, count = all_reduce_sum(totals).tolist()
        if int(count) != self.test_data.count:  # each test image exactly once across ranks
            raise RuntimeError(f"evaluated {int(count)} images, expected {self.test_data.count}")
        return {"test_loss": loss_sum / count, "test_acc": correct / count, "test_count": int(count)}

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
        self.log_scalars(scalars, r["epoch"])
        test = f" test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f}" if "test_acc" in r else ""
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
            "test_acc": evals[-1]["test_acc"] if evals else None,
            "test_count": evals[-1]["test_count"] if evals else None,
            "best_test_acc": max((r["test_acc"] for r in evals), default=None),
            "train_time_s": sum(times),
            "first_epoch_s": times[0] if times else None,  # includes numba + torch.compile warm-up
            "steady_img_per_s": (sum(r["img_per_s"] for r in self.history[1:]) / (len(self.history) - 1)
                                 if len(self.history) > 1 else None),
            "history": self.history,
        }

    def write_metrics(self) -> None:
        path = self.run_dir / "metrics.json"
        tmp = path.with_name(".metrics.json.tmp")
        tmp.write_text(json.dumps(self.summary(), indent=2) + "\n")
        os.replace(tmp, path)

    def finish(self) -> dict:
        s = self.summary()
        if self.tb is not None:
            self.tb.close()
        if s["test_acc"] is not None:
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
            "epoch": self.epoch, "step": self.step, "best_acc": self.best_acc, "history": self.history,
            "config": to_dict(self.cfg), "world_size": self.env.world_size,
        }
        save_atomic(state, self.ckpt_path)
        if best:
            save_atomic(state, self.run_dir / "best.pt")

    def load_checkpoint(self, path: Path) -> None:
        state = load(path, self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_acc, self.history = state["best_acc"], state["history"]
        self.print(f"resumed from {path} at epoch {self.epoch} (step {self.step})")


def main(argv: list[str] | None = None) -> dict | None:
    cfg = parse_args(argv)
    env = distributed.setup(cfg.train.device.value)
    try:
        return Trainer(cfg, env).fit()
    except (ConfigError, DataError) as e:
        print(f"dist_resnet.train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
