"""python -m dist_resnet.sweep: start or join a study and run its trials, print a sweep's results, and
retrain the best config on the whole train split (--final)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from .. import rundir
from ..config import ConfigError, flatten, load_config, merged, to_dict, to_yaml
from ..distributed import EXIT_BAD_INPUT, EXIT_STOPPED
from ..fileio import write_json, write_text
from ..tracking import sweep_tracking
from . import __doc__ as DOC
from .orchestrate import Sweep
from .results import markdown, write_results
from .space import SweepError, parse_space
from .storage import (BASE, META, PRUNERS, SAMPLERS, load_study, make_pruner, make_sampler, make_storage, open_study,
                      safe_url)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist_resnet.sweep", description=DOC.split("\n\n")[0],
                                epilog=DOC.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--folds", type=int, default=0, help="K-fold cross-validation: each trial trains K folds of the "
                                                         "train split (data.folds=K); its value is their mean")
    p.add_argument("--final", action="store_true", help="then retrain the best config on the whole train split and "
                                                         "report its test accuracy")
    p.add_argument("--report", metavar="SWEEP_DIR", help="print the results table of a sweep and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides of every trial's config")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_intermixed_args(argv)
    try:
        if args.report:
            study, meta = load_study(Path(args.report), args.storage)
            result = write_results(Path(args.report), study, meta["params"], meta["overrides"], meta.get("folds", 0))
            print(f"{result['summary']}\n\n" + markdown(result["table"]), end="")
            return result
        return run_sweep(args)
    except (SweepError, ConfigError) as e:
        print(f"dist_resnet.sweep: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def base_config(args):
    """The trials' config as a trial runs it: with --folds K, fold 0's keys (each trial sets its own fold),
    so that what needs a validation split (early stopping) is checked against the one the trials have."""
    folds = [f"data.folds={args.folds}", "data.fold=0"] if args.folds else []
    return load_config(args.config, [*args.overrides, *folds, "run.dir=unused"])


def check_args(args) -> list:
    """The sweep's arguments and base config, checked before anything is written; the parameters."""
    if not args.study or not args.out:
        raise SweepError("--study NAME and --out SWEEP_DIR are required (or --report SWEEP_DIR)")
    if args.trials < 1 or args.gpus_per_trial < 1:
        raise SweepError("--trials and --gpus-per-trial must be >= 1")
    if any(o.startswith("run.dir=") for o in args.overrides):
        raise SweepError("run.dir is set per trial (SWEEP_DIR/trial-NNNN); leave it out")
    data = merged(args.config, [*args.overrides]).data
    if args.folds and (args.folds < 2 or data.val_fraction or data.folds):
        raise SweepError(f"--folds {args.folds}: K must be >= 2, and the folds are the validation splits: leave "
                         "data.val_fraction and data.folds out of the trials' config")
    if not args.folds and not (data.val_fraction or data.folds):
        raise SweepError("a sweep selects on validation accuracy, never on test: hold out a validation split with "
                         "data.val_fraction (e.g. data.val_fraction=0.1), or cross-validate with --folds K")
    base_config(args)  # the base config as each trial will run it, and as --final will

    if args.final:
        load_config(args.config, [*args.overrides, *FINAL, "train.early_stop_patience=0", "run.dir=unused"])
    meta = Path(args.out) / META
    if meta.is_file():
        held = json.loads(meta.read_text()).get("study")
        if held != args.study:  # trial folders are numbered per study: a second study would reuse them
            raise SweepError(f"{args.out} holds the sweep of study '{held}': give this study its own --out "
                             f"folder, or --study {held} to extend that one")
    return parse_space(args.space, set(flatten(to_dict(load_config(None, ["data.dir=x", "run.dir=x"])))))


