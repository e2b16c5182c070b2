"""What a run tells: the console and the run folder (dist_resnet.rundir) on rank 0, the trackers
(TensorBoard and the others the config asks for: dist_resnet.tracking), metrics.json after every epoch,
the pictures and per-class results at the end, the epoch's sums on the device (read only at a log or an
epoch's end), and the run's timing."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import plot, rundir
from ..config import Config, ConfigError, to_yaml
from ..distributed import DistEnv, all_reduce_sum
from ..fileio import clean_stale_tmp, write_json, write_text
from ..tracking import Tracker, open_tracker
from .evaluation import per_class


class Clock:
    """The run's timing: from its creation to the first step (setup, compile, numba), the untimed
    warm-up, a data-dependent first layer's fit; `sync` waits for the device where there is one."""

    def __init__(self, device: torch.device, say):
        self.created, self.say = time.perf_counter(), say
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.first_step_s: float | None = None  # None when resumed past all steps
        self.warmup_s: float | None = None  # train.warmup_steps: compile and autotune, outside train_time_s
        self.init_time_s = 0.0  # fastnet's whitening fit: part of the timed run

    def after_step(self) -> None:
        if self.first_step_s is None:
            self.sync()
            self.first_step_s = time.perf_counter() - self.created
            self.say(f"first step after {self.first_step_s:.1f}s (setup, compile and warm-up)")

    def summary(self) -> dict:
        return {"first_step_s": self.first_step_s, "warmup_s": self.warmup_s, "init_time_s": self.init_time_s}


class EpochMeter:
    """An epoch's loss sum, correct count and count on the device (a resumed epoch's partial sums, over
    all ranks, restart on rank 0), the log window's, the points logged (step, train loss, LR: the curves'
    per-step points, kept in the epoch's record), and the host's wait for the loader."""

    def __init__(self, device: torch.device, position: dict, is_main: bool, step: int, bar: tqdm):
        self.stats = torch.tensor(position["stats"] if is_main else [0.0] * 3, dtype=torch.float64, device=device)
        window = position.get("window", [0.0, 0.0]) if is_main else [0.0, 0.0]  # loss sum, count since the last log
        self.window = torch.tensor(window, dtype=torch.float64, device=device)
        self.logged: list[list[float]] = list(position.get("logged", []))
        self.elapsed0, self.bar = position["elapsed"], bar
        self.start = self.last_log = self.ready = time.perf_counter()
        self.waited, self.logged_step = 0.0, step  # host time spent waiting for the loader since the last log

    def batch_arrived(self) -> None:
        self.waited += time.perf_counter() - self.ready

    def add(self, step_stats: torch.Tensor) -> None:
        self.stats += step_stats  # a NaN/inf loss stays in these sums until the next sync reads them
        self.window += step_stats[0::2]  # loss sum, count (a view: no index tensor per step)
        self.bar.update(1)

    def next_batch(self) -> None:
        self.ready = time.perf_counter()

    def reduce_window(self) -> tuple[float, float]:
        """The window's loss sum and count over all ranks: the only host sync inside an epoch."""
        loss_sum, count = all_reduce_sum(self.window.clone()).tolist()
        return loss_sum, count

    def window_scalars(self, loss_sum: float, count: float, step: int, lr: float) -> dict:
        now = time.perf_counter()
        scalars = {"train/loss": loss_sum / count, "train/img_per_s": count / (now - self.last_log), "train/lr": lr,
                   "time/step_ms": 1000 * (now - self.last_log) / (step - self.logged_step),
                   "time/data_wait_pct": 100 * self.waited / (now - self.last_log)}
        self.bar.set_postfix(loss=f"{loss_sum / count:.3f}")
        self.logged.append([step, loss_sum / count, lr])
        self.window.zero_()
        self.last_log, self.waited, self.logged_step = now, 0.0, step
        return scalars

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.start

    def carry(self) -> dict:
        """What a stop inside the epoch keeps of the log (a host sync): the open window over all ranks and the
        points logged, so the resumed epoch logs what the uninterrupted one would."""
        return {"window": list(self.reduce_window()), "logged": self.logged}

    def totals(self) -> list[float]:
        """The epoch's loss sum, correct and count so far, over all ranks (a host sync)."""
        return all_reduce_sum(self.stats.clone()).tolist()


