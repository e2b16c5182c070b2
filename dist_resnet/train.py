"""Train a ResNet from FFCV betons; one code path for 1..N processes.

    python -m dist_resnet.train --config configs/resnet18.yaml data.dir=data/cifar10 run.dir=runs/r18
    torchrun --nproc_per_node=4 -m dist_resnet.train --config configs/resnet18.yaml data.dir=... run.dir=...

Reads top to bottom: every component is built from the config (dist_resnet.engine.build), then the loop
runs epochs of steps; each epoch ends in its evaluations, a metrics record and a checkpoint.
`train.batch_size` is the GLOBAL batch; each of the N ranks takes batch_size / N.
"""
from __future__ import annotations

from contextlib import closing
from typing import Iterator

import torch

from . import distributed
from .checkpoint import CheckpointError
from .config import Config, ConfigError, parse_args
from .data.manifest import DataError
from .distributed import EXIT_BAD_INPUT, EXIT_STOPPED, DistEnv, JobExit
from .engine.build import build
from .engine.plan import check_env, plan
from .engine.report import EpochMeter
from .engine.state import Diverged
from .faults import fault_point


class Trainer:
    """The loop over the components `build` makes; `fit()` trains, `finish()` ends the run on every rank.
    Benchmarks use `batches()`, `train_step()`, `forward_backward()`, `evaluate()` and `close()`."""

    def __init__(self, cfg: Config, env: DistEnv):
        c = build(cfg, env)
        self.cfg, self.env, self.model, self.classes = cfg, env, c.model, c.classes
        self.data, self.step, self.state, self.evaluator = c.data, c.step, c.state, c.evaluator
        self.checkpointer, self.report, self.clock, self.nonfinite = c.checkpointer, c.report, c.clock, c.nonfinite
        self.stop, self.warmup, self.hooks = c.stop, c.warmup, c.hooks

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        t = self.cfg.train
        if self.done:
            self.report.say(f"{self.cfg.run.dir} already finished ({self.state.epoch} of {t.epochs} epochs): "
                            "nothing to train")
            return self.finish()
        self.report.say(f"{self.cfg.model.name} on {self.env.device} x{self.env.world_size} ({self.step.amp.describe()}), "
                        f"global batch {t.batch_size}, {len(self.data)} steps/epoch, "
                        f"epochs {self.state.epoch + 1}..{t.epochs}")
        try:
            self.warmup(self.state)  # inside: an out-of-memory in the warm-up gets the same advice as in training
            while not self.done:
                record = self.guarded_epoch()
                if record is None:  # stop requested: the checkpoint holds the position inside the epoch
                    return self.finish(stopped=True)
                self.end_epoch(record)
                if not self.done and self.stop.agreed(self.env.control_group):
                    self.report.say(f"stopped ({self.stop.reason}) after epoch {self.state.epoch}; "
                                    "resume with train.resume=true")
                    return self.finish(stopped=True)
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory(self.cfg, self.env) from None
        return self.finish()

    def guarded_epoch(self) -> dict | None:
        """The current epoch; a non-finite loss goes to the train.nonfinite policy, which puts the run
        back to a good state (and the epoch runs again) or ends it."""
        while True:
            try:
                return self.train_epoch(self.state.epoch)
            except Diverged as d:
                if not self.nonfinite.recover(d, self.checkpointer):
                    self.fail(d)

    def train_epoch(self, epoch: int) -> dict | None:
        """One epoch from where it left off; None if a stop was agreed inside it."""
        for hook in self.hooks:
            hook.start_epoch(epoch)
        pos, end, t = self.state.take_position(), self.state.epoch_end(epoch), self.cfg.train
        bar = self.report.bar(epoch, len(self.data), pos["step"])
        self.clock.sync()
        meter = EpochMeter(self.env.device, pos, self.env.is_main, self.state.step, bar)
        with closing(self.data.epoch(epoch, pos["step"], end)) as steps:
            for i, micro_batches in steps:
                meter.batch_arrived()
                meter.add(self.step(micro_batches, self.state.step))
                self.state.step += 1
                fault_point("step")
                self.clock.after_step()
                if self.state.step % t.log_every == 0 or self.state.step == 1:  # the only host sync inside the
                    self.log(meter)  # epoch (and the run's first step: every curve starts where training did)
                if (i + 1) % t.stop_check_every == 0 and i + 1 < end and self.stop.agreed(self.env.control_group):
                    return self.pause(epoch, i + 1, meter)
                if self.checkpointer.due(self.state.step) and i + 1 < end:  # train.checkpoint_every
                    self.save_position(i + 1, meter)
                    self.state.position = None  # the epoch goes on: the position is the checkpoint's only
                meter.next_batch()
        if meter.logged_step < self.state.step:  # the epoch's last steps, logged with its end (synced anyway)
            self.log(meter)
        return self.epoch_record(epoch, meter)

    def log(self, meter: EpochMeter) -> None:
        loss_sum, count = meter.reduce_window()
        self.nonfinite.check(loss_sum)
        scalars = meter.window_scalars(loss_sum, count, self.state.step, self.lr())
        self.report.scalars({**scalars, **self.report.memory()}, self.state.step)

    def pause(self, epoch: int, at: int, meter: EpochMeter) -> None:
        """A stop agreed inside the epoch: its position and partial sums go into a checkpoint."""
        meter.bar.close()
        self.save_position(at, meter)
        self.report.say(f"stopped ({self.stop.reason}) at epoch {epoch + 1} step {at}/{len(self.data)}; "
                        "resume with train.resume=true")

    def save_position(self, at: int, meter: EpochMeter) -> None:
        """A checkpoint inside the epoch, after its step `at`: the position and the partial sums (a stop's, or
        train.checkpoint_every's, which changes nothing in the run: the sums are read, not reset)."""
        self.clock.sync()
        totals = meter.totals()
        self.nonfinite.check(totals[0])  # never checkpoint a diverged state
        self.state.position = {"step": at, "stats": totals, "elapsed": meter.elapsed(), **meter.carry()}
        self.checkpointer.save()

    def epoch_record(self, epoch: int, meter: EpochMeter) -> dict:
        meter.bar.close()
        self.clock.sync()
        elapsed = meter.elapsed()
        loss_sum, correct, count = meter.totals()
        self.nonfinite.check(loss_sum)
        return {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
                "epoch_time_s": elapsed, "img_per_s": count / elapsed, "lr": self.lr(), "steps": meter.logged}

    def end_epoch(self, record: dict) -> None:
        """The evaluations that are due, the record in the history and metrics.json, a checkpoint."""
        self.state.epoch += 1
        links = self.evaluator.after_epoch(record, self.state.epoch)
        self.state.history.append(record)
        self.report.epoch(record, self.summary(), self.state.step)
        self.checkpointer.save(links)
        if self.evaluator.monitor.stopped:
            self.report.say(self.evaluator.monitor.explain())

    # ---------------------------------------------------------------- the end
    def fail(self, d: Diverged) -> None:
        self.nonfinite.fail(d)
        self.report.write_metrics(self.summary())
        self.finish(stopped=True)
        raise d

    def finish(self, stopped: bool = False) -> dict:
        """End the run on every rank: the stop request handled, files closed, the pictures drawn."""
        s = self.summary(stopped=stopped and self.nonfinite.failure is None)
        if s["stopped"]:
            self.report.write_metrics(s)
        self.report.pictures(s, self.evaluator.confusion, self.classes)
        self.close("FINISHED" if s["completed"] else "FAILED" if s["failure"] else "KILLED")  # releases run.dir
        if not stopped and s["test_acc"] is not None:
            self.report.say(f"done: test acc {s['test_acc']:.4f} on {s['test_count']} images, "
                            f"train time {s['train_time_s']:.1f}s -> {self.cfg.run.dir}")
        return s

    def summary(self, stopped: bool = False) -> dict:
        facts = {"precision": self.precision, "precision_why": self.step.amp.why, **self.nonfinite.summary(),
                 "precision_segments": self.state.segments, **self.evaluator.summary(), **self.clock.summary(),
                 "steps_per_epoch": self.state.steps_per_epoch, **self.step.distill.summary()}
        return {**self.report.summary(self.state.history, facts), "stopped": stopped,
                "stop_reason": self.stop.reason if stopped else None}

    @property
    def done(self) -> bool:
        """All epochs trained, or stopped early (train.early_stop_patience)."""
        return self.state.finished or self.evaluator.monitor.stopped

    @property
    def precision(self) -> str:
        return self.step.amp.precision.value

    def lr(self) -> float:
        return self.step.scheduler.get_last_lr()[0]

    # ---------------------------------------------------------------- for benchmarks
    def batches(self) -> Iterator[list]:
        """The micro-batch lists of every step, epoch after epoch, without end."""
        epoch = 0
        while True:
            for _, micro_batches in self.data.epoch(epoch):
                yield micro_batches
            epoch += 1

    def train_step(self, micro_batches: list) -> torch.Tensor:
        """One step as the loop takes it (the step count drives the adversary, EMA warm-up and lookahead)."""
        out = self.step(micro_batches, self.state.step)
        self.state.step += 1
        return out

    def forward_backward(self, micro_batches: list) -> torch.Tensor:
        """The step's forward and backward only (gradients zeroed first, none applied)."""
        self.step.optimizer.zero_grad(set_to_none=True)
        return self.step.forward_backward(micro_batches, self.state.step)

    def evaluate(self) -> dict:
        return self.evaluator.run()

    def close(self, status: str = "FINISHED") -> None:
        self.stop.handled(remove_file=self.env.is_main)
        self.report.close(status)


