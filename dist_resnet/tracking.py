"""Experiment tracking on rank 0: one `Tracker` over backends, chosen once from the config.

- TensorBoard (always): the event files in run.dir.
- `run.csv=true`: run.dir/scalars.csv, one row per scalar (`wall_time,step,epoch,name,value`).
- `run.mlflow=URI` (`local`: an SQLite store in run.dir, or in the sweep's folder for a sweep): the
  flattened config as params, the scalars as metrics, the pictures and per_class.json as artifacts (beside
  an SQLite store, in mlartifacts/). The store is fixed at the first start and kept in tracking.json. A
  sweep's trials are child runs of the sweep's run (`run.mlflow_parent`, set by the sweep). Needs the
  `tracking` extra.
- `run.wandb=offline|online`: a W&B run in run.dir/wandb (offline: no network; `wandb sync` uploads it later).

Per-step scalars are logged at the global step, per-epoch ones at the epoch (as TensorBoard has them;
W&B, whose step must grow, gets them at the global step with `epoch`). A resumed run continues the same
MLflow and W&B run: their ids are kept in run.dir/tracking.json; a fresh start opens new ones. The steps
between the checkpoint and a kill are logged twice (docs/PRACTICES.md says what each backend shows). A
backend that fails (a tracking server
that is down, unreachable or gone mid-run) gives one warning and is switched off: the training goes on,
TensorBoard and metrics.json keep everything.
"""
from __future__ import annotations

import csv
import io
import os
import time
import urllib.request
from pathlib import Path
from typing import Callable

from .config import Config, ConfigError, flatten, to_dict
from .fileio import write_json, write_text

IDS = "tracking.json"  # the MLflow and W&B run ids of this run folder, and where its MLflow store is
CSV = "scalars.csv"
PROBE_TIMEOUT_S = 5.0


def mlflow_uri(value: str, home: Path) -> str:
    """The store `run.mlflow` names, fixed once: `local` is an SQLite file in `home` (the run folder, or the
    sweep's), and a relative SQLite path is made absolute, so a run resumed from another folder (or moved
    with its store) finds the same store, not a new one in the current directory."""
    if value == "local":
        return f"sqlite:///{(home / 'mlflow.db').resolve()}"
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return f"sqlite:///{Path(value[len('sqlite:///'):]).resolve()}"
    return value


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside an SQLite store (MLflow's default is ./mlruns of
    whatever folder the command started in); a server or a file store decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def keep_aside(path: Path) -> Path | None:
    """Move `path` to `name.N.suffix` (the first free N): a fresh start keeps an earlier attempt's file."""
    if not path.exists():
        return None
    n = 1
    while (aside := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(aside)
    return aside


def _ids(run_dir: Path) -> dict:
    import json

    try:
        return json.loads((run_dir / IDS).read_text())
    except (OSError, ValueError):
        return {}


def _remember(run_dir: Path, **ids) -> None:
    write_json(run_dir / IDS, {**_ids(run_dir), **ids})


class TensorBoard:
    name = "TensorBoard"

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir))

    def scalars(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def epoch(self, values: dict, epoch: int, step: int) -> None:
        self.scalars(values, epoch)

    def files(self, paths: list[Path]) -> None:
        pass

    def close(self, status: str) -> None:
        self.writer.close()


class CsvLog:
    """run.csv: the same scalars as TensorBoard in a CSV file, appended to across resumes. A resume first
    drops the rows past the checkpoint's step (logged by the attempt that was killed, and logged again
    now), so each step is in the file once."""

    name = "CSV"
    COLUMNS = ["wall_time", "step", "epoch", "name", "value"]

    def __init__(self, run_dir: Path, resumed_step: int | None):
        path = run_dir / CSV
        if resumed_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resumed_step]
            text = io.StringIO(newline="")
            w = csv.DictWriter(text, fieldnames=self.COLUMNS)
            w.writeheader()
            w.writerows(rows)
            write_text(path, text.getvalue())  # atomic: a kill here leaves the whole old file, never a torn one
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.out = csv.writer(self.file)
        if new:
            self.out.writerow(self.COLUMNS)

    def _rows(self, values: dict, step: int, epoch: int | str) -> None:
        now = f"{time.time():.3f}"
        self.out.writerows([now, step, epoch, k, repr(float(v))] for k, v in values.items())
        self.file.flush()

    def scalars(self, values: dict, step: int) -> None:
        self._rows(values, step, "")

    def epoch(self, values: dict, epoch: int, step: int) -> None:
        self._rows(values, step, epoch)

    def files(self, paths: list[Path]) -> None:
        pass

    def close(self, status: str) -> None:
        self.file.close()


