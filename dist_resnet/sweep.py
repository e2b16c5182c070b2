"""Hyper-parameter sweeps on Optuna. Every trial is a normal training run; selection is on validation
accuracy, never on test.

    python -m dist_resnet.sweep --config configs/cpu.yaml --study lr --trials 8 --out sweeps/lr \\
        --space 'optim.lr=log(0.05,2)' --space 'optim.weight_decay=choice(5e-4,1e-3)' \\
        data.dir=data/cifar10 data.val_fraction=0.1 train.epochs=4
    python -m dist_resnet.sweep --report sweeps/lr                  # the results table
    python -m dist_resnet.sweep ... --storage postgresql://user:pw@db-host/sweeps   # a worker of many nodes

Search space (`--space KEY=SPEC`, repeatable, or `--space space.yaml` holding `KEY: SPEC` lines):
  log(a,b)     float, log-uniform in [a, b]          float(a,b)  float, uniform in [a, b]
  int(a,b)     integer in [a, b]                     choice(x,y,...)  one of the values
  [x,y,...]    a list: what `--sampler grid` takes (choice(...) works there too)

- Each trial runs in SWEEP_DIR/trial-NNNN/ (its own config.yaml, metrics, curves, TensorBoard events) as
  `python -m dist_resnet.train` (or torchrun for --gpus-per-trial K > 1). Its validation accuracy goes to
  Optuna every epoch, from its metrics.json, so the pruner can stop it early (it stops with a checkpoint).
  A trial that crashes or diverges is recorded as failed, with its error, and the sweep goes on.
- With several GPUs visible, trials run side by side, K GPUs each (default 1); on CPU, one at a time.
- Storage: by default a journal file in SWEEP_DIR (one machine, many processes). For many nodes, an RDB
  URL (PostgreSQL): trials of a killed worker go stale (heartbeat) and are retried. A retried or stopped
  trial resumes from its own checkpoint. SQLite and journal files on NFS are not safe across nodes.
- SIGUSR1/SIGTERM (slurm/sweep.sh): running trials checkpoint and stop, are queued to resume, and the
  worker exits 75.
- Results: SWEEP_DIR/results.csv and results.md (best marked), best.yaml (the winning config);
  --final retrains it on the whole train split and reports test accuracy once (SWEEP_DIR/final).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, flatten, load_config, merged, to_dict, to_yaml
from .distributed import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STOPPED
from .fileio import write_json, write_text

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "asha", "none")
_SPEC = re.compile(r"^(log|float|int|choice)\((.*)\)$")


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message says why and what to do."""


# ---------------------------------------------------------------- search space
@dataclass
class Param:
    key: str
    kind: str  # log | float | int | choice
    values: tuple  # (low, high) or the choices

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.key, int(low), int(high))
        return trial.suggest_float(self.key, float(low), float(high), log=self.kind == "log")


def _value(text: str):
    """A number (5e-4 too, which YAML 1.1 reads as a string), else what YAML makes of it."""
    import yaml

    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_param(key: str, spec) -> Param:
    if isinstance(spec, list):
        return Param(key, "choice", tuple(spec))
    text = str(spec).strip()
    if text.startswith("[") and text.endswith("]"):
        return Param(key, "choice", tuple(_value(v) for v in text[1:-1].split(",") if v.strip()))
    m = _SPEC.match(text)
    if not m:
        raise SweepError(f"search space '{key}={text}': use log(a,b), float(a,b), int(a,b), choice(x,...) or [x,...]")
    kind, values = m.group(1), tuple(_value(v) for v in m.group(2).split(","))
    if kind != "choice":
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
            raise SweepError(f"search space '{key}={text}': {kind}(a,b) takes two numbers a < b")
        if kind == "log" and values[0] <= 0:
            raise SweepError(f"search space '{key}={text}': log(a,b) needs a > 0")
    return Param(key, kind, values)


def parse_space(entries: list[str], base_keys: set[str]) -> list[Param]:
    """`KEY=SPEC` entries and YAML files of `KEY: SPEC`, checked against the config's keys."""
    import yaml

    items: list[tuple[str, object]] = []
    for entry in entries:
        if entry.endswith((".yaml", ".yml")) and Path(entry).is_file():
            loaded = yaml.safe_load(Path(entry).read_text()) or {}
            if not isinstance(loaded, dict):
                raise SweepError(f"search space file {entry} must hold KEY: SPEC lines")
            items += list(flatten(loaded).items())
        elif "=" in entry:
            k, v = entry.split("=", 1)
            items.append((k.strip(), v))
        else:
            raise SweepError(f"search space entry '{entry}' is neither KEY=SPEC nor a .yaml file")
    params = [parse_param(k, v) for k, v in items]
    for p in params:
        if p.key not in base_keys:
            raise SweepError(f"search space key '{p.key}' is not a config key (see python -m dist_resnet.train --help)")
    if not params:
        raise SweepError("an empty search space: give --space KEY=SPEC (e.g. --space 'optim.lr=log(0.05,2)')")
    return params


