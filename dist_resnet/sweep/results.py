"""A sweep's results: one row per trial (parameters, validation accuracy, state, epochs, time), as
results.csv and results.md with the best marked, and best.yaml, the winning config as a preset."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..config import load_config, to_yaml
from ..fileio import write_text
from .storage import BASE


def fold_columns(t, folds: int) -> dict:
    """--folds K: each fold's validation accuracy (empty where not done) and their standard deviation."""
    if not folds:
        return {}
    values = t.user_attrs.get("folds") or [None] * folds
    return {**{f"fold_{i}": v for i, v in enumerate(values)}, "val_std": t.user_attrs.get("fold_std")}


def rows(study, params: list[str], folds: int = 0) -> tuple[list[dict], int | None]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(done, key=lambda t: t.value).number if done else None
    out = []
    for t in trials:
        note = t.user_attrs.get("error", "")
        if t.state == TrialState.FAIL and note.startswith(("surplus", "unstarted")):
            continue  # never trained: started after the study was full, or as the sweep stopped
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_complete and t.datetime_start:
            seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        last = max(t.intermediate_values) if t.intermediate_values else None
        labels = {"interrupted": "interrupted", "stale": "retried"}  # queued again: not a failure of their own
        state = next((v for k, v in labels.items() if note.startswith(k)), None) if t.state == TrialState.FAIL else None
        state = state or t.state.name.lower()
        out.append({"trial": t.number, "best": "*" if t.number == best else "", "state": state,
                    "val_acc": t.value if t.value is not None else (t.intermediate_values[last] if last else None),
                    **fold_columns(t, folds), ("folds" if folds else "epochs"): last,
                    **({} if folds else {"best_epoch": t.user_attrs.get("best_epoch")}),
                    **{k: t.params.get(k) for k in params}, "seconds": seconds,
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


def write_results(sweep_dir: Path, study, params: list[str], overrides: list[str], folds: int = 0) -> dict:
    table, best = rows(study, params, folds)
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    write_text(sweep_dir / "results.csv", buf.getvalue())
    states = [r["state"] for r in table]
    summary = (f"{len(table)} trials: {states.count('complete')} complete, {states.count('pruned')} pruned, "
               f"{states.count('fail')} failed" + (f", {states.count('interrupted')} interrupted and resumed"
                                                   if "interrupted" in states else "")
               + (f", {states.count('retried')} retried after their worker died" if "retried" in states else ""))
    how = (f"the mean validation accuracy of {folds} folds, each at the epoch its best.pt holds (val_acc, its "
           "std val_std)" if folds else "validation accuracy at the epoch best.pt holds (best_epoch)")
    write_text(sweep_dir / "results.md", f"# Sweep {study.study_name}\n\n{summary}; selection on {how} "
                                         f"(best marked *).\n\n" + markdown(table))
    out = {"table": table, "best": best, "summary": summary}
    if best is not None:
        t = study.trials[best]
        best_overrides = [*overrides, *(f"{k}={v}" for k, v in t.params.items())]
        searched = [f"{k}={v}" for k, v in t.params.items()]  # base.yaml holds the preset and the overrides
        cfg = load_config(sweep_dir / BASE, [*searched, f"run.dir={sweep_dir / 'final'}"])
        write_text(sweep_dir / "best.yaml", f"# best trial {best} of study {study.study_name}: val_acc "
                                            f"{t.value:.4f}\n" + to_yaml(cfg))
        out.update({"best_value": t.value, "best_params": t.params, "best_overrides": best_overrides,
                    "best_epochs_needed": t.user_attrs.get("epochs_needed")})
    return out