def probe(uri: str) -> None:
    """OSError unless an MLflow server answers at `uri` (http/https) within PROBE_TIMEOUT_S."""
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S) as r:
            r.read()


class MLflow:
    name = "MLflow"

    def __init__(self, uri: str, experiment: str, run_name: str, run_dir: Path, params: dict, parent: str = "",
                 tags: dict | None = None, resumed_step: int | None = None):
        # a server that stops answering costs a few short retries, not MLflow's default 7 with minutes of backoff
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        probe(uri)
        from mlflow.tracking import MlflowClient

        self.client, self.uri, ids = MlflowClient(uri), uri, _ids(run_dir)
        self.run_id = ids.get("mlflow_run_id") if ids.get("mlflow_uri") == uri else None
        if self.run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            exp = found.experiment_id if found is not None else self.client.create_experiment(
                experiment, artifact_location=artifact_root(uri))
            tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
            run = self.client.create_run(exp, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            self.log_params(params)
            _remember(run_dir, mlflow_uri=uri, mlflow_run_id=self.run_id, mlflow_artifacts=run.info.artifact_uri)
        else:  # a resumed run: the same MLflow run, running again (its params are logged already)
            self.client.update_run(self.run_id, status="RUNNING")
            if resumed_step is not None:  # the steps after it are logged again: say where the second copy starts
                self.client.set_tag(self.run_id, "dist_resnet.resumed_at_step", str(resumed_step))
                self.scalars({"resumed_at_step": resumed_step}, resumed_step)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def scalars(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def epoch(self, values: dict, epoch: int, step: int) -> None:
        self.scalars(values, epoch)

    def files(self, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class WandB:
    name = "W&B"

    def __init__(self, mode: str, project: str, run_name: str, run_dir: Path, params: dict, group: str = ""):
        import wandb

        ids = _ids(run_dir)
        # init_timeout: a server that does not answer costs 5 s, not W&B's default 90 (and every resume and
        # sweep trial paid it again); silent: no "Symlinked 1 file" per saved file nor the run's summary block
        settings = wandb.Settings(init_timeout=PROBE_TIMEOUT_S, silent=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=mode, config=params,
                              id=ids.get("wandb_id"), resume="allow", group=group or None, reinit="create_new",
                              settings=settings)
        _remember(run_dir, wandb_id=self.run.id)

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(dict(values), step=step)

    def epoch(self, values: dict, epoch: int, step: int) -> None:
        self.run.log({**values, "epoch": epoch}, step=step)

    def files(self, paths: list[Path]) -> None:
        for p in paths:
            self.run.save(str(p), base_path=str(p.parent), policy="now")

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Guarded:
    """A backend whose failures give one warning and switch it off, instead of ending the training."""

    def __init__(self, make: Callable, name: str, say: Callable):
        self.name, self.say, self.backend = name, say, None
        self.backend = self._try(make)

    def _try(self, fn: Callable, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracking backend must never end a run
            why = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            self.say(f"warning: {self.name} tracking failed ({type(e).__name__}: {why}); it is off for the rest of "
                     "this run (TensorBoard and metrics.json have everything)")
            self.backend = None
            return None

    def __getattr__(self, method: str) -> Callable:
        def forward(*args) -> None:
            if self.backend is not None:
                self._try(getattr(self.backend, method), *args)
        return forward


class Tracker:
    """Rank 0's backends; the other ranks get one with none."""

    def __init__(self, backends: list):
        self.backends = backends

    def scalars(self, values: dict, step: int) -> None:
        for b in self.backends:
            b.scalars(values, step)

    def epoch(self, values: dict, epoch: int, step: int) -> None:
        for b in self.backends:
            b.epoch(values, epoch, step)

    def files(self, paths: list[Path]) -> None:
        for b in self.backends:
            b.files([p for p in paths if p.is_file()])

    def close(self, status: str = "FINISHED") -> None:
        for b in self.backends:
            b.close(status)
        self.backends = []


def check_installed(cfg: Config) -> None:
    """ConfigError for a tracker whose package is missing (checked before the run starts)."""
    import importlib.util

    for on, key, module in ((cfg.run.mlflow, "run.mlflow", "mlflow"), (cfg.run.wandb.value != "off", "run.wandb", "wandb")):
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key} needs the {module} package: pip install 'dist_resnet[tracking]' "
                              f"(or pip install {module}), or leave {key} unset")


def open_tracker(cfg: Config, say: Callable, resumed_step: int | None = None) -> Tracker:
    """The backends the config asks for, in run.dir (rank 0, once its folder is held). Only a resume
    (`resumed_step`: the checkpoint's global step) continues the tracked runs of tracking.json and the CSV;
    a fresh start opens new ones, and keeps an earlier attempt's files aside (scalars.1.csv, ...)."""
    r, run_dir = cfg.run, Path(cfg.run.dir)
    if resumed_step is None:
        for old in (keep_aside(run_dir / IDS), keep_aside(run_dir / CSV)):
            if old is not None:
                say(f"fresh start: an earlier attempt's {old.name.split('.')[0]} file is kept as {old.name}")
    params = flatten(to_dict(cfg))
    # a sweep's trial (or fold) is named with its folder's parent: lr/trial-0003, trial-0003/fold-1
    name = f"{run_dir.parent.name}/{run_dir.name}" if r.mlflow_parent or r.wandb_group else run_dir.name
    backends: list = [TensorBoard(run_dir)]
    if r.csv:
        backends.append(CsvLog(run_dir, resumed_step))
    if r.mlflow:
        uri = _ids(run_dir).get("mlflow_uri") or mlflow_uri(r.mlflow, run_dir)  # a resume: the store it began in
        backends.append(Guarded(lambda: MLflow(uri, r.mlflow_experiment, name, run_dir, params, r.mlflow_parent,
                                               resumed_step=resumed_step), f"MLflow at {uri}", say))
    if r.wandb.value != "off":
        backends.append(Guarded(lambda: WandB(r.wandb.value, r.wandb_project, name, run_dir, params, r.wandb_group),
                                "W&B", say))
    return Tracker(backends)


def sweep_tracking(cfg: Config, study: str, sweep_dir: Path, space: dict, say: Callable) -> tuple[list[str], Guarded | None]:
    """A sweep's own tracking: its MLflow run (made once, its id in SWEEP_DIR/tracking.json), the parent of its
    trials' runs, and its W&B group. The overrides that tie every trial to them, and the parent (or None)."""
    extra, parent = [], None
    if cfg.run.mlflow:  # `local`: the sweep folder's store, for the sweep's run and every trial's
        uri = _ids(sweep_dir).get("mlflow_uri") or mlflow_uri(cfg.run.mlflow, sweep_dir)
        params = {"sweep.study": study, **{f"space.{k}": v for k, v in space.items()}}
        parent = Guarded(lambda: MLflow(uri, cfg.run.mlflow_experiment, f"sweep {study}", sweep_dir, params,
                                        tags={"dist_resnet.sweep": study}), f"MLflow at {uri}", say)
        extra.append(f"run.mlflow={uri}")
        if parent.backend is not None:
            extra.append(f"run.mlflow_parent={parent.backend.run_id}")
    if cfg.run.wandb.value != "off" and not cfg.run.wandb_group:
        extra.append(f"run.wandb_group={study}")
    return extra, parent if parent is not None and parent.backend is not None else None