# ---------------------------------------------------------------- study
def make_storage(url: str | None, sweep_dir: Path, heartbeat: int):
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if not url:
        return JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    url = _driver(url)
    if url.startswith(("postgresql", "mysql", "sqlite")):
        for attempt in range(4):  # workers that start together race to create the tables: the losers retry
            try:
                return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
            except ImportError as e:
                raise SweepError(f"the storage {_safe_url(url)} needs its database driver: {e}; for PostgreSQL: "
                                 "pip install 'dist_resnet[sweep]'") from None
            except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors: say which storage and why
                if attempt == 3:
                    raise SweepError(f"cannot open the sweep storage {_safe_url(url)}: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200]}") from None
                time.sleep(1 + attempt + random.random())
    raise SweepError(f"--storage {_safe_url(url)}: give an RDB URL (postgresql://...) or leave it out for a "
                     f"journal file in {sweep_dir}")


def _driver(url: str) -> str:
    """postgresql:// with the driver that is installed: SQLAlchemy 2.1 picks psycopg (3) for a bare
    postgresql://, the `sweep` extra installs psycopg2."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and not importlib.util.find_spec("psycopg") \
            and importlib.util.find_spec("psycopg2"):
        return f"postgresql+psycopg2{sep}{rest}"
    return url


def _safe_url(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]+@", r"://\1:***@", url)


def make_sampler(name: str, params: list[Param], seed: int | None):
    import optuna

    if name == "grid":
        bad = [p.key for p in params if p.kind != "choice"]
        if bad:
            raise SweepError(f"--sampler grid takes lists or choice(...): {', '.join(bad)} are ranges")
        return optuna.samplers.GridSampler({p.key: list(p.values) for p in params}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str):
    import optuna

    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(),
            "none": lambda: optuna.pruners.NopPruner()}[name]()


# ---------------------------------------------------------------- one trial = one training run
_forkserver = None


def _train_in_child(argv: list[str], env: dict, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.update(env)  # before anything touches CUDA: the forkserver never did
    from . import train

    train.main(argv)


class Forked:
    """`python -m dist_resnet.train ARGV`, forked by a multiprocessing forkserver that has imported torch,
    FFCV and dist_resnet once (and never touched CUDA), with Popen's poll()/returncode."""

    def __init__(self, argv: list[str], env: dict, log: Path):
        import multiprocessing as mp

        global _forkserver
        if _forkserver is None:
            _forkserver = mp.get_context("forkserver")
            _forkserver.set_forkserver_preload(["torch._dynamo", "torch.utils.tensorboard", "dist_resnet.train"])
        self.process = _forkserver.Process(target=_train_in_child, args=(argv, env, str(log)))
        self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    @property
    def returncode(self) -> int | None:
        self.process.join()
        return self.process.exitcode


class TrialFailed(Exception):
    pass


class TrialInterrupted(Exception):
    pass


def final_val_acc(run_dir: Path) -> tuple[list[tuple[int, float]], dict | None]:
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return [], None
    return [(r["epoch"], r["val_acc"]) for r in m.get("history", []) if "val_acc" in r], m