def out_of_memory(cfg: Config, env: DistEnv) -> JobExit:
    t = cfg.train
    return JobExit(EXIT_BAD_INPUT, (
        f"error: CUDA out of memory with {t.batch_size // env.world_size // t.accum_steps} images per rank and "
        f"micro-batch (train.batch_size={t.batch_size} over {env.world_size} ranks, train.accum_steps="
        f"{t.accum_steps}). Raise train.accum_steps to split each step into smaller micro-batches with the same "
        "result, or lower train.batch_size"))


def check(cfg: Config, world_sizes: list[int]) -> None:
    """--check: every check a run makes before it builds anything (engine.plan), for each world size."""
    for env in check_env(world_sizes, cfg.train.device.value):
        plan(cfg, env, print)


def main(argv: list[str] | None = None) -> dict | None:
    cfg = parse_args(argv, check=check)  # --check: the launch scripts' first step

    def job(env: DistEnv) -> dict:
        summary = Trainer(cfg, env).fit()
        if summary["stopped"]:  # stopped with a checkpoint: "resume later", not "finished"
            raise JobExit(EXIT_STOPPED, reason=summary["stop_reason"])
        return summary

    return distributed.run_job("dist_resnet.train", cfg.train.device.value, job,
                               (ConfigError, DataError, CheckpointError), cfg.train.timeout_s)


if __name__ == "__main__":
    main()