def run_sweep(args) -> dict:
    import optuna

    params = check_args(args)
    sweep_dir = Path(args.out)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tied, parent = sweep_tracking(base_config(args), args.study, sweep_dir,
                                  {q.key: f"{q.kind}{list(q.values)}" for q in params}, print)
    args.overrides = [*args.overrides, *tied]  # every trial: a child run of the sweep's
    meta = {"study": args.study, "storage": safe_url(args.storage) if args.storage else None, "config": args.config,
            "overrides": args.overrides, "params": [q.key for q in params],
            "space": {q.key: [q.kind, list(q.values)] for q in params}, "sampler": args.sampler,
            "pruner": args.pruner, "trials": args.trials, "folds": args.folds}
    write_json(sweep_dir / META, meta)
    # the base config itself, so that --report and --final need nothing outside the sweep folder
    write_text(sweep_dir / BASE, to_yaml(base_config(args)))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines and table say what happened
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = make_storage(args.storage, sweep_dir, args.heartbeat)
    study = open_study(args.study, storage, make_sampler(args.sampler, params, args.seed), make_pruner(args.pruner))
    sweep = Sweep(args, params, storage)
    sweep.reap(study)  # before the counts: a trial of a dead worker would be counted as running
    if args.sampler == "grid":  # a grid has so many points: more trials would only repeat them
        args.trials = min(args.trials, args.trials - sweep.remaining(study) + sweep.unvisited(study))
    stop_on_signals(sweep)
    print(f"sweep {args.study}: {args.trials} trials, {sweep.parallel} at a time, sampler {args.sampler}, pruner "
          f"{args.pruner}, storage {meta['storage'] or sweep_dir / 'study.journal'}", flush=True)
    sweep.optimize(study)
    result = write_results(sweep_dir, study, meta["params"], args.overrides, args.folds)
    print(f"{result['summary']}\n\n" + markdown(result["table"]), end="", flush=True)
    if parent is not None:
        parent.scalars({"best_val_acc": result.get("best_value", float("nan"))}, len(result["table"]))
        parent.files([sweep_dir / "results.md", sweep_dir / "results.csv"])
        parent.close("KILLED" if sweep.stop.is_set() else "FINISHED")
    if sweep.stop.is_set():
        raise SystemExit(EXIT_STOPPED)
    if args.final and "best_overrides" in result:
        result["final"] = final(args, sweep_dir, result["best_overrides"], result.get("best_epochs_needed"))
    return result


def stop_on_signals(sweep: Sweep) -> None:
    """SIGUSR1/SIGTERM (slurm/sweep.sh): running trials checkpoint and stop, and are queued to resume."""
    def on_signal(signum, frame):
        print(f"dist_resnet.sweep: got {signal.Signals(signum).name}: running trials checkpoint and stop, and are "
              "queued to resume", file=sys.stderr, flush=True)
        sweep.stop.set()

    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, on_signal)


FINAL = ["data.val_fraction=0", "data.folds=0"]  # the final run trains on the whole train split


def final_keys(sweep_dir: Path, best_overrides: list[str], epochs_needed: int | None) -> tuple[list[str], str]:
    """The final run's keys beyond the best config's, and what they change. Without a validation split
    there is nothing to stop early on: with early stopping in the config, the final run trains as many
    epochs as the best trial needed (its stop, or its folds' mean), as practitioners refit after
    cross-validation."""
    cfg = load_config(sweep_dir / BASE, [*best_overrides, "run.dir=unused"])
    if not cfg.train.early_stop_patience:
        return list(FINAL), ""
    epochs = epochs_needed or cfg.train.epochs
    return [*FINAL, f"train.epochs={epochs}", "train.early_stop_patience=0", "train.max_steps=0"], (
        f"early stopping off (no validation split); {epochs} epochs, as many as the best trial needed")


def final(args, sweep_dir: Path, best_overrides: list[str], epochs_needed: int | None = None) -> dict:
    """The best config, retrained on the whole train split; its test accuracy, reported once. A final run
    that was stopped resumes (train.resume only where it has a checkpoint)."""
    run_dir = sweep_dir / "final"
    keys, note = final_keys(sweep_dir, best_overrides, epochs_needed)
    if note:
        print(f"final: {note}", flush=True)
    resume = ["train.resume=true"] if (run_dir / "last.pt").exists() else []
    cmd = [sys.executable, "-m", "dist_resnet.train", "--config", str(sweep_dir / BASE), *best_overrides, *keys,
           f"run.dir={run_dir}", "run.progress=false", *resume]
    code = subprocess.run(cmd).returncode
    if code != 0:
        where = f"see {run_dir}" if run_dir.is_dir() else "its error is above"
        raise SweepError(f"the final run of the best config failed (exit code {code}); {where}")
    m = rundir.read_metrics(run_dir)
    print(f"final: the best config on the whole train split: test acc {m['test_acc']:.4f} on {m['test_count']} "
          f"images -> {run_dir}", flush=True)
    return {"test_acc": m["test_acc"], "test_count": m["test_count"], "run_dir": str(run_dir), "note": note,
            "epochs": load_config(sweep_dir / BASE, [*best_overrides, *keys, "run.dir=unused"]).train.epochs}