class Sweep:
    def __init__(self, args, params: list[Param]):
        self.args, self.params = args, params
        self.dir = Path(args.out)
        self.stop = threading.Event()
        self.slots: queue.Queue = queue.Queue()
        gpus = self.visible_gpus()
        k = args.gpus_per_trial
        if gpus and k > len(gpus):
            raise SweepError(f"--gpus-per-trial {k} but only {len(gpus)} GPUs are visible")
        for i in range(max(1, len(gpus) // k) if gpus else 1):
            self.slots.put(gpus[i * k:(i + 1) * k] if gpus else [])
        self.parallel = self.slots.qsize()

    @staticmethod
    def visible_gpus() -> list[str]:
        try:
            import torch

            n = torch.cuda.device_count()
        except Exception:  # noqa: BLE001
            n = 0
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d for d in env.split(",") if d] if env else [str(i) for i in range(n)]
        return ids[:n]

    def start(self, run_dir: Path, overrides: list[str], gpus: list[str]):
        """The trial's training, started: torchrun for several GPUs; else a process forked by a forkserver that
        imported torch, FFCV and dist_resnet once (~10 s a trial saved). Its output goes to train.log."""
        argv = [*(["--config", self.args.config] if self.args.config else []), *overrides, f"run.dir={run_dir}",
                "run.progress=false", "train.resume=true"]
        env = {"PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})}
        log = run_dir / "train.log"
        if len(gpus) <= 1:
            return Forked(argv, env, log)
        with open(log, "a") as f:
            return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     f"--nproc_per_node={len(gpus)}", "-m", "dist_resnet.train", *argv],
                                    stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                    start_new_session=True)

    def objective(self, trial) -> float:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        if self.stop.is_set():
            raise TrialInterrupted("the sweep was asked to stop before this trial started")
        origin = trial.user_attrs.get("resume_of")
        if origin is None:  # a stale trial of a dead worker, retried: its number is in the frozen record
            frozen = trial.study.get_trials(deepcopy=False)[trial.number]
            origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        number = trial.number if origin is None else origin
        values = {p.key: p.suggest(trial) for p in self.params}
        overrides = [*self.args.overrides, *(f"{k}={v}" for k, v in values.items())]
        run_dir = self.dir / f"trial-{number:04d}"
        trial.set_user_attr("run_dir", run_dir.name)
        try:
            load_config(self.args.config, [*overrides, f"run.dir={run_dir}"])
        except ConfigError as e:
            trial.set_user_attr("error", f"config: {e}")
            raise TrialFailed(str(e)) from None
        gpus = self.slots.get()
        try:
            return self.run(trial, run_dir, overrides, gpus, values)
        finally:
            self.slots.put(gpus)

    def run(self, trial, run_dir: Path, overrides: list[str], gpus: list[str], values: dict) -> float:
        import optuna

        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        proc = self.start(run_dir, overrides, gpus)
        reported, pruned, stopping = set(), False, False
        epochs = load_config(self.args.config, [*overrides, f"run.dir={run_dir}"]).train.epochs
        while True:
            done = proc.poll() is not None
            for epoch, acc in final_val_acc(run_dir)[0]:
                if epoch not in reported:
                    trial.report(acc, epoch)
                    reported.add(epoch)
                    if not pruned and epoch < epochs and trial.should_prune():
                        pruned = True  # the same verdict however late this loop sees the epoch
                        if not done:  # stop it with a checkpoint; its record stays in the trial folder
                            (run_dir / "STOP").touch()
            if self.stop.is_set() and not (pruned or stopping or done):
                stopping = True  # once: the trainer removes the file when it has handled it
                (run_dir / "STOP").touch()
            if done:
                break
            time.sleep(1.0)
        trial.set_user_attr("seconds", round(time.time() - t0, 1))
        history, m = final_val_acc(run_dir)
        code = proc.returncode
        if pruned:
            raise optuna.TrialPruned(f"pruned at epoch {max(reported)}")
        if code == EXIT_STOPPED and self.stop.is_set():
            trial.study.enqueue_trial(values, user_attrs={"resume_of": int(run_dir.name.split("-")[1])})
            trial.set_user_attr("error", "interrupted: queued to resume from its checkpoint")
            raise TrialInterrupted("interrupted")
        if code != 0 or not history:
            tail = (run_dir / "train.log").read_text().strip().splitlines()[-3:]
            why = {EXIT_DIVERGED: "diverged", EXIT_BAD_INPUT: "bad input"}.get(code, f"exit code {code}")
            message = f"{why}: {' | '.join(tail)[-300:]}" if tail else why
            trial.set_user_attr("error", message)
            print(f"trial {trial.number} failed ({run_dir.name}): {message}", flush=True)
            raise TrialFailed(message)
        return history[-1][1]

    def remaining(self, study) -> int:
        from optuna.trial import TrialState

        counted = [t for t in study.get_trials(deepcopy=False)
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                   or (t.state == TrialState.FAIL and "interrupted" not in str(t.user_attrs.get("error", "")))]
        return self.args.trials - len(counted)

    def work(self, study) -> None:
        """One slot's loop: a trial at a time, until the study holds --trials trials or a stop."""
        try:
            while not self.stop.is_set() and self.remaining(study) > 0:
                study.optimize(self.objective, n_trials=1, catch=(TrialFailed, TrialInterrupted),
                               gc_after_trial=False, show_progress_bar=False)
        except BaseException as e:  # noqa: BLE001 - a bug, or the storage gone: stop every slot, report it
            self.errors.append(e)
            self.stop.set()

    def optimize(self, study) -> None:
        self.errors: list[BaseException] = []
        threads = [threading.Thread(target=self.work, args=(study,), daemon=True) for _ in range(self.parallel)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
        if self.errors:
            raise self.errors[0]


# ---------------------------------------------------------------- results
def rows(study, params: list[str]) -> tuple[list[dict], int | None]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(done, key=lambda t: t.value).number if done else None
    out = []
    for t in trials:
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_complete and t.datetime_start:
            seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        last = max(t.intermediate_values) if t.intermediate_values else None
        note = t.user_attrs.get("error", "")
        state = "interrupted" if t.state == TrialState.FAIL and note.startswith("interrupted") else t.state.name.lower()
        out.append({"trial": t.number, "best": "*" if t.number == best else "", "state": state,
                    "val_acc": t.value if t.value is not None else (t.intermediate_values[last] if last else None),
                    "epochs": last, **{k: t.params.get(k) for k in params}, "seconds": seconds,
                    "run_dir": t.user_attrs.get("run_dir", ""), "note": note})
    return out, best


def markdown(table: list[dict]) -> str:
    if not table:
        return "(no trials yet)\n"
    cols = list(table[0])

    def cell(v):
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]).replace("|", "/") for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def write_results(sweep_dir: Path, study, params: list[str], config: str | None, overrides: list[str]) -> dict:
    table, best = rows(study, params)
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    write_text(sweep_dir / "results.csv", buf.getvalue())
    states = [r["state"] for r in table]
    summary = (f"{len(table)} trials: {states.count('complete')} complete, {states.count('pruned')} pruned, "
               f"{states.count('fail')} failed" + (f", {states.count('interrupted')} interrupted and resumed"
                                                   if "interrupted" in states else ""))
    write_text(sweep_dir / "results.md", f"# Sweep {study.study_name}\n\n{summary}; selection on validation "
                                         f"accuracy (best marked *).\n\n" + markdown(table))
    out = {"table": table, "best": best, "summary": summary}
    if best is not None:
        t = study.trials[best]
        best_overrides = [*overrides, *(f"{k}={v}" for k, v in t.params.items())]
        cfg = load_config(config, [*best_overrides, f"run.dir={sweep_dir / 'final'}"])
        write_text(sweep_dir / "best.yaml", f"# best trial {best} of study {study.study_name}: val_acc "
                                            f"{t.value:.4f}\n" + to_yaml(cfg))
        out.update({"best_value": t.value, "best_params": t.params, "best_overrides": best_overrides})
    return out