class Report:
    """Rank 0 prints and writes; the other ranks' calls do nothing (no file, no TensorBoard event)."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        self.tracker = Tracker([])  # rank 0's backends (dist_resnet.tracking), from open() to close()
        self.held = None  # rank 0's lock on the run folder, from open() to close()
        cuda = env.device.type == "cuda"
        self.device_name = torch.cuda.get_device_name(env.device) if cuda else "cpu"
        self.memory = self._memory if cuda else dict  # the GPU's high-water mark; nothing on CPU
        self.draw = plot if cfg.run.pictures else None  # run.pictures=false: the numbers without the PNGs

    def say(self, *args) -> None:
        if self.env.is_main:
            print(*args, flush=True)

    def _memory(self) -> dict:
        """The GPU memory high-water mark (allocator statistics: no sync)."""
        return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(self.env.device) / 2**30}

    def open(self, pretrained: dict | None, split: dict | None, resumed_step: int | None = None) -> None:
        """Rank 0's run folder: stale temp files cleaned, config.yaml (and pretrained.json, split.json),
        the tracking backends (continued from `resumed_step` on a resume). Called once everything is built
        and restored."""
        if not self.env.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.held = rundir.lock(self.run_dir)  # one trainer per folder: a second one stops here, having written nothing
        except rundir.FolderBusy as e:
            raise ConfigError(str(e)) from None
        for p in clean_stale_tmp(self.run_dir):
            self.say(f"removed {p.name}, left by a writer that was killed")
        write_text(self.run_dir / rundir.CONFIG, to_yaml(self.cfg))
        for name, content in ((rundir.PRETRAINED, pretrained), (rundir.SPLIT, split)):
            if content is not None:
                write_json(self.run_dir / name, content)
        self.tracker = open_tracker(self.cfg, self.say, resumed_step)

    def bar(self, epoch: int, total: int, initial: int) -> tqdm:
        return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", unit="step",
                    disable=not (self.env.is_main and self.cfg.run.progress), leave=False, file=sys.stdout)

    def scalars(self, scalars: dict, step: int) -> None:
        self.tracker.scalars(scalars, step)

    def epoch(self, r: dict, summary: dict, step: int) -> None:
        """An epoch's record: the trackers, one console line, metrics.json."""
        scalars = {"train/epoch_loss": r["train_loss"], "train/acc": r["train_acc"], "time/epoch_s": r["epoch_time_s"],
                   "train/epoch_img_per_s": r["img_per_s"]}
        line = ""
        for name in ("val", "test"):
            if f"{name}_acc" in r:
                scalars.update({f"{name}/loss": r[f"{name}_loss"], f"{name}/acc": r[f"{name}_acc"]})
                line += f" {name} loss {r[f'{name}_loss']:.4f} acc {r[f'{name}_acc']:.4f}"
            if f"{name}_robust_acc" in r:
                scalars[f"{name}/robust_acc"] = r[f"{name}_robust_acc"]
                line += f" robust {r[f'{name}_robust_acc']:.4f}"
            if f"ema_{name}_acc" in r:
                scalars.update({f"{name}/ema_loss": r[f"ema_{name}_loss"], f"{name}/ema_acc": r[f"ema_{name}_acc"]})
                line += f" ema acc {r[f'ema_{name}_acc']:.4f}"
        if "check_robust_acc" in r:
            scalars.update({"check/acc": r["check_acc"], "check/robust_acc": r["check_robust_acc"]})
            line += f" check pgd {r['check_robust_acc']:.3f}"
        self.tracker.epoch(scalars, r["epoch"], step)
        self.say(f"epoch {r['epoch']:3d} train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f}{line} "
                 f"| {r['epoch_time_s']:.1f}s {r['img_per_s']:.0f} img/s")
        self.write_metrics(summary)

    def write_metrics(self, summary: dict) -> None:
        if self.env.is_main:
            write_json(self.run_dir / rundir.METRICS, summary)

    def summary(self, history: list[dict], facts: dict) -> dict:
        """metrics.json: the run, its history, and the components' `facts` (precision, failure, robustness,
        timing)."""
        evals = [r for r in history if "test_acc" in r]
        vals = [r for r in history if "val_acc" in r]
        times = [r["epoch_time_s"] for r in history]
        last = lambda rs, k: rs[-1].get(k) if rs else None  # noqa: E731
        init = facts["init_time_s"]
        return {
            "model": self.cfg.model.name, "world_size": self.env.world_size, "steps_per_epoch": facts["steps_per_epoch"],
            "global_batch_size": self.cfg.train.batch_size, "device": self.device_name,
            "precision": facts["precision"], "precision_why": facts["precision_why"],
            "precision_segments": facts["precision_segments"], "epochs": len(history),
            "completed": len(history) == self.cfg.train.epochs or facts["stopped_early"],
            "stopped": False, "failure": facts["failure"], "rollbacks": facts["rollbacks"],
            "test_acc": last(evals, "test_acc"), "test_count": last(evals, "test_count"),
            "best_test_acc": max((r["test_acc"] for r in evals), default=None),
            "test_robust_acc": last(evals, "test_robust_acc"), "robust_eval": facts["robust_eval"],
            "best_check_robust_acc": facts["best_check_robust_acc"], "collapses": facts["collapses"],
            "val_acc": last(vals, "val_acc"), "val_count": last(vals, "val_count"),
            "best_val_acc": max((r["val_acc"] for r in vals), default=None),
            "train_time_s": sum(times),
            "first_epoch_s": times[0] if times else None,  # includes numba + torch.compile warm-up
            "first_step_s": facts["first_step_s"], "warmup_s": facts["warmup_s"], "init_time_s": init,
            # timed like the record scripts: training + the data-dependent init + the final evaluation
            "time_to_result_s": sum(times) + init + (history[-1].get("eval_time_s", 0.0) if history else 0.0),
            "eval_time_s": sum(r.get("eval_time_s", 0.0) for r in history),
            "steady_img_per_s": (sum(r["img_per_s"] for r in history[1:]) / (len(history) - 1)
                                 if len(history) > 1 else None),
            **{k: facts[k] for k in ("monitor", "monitor_best", "monitor_best_epoch", "stopped_early", "stop_epoch",
                                     "teacher")},
            "history": history,
        }

    def pictures(self, summary: dict, confusion: list[list[int]] | None, classes: list[str]) -> None:
        """At the end (rank 0): per_class.json and confusion.png of a completed run's final evaluation,
        and curves.png once an epoch is recorded (the PNGs unless run.pictures=false)."""
        if not self.env.is_main:
            return
        if summary["completed"] and confusion is not None:
            write_json(self.run_dir / rundir.PER_CLASS, {"classes": classes, "accuracy": per_class(confusion, classes),
                                                         "confusion": confusion})
            if self.draw:
                self.draw.confusion(self.run_dir / rundir.CONFUSION, confusion, classes,
                                    f"{self.cfg.model.name}, epoch {summary['epochs']}")
        if summary["history"] and self.draw:
            self.draw.curves(self.run_dir / rundir.CURVES, [self.run_dir])  # from metrics.json, written by now
        self.tracker.files([self.run_dir / n for n in (rundir.CURVES, rundir.CONFUSION, rundir.PER_CLASS,
                                                       rundir.METRICS, rundir.CONFIG)])

    def close(self, status: str = "FINISHED") -> None:
        """`status`: the tracking runs' end (MLflow's FINISHED, KILLED for a stop, FAILED)."""
        self.tracker.close(status)
        if self.held is not None:
            self.held.close()  # releases the run folder
            self.held = None