def load_study(sweep_dir: Path, url: str | None = None):
    import optuna

    try:
        meta = json.loads((sweep_dir / "sweep.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise SweepError(f"{sweep_dir} holds no sweep (no readable sweep.json)") from None
    url = url or meta["storage"]
    if url and "***" in url:
        raise SweepError(f"{sweep_dir}'s study lives in {url}: pass --storage URL with its password")
    storage = make_storage(url, sweep_dir, 60)
    return optuna.load_study(study_name=meta["study"], storage=storage), meta


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dist_resnet.sweep", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset of every trial")
    p.add_argument("--study", help="the study's name (the same name and storage: the same study)")
    p.add_argument("--trials", type=int, default=10, help="trials in the study, all workers together")
    p.add_argument("--out", help="SWEEP_DIR")
    p.add_argument("--space", action="append", default=[], help="KEY=SPEC, or a YAML file of KEY: SPEC")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS, default="median")
    p.add_argument("--storage", default=os.environ.get("SWEEP_STORAGE"),
                   help="an RDB URL (postgresql://...) for workers on many nodes (default: $SWEEP_STORAGE, or a "
                        "journal file in SWEEP_DIR)")
    p.add_argument("--gpus-per-trial", type=int, default=1)
    p.add_argument("--heartbeat", type=int, default=60, help="seconds between an RDB worker's heartbeats")
    p.add_argument("--seed", type=int, default=None, help="the sampler's seed")
    p.add_argument("--final", action="store_true", help="then retrain the best config on the whole train split and "
                                                         "report its test accuracy")
    p.add_argument("--report", metavar="SWEEP_DIR", help="print the results table of a sweep and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides of every trial's config")
    args = p.parse_intermixed_args(argv)
    try:
        if args.report:
            study, meta = load_study(Path(args.report), args.storage)
            result = write_results(Path(args.report), study, meta["params"], meta["config"], meta["overrides"])
            print(f"{result['summary']}\n\n" + markdown(result["table"]), end="")
            return result
        return run_sweep(args)
    except (SweepError, ConfigError) as e:
        print(f"dist_resnet.sweep: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def run_sweep(args) -> dict:
    import optuna

    if not args.study or not args.out:
        raise SweepError("--study NAME and --out SWEEP_DIR are required (or --report SWEEP_DIR)")
    if args.trials < 1 or args.gpus_per_trial < 1:
        raise SweepError("--trials and --gpus-per-trial must be >= 1")
    if any(o.startswith("run.dir=") for o in args.overrides):
        raise SweepError("run.dir is set per trial (SWEEP_DIR/trial-NNNN); leave it out")
    base = merged(args.config, [*args.overrides])
    if not base.data.val_fraction:
        raise SweepError("a sweep selects on validation accuracy, never on test: hold out a validation split with "
                         "data.val_fraction (e.g. data.val_fraction=0.1)")
    load_config(args.config, [*args.overrides, "run.dir=unused"])  # the base config is valid
    params = parse_space(args.space, set(flatten(to_dict(load_config(None, ["data.dir=x", "run.dir=x"])))))
    sweep_dir = Path(args.out)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    meta = {"study": args.study, "storage": args.storage, "config": args.config, "overrides": args.overrides,
            "params": [q.key for q in params], "space": {q.key: [q.kind, list(q.values)] for q in params},
            "sampler": args.sampler, "pruner": args.pruner, "trials": args.trials}
    write_json(sweep_dir / "sweep.json", {**meta, "storage": _safe_url(args.storage) if args.storage else None})
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines and table say what happened
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = make_storage(args.storage, sweep_dir, args.heartbeat)
    for attempt in range(4):  # the same race, for the study itself
        try:
            study = optuna.create_study(study_name=args.study, storage=storage, direction="maximize",
                                        sampler=make_sampler(args.sampler, params, args.seed),
                                        pruner=make_pruner(args.pruner), load_if_exists=True)
            break
        except Exception:  # noqa: BLE001
            if attempt == 3:
                raise
            time.sleep(1 + attempt + random.random())
    sweep = Sweep(args, params)
    if args.sampler == "grid":  # a grid has so many points: more trials would only repeat them
        import math

        args.trials = min(args.trials, args.trials - sweep.remaining(study) + math.prod(len(q.values) for q in params))

    def on_signal(signum, frame):
        print(f"dist_resnet.sweep: got {signal.Signals(signum).name}: running trials checkpoint and stop, and are "
              "queued to resume", file=sys.stderr, flush=True)
        sweep.stop.set()

    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, on_signal)
    print(f"sweep {args.study}: {args.trials} trials, {sweep.parallel} at a time, sampler {args.sampler}, pruner "
          f"{args.pruner}, storage {_safe_url(args.storage) if args.storage else sweep_dir / 'study.journal'}",
          flush=True)
    sweep.optimize(study)
    result = write_results(sweep_dir, study, meta["params"], args.config, args.overrides)
    print(f"{result['summary']}\n\n" + markdown(result["table"]), end="", flush=True)
    if sweep.stop.is_set():
        raise SystemExit(EXIT_STOPPED)
    if args.final and "best_overrides" in result:
        result["final"] = final(args, sweep_dir, result["best_overrides"])
    return result


def final(args, sweep_dir: Path, best_overrides: list[str]) -> dict:
    """The best config, retrained on the whole train split; its test accuracy, reported once."""
    run_dir = sweep_dir / "final"
    cmd = [sys.executable, "-m", "dist_resnet.train", *(["--config", args.config] if args.config else []),
           *best_overrides, "data.val_fraction=0", f"run.dir={run_dir}", "run.progress=false", "train.resume=true"]
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise SweepError(f"the final run of the best config failed (exit code {code}); see {run_dir}")
    m = json.loads((run_dir / "metrics.json").read_text())
    print(f"final: the best config on the whole train split: test acc {m['test_acc']:.4f} on {m['test_count']} "
          f"images -> {run_dir}", flush=True)
    return {"test_acc": m["test_acc"], "test_count": m["test_count"], "run_dir": str(run_dir)}


if __name__ == "__main__":
    main()
