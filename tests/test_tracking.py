"""Experiment tracking against a real `mlflow server` on loopback (SQLite backend, a local artifact root),
read back with MlflowClient; W&B in offline mode, read from its run files; the CSV log; a tracking server
that does not answer; and a 3-fold sweep whose trials' folds are child runs of the sweep's run."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_resnet.checkpoint import load
from tests.conftest import TINY
from dist_resnet.distributed import EXIT_STOPPED
from tests.launch import Ranks, free_port, launch
from tests.runs import metrics

mlflow = pytest.importorskip("mlflow", reason="the tracking extra is not installed: pip install -e '.[tracking]'")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(d / "server.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                          "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination",
                          str(d / "artifacts"), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=d,
                         # no job runner: MLflow 3 starts 8 more Python processes for its server-side jobs (prompt
                         # optimisation, scorers), which the tracking API does not use: 20 s of CPU in the suite
                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            import urllib.request

            urllib.request.urlopen(uri + "/health", timeout=2).read()
            break
        except OSError:
            if p.poll() is not None:
                pytest.skip(f"mlflow server exited {p.returncode}: {(d / 'server.log').read_text()[-500:]}")
            time.sleep(0.5)
    else:
        p.kill()
        pytest.skip("mlflow server did not answer within 120 s")
    yield uri
    p.terminate()
    p.wait(30)
    log.close()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def wandb_records(run_dir: Path) -> list:
    """Every record of the W&B offline run files in run.dir: the LevelDB log format of `.wandb` files
    (a 7-byte W&B header, then 32 KiB blocks of records: crc32c, length, type, protobuf bytes)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pieces = f.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            pieces += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL, LAST
                record = pb.Record()
                record.ParseFromString(pieces)
                out.append(record)
                pieces = b""
            elif kind == 0:
                break
    return out


def logged_steps(run_dir: Path) -> dict[int, float]:
    return {int(p[0]): p[1] for r in metrics(run_dir)["history"] for p in r["steps"]}


TRACKED = [*TINY, "train.epochs=2", "data.val_fraction=0.2", "train.log_every=2", "train.stop_check_every=2",
           "run.csv=true", "run.wandb=offline", "run.pictures=true"]


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tiny_betons, tmp_path_factory):
    """A run stopped by SIGUSR1 (Slurm's preemption notice) in epoch 2 and resumed: one MLflow run, one W&B
    run id, one CSV log."""
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    argv = [*TRACKED, f"data.dir={tiny_betons}", f"run.dir={run_dir}", f"run.mlflow={mlflow_server}"]
    log = run_dir.with_name("log")
    ranks = Ranks("dist_resnet.train", argv, log)
    deadline = time.time() + 120
    while "epoch   1 train loss" not in ranks.output() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(ranks.pids[0], signal.SIGUSR1)
    assert ranks.wait() == [EXIT_STOPPED], ranks.output()  # in epoch 2, or at the end of epoch 1
    assert metrics(run_dir)["stopped"] and load(run_dir / "last.pt")["epoch"] <= 1
    first_id = json.loads((run_dir / "tracking.json").read_text())
    assert client(mlflow_server).get_run(first_id["mlflow_run_id"]).info.status == "KILLED"
    assert launch("dist_resnet.train", [*argv, "train.resume=true"], log) == [0], log.read_text()
    return run_dir, first_id


def test_mlflow_holds_the_params_metrics_and_artifacts_of_a_resumed_run(mlflow_server, tracked_run):
    run_dir, first = tracked_run
    ids = json.loads((run_dir / "tracking.json").read_text())
    assert ids["mlflow_run_id"] == first["mlflow_run_id"]  # the resumed run continued the same MLflow run
    c = client(mlflow_server)
    run = c.get_run(ids["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["optim.lr"] == "0.4" and params["data.val_fraction"] == "0.2" and params["model.width"] == "8"
    steps = logged_steps(run_dir)
    history = {}
    for m in c.get_metric_history(run.info.run_id, "train/loss"):  # a step logged again after the resume: the same
        assert m.value == pytest.approx(steps[m.step], rel=1e-12)
        history[m.step] = m.value
    assert sorted(history) == sorted(steps) == [1, *range(2, 17, 2)]  # every 2nd step and the first
    lr = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "train/lr")}
    assert lr[16] == pytest.approx(metrics(run_dir)["history"][-1]["lr"])
    val = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "val/acc")}
    assert val == {r["epoch"]: pytest.approx(r["val_acc"]) for r in metrics(run_dir)["history"]}
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"curves.png", "confusion.png", "per_class.json", "metrics.json", "config.yaml"} <= artifacts
    local = Path(c.download_artifacts(run.info.run_id, "per_class.json", str(run_dir.with_name("dl"))))
    assert json.loads(local.read_text()) == json.loads((run_dir / "per_class.json").read_text())
    print(f"MLflow: {len(params)} params, {len(history)} train/loss steps, {len(val)} val/acc points, "
          f"artifacts {sorted(artifacts)}")


def test_the_csv_log_and_the_wandb_offline_files_hold_the_same_scalars(tracked_run):
    run_dir, first = tracked_run
    steps = logged_steps(run_dir)
    with open(run_dir / "scalars.csv") as f:
        rows = list(csv.DictReader(f))
    loss = {int(r["step"]): float(r["value"]) for r in rows if r["name"] == "train/loss"}
    assert loss == pytest.approx(steps, rel=1e-12)
    assert [float(r["value"]) for r in rows if r["name"] == "val/acc"] == \
        pytest.approx([r["val_acc"] for r in metrics(run_dir)["history"]])
    records = wandb_records(run_dir)
    runs = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    assert runs == {first["wandb_id"]}  # the resumed run wrote to the same W&B run id
    wb = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in items:
                wb[items["_step"]] = items["train/loss"]
    assert wb == pytest.approx(steps, rel=1e-12)


def test_a_tracking_server_that_does_not_answer_costs_a_warning_not_the_run(tiny_betons, tmp_path):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.time()
        codes = launch("dist_resnet.train", [*TINY, "train.epochs=1", f"data.dir={tiny_betons}",
                                             f"run.dir={tmp_path / 'r'}", f"run.mlflow={uri}"], tmp_path / "log")
        took = time.time() - t0
    out = (tmp_path / "log").read_text()
    assert codes == [0], out
    assert f"warning: MLflow at {uri} tracking failed" in out and "it is off for the rest of this run" in out
    assert metrics(tmp_path / "r")["completed"] and took < 60, took  # a 5 s probe, not MLflow's minutes of retries


@pytest.fixture(scope="module")
def folded_sweep(mlflow_server, tiny_betons, tmp_path_factory):
    from dist_resnet import sweep

    out = tmp_path_factory.mktemp("kfold") / "k3"
    args = ["--config", TINY[1], "--study", "k3", "--out", str(out), "--trials", "1", "--folds", "3", "--sampler",
            "random", "--seed", "0", "--pruner", "none", "--space", "optim.lr=log(0.2,0.4)", f"data.dir={tiny_betons}",
            *TINY[2:], "train.epochs=1", f"run.mlflow={mlflow_server}", "run.mlflow_experiment=kfold"]
    return out, sweep.main(args)


def test_a_3_fold_sweep_writes_each_fold_and_the_mean(folded_sweep):
    out, result = folded_sweep
    assert [r["state"] for r in result["table"]] == ["complete"]
    for r in result["table"]:
        folds = [r[f"fold_{i}"] for i in range(3)]
        assert r["val_acc"] == pytest.approx(statistics.fmean(folds)) and r["val_std"] == pytest.approx(
            statistics.stdev(folds))
        held = []
        for i, acc in enumerate(folds):
            run_dir = out / r["run_dir"] / f"fold-{i}"
            split = json.loads((run_dir / "split.json").read_text())
            assert (split["folds"], split["fold"], split["train_count"] + split["val_count"]) == (3, i, 1000)
            assert metrics(run_dir)["val_acc"] == acc and load(run_dir / "last.pt")["config"]["data"]["fold"] == i
            held += split["val_indices"]
        assert sorted(held) == list(range(1000))  # the folds' validation splits: disjoint, all the train images
    md = (out / "results.md").read_text()
    assert "the mean validation accuracy of 3 folds" in md and "| fold_0 | fold_1 | fold_2 | val_std |" in md


def test_a_sweeps_folds_are_child_runs_of_its_mlflow_run(mlflow_server, folded_sweep):
    out, result = folded_sweep
    c = client(mlflow_server)
    exp = c.get_experiment_by_name("kfold")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dist_resnet.sweep") == "k3"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.metrics["best_val_acc"] == pytest.approx(result["best_value"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = sorted(r.info.run_name for r in children)
    assert names == [f"trial-0000/fold-{i}" for i in range(3)]
    for r in children:
        trial, fold = r.info.run_name.split("/")
        row = next(x for x in result["table"] if x["run_dir"] == trial)
        assert r.data.metrics["val/acc"] == pytest.approx(row[f"fold_{fold[-1]}"])
        assert r.data.params["data.folds"] == "3" and r.data.params["data.fold"] == fold[-1]
    assert "results.md" in {a.path for a in c.list_artifacts(parent.info.run_id)}


def test_attempts_kills_and_the_local_store_each_keep_their_place(tiny_betons, tmp_path):
    """An attempt that diverged before any checkpoint, then a fresh start of the same command killed after
    step 17 (checkpoint at step 10, steps 15 logged), resumed from another folder, `run.mlflow=local`:
    two MLflow runs (the fresh start does not continue the diverged one's), the first attempt's CSV kept
    aside, each step once in the CSV, the resumed MLflow run marked where its second copy of steps begins,
    one store in run.dir whatever the current folder, and the artifacts beside it, not in ./mlruns."""
    run_dir, a, b = tmp_path / "run", tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    argv = [*TINY, f"data.dir={tiny_betons}", f"run.dir={run_dir}", "train.epochs=2", "run.csv=true", "run.mlflow=local",
            "run.pictures=true"]
    log = tmp_path / "log"
    assert launch("dist_resnet.train", [*argv, "optim.lr=1e9"], log, cwd=a) == [3], log.read_text()[-2000:]
    assert launch("dist_resnet.train", argv, log, cwd=a, env={"DIST_RESNET_FAULT": "step:17"}) == [-9]
    assert "kept as scalars.1.csv" in log.read_text(), log.read_text()[-2000:]
    assert launch("dist_resnet.train", [*argv, "train.resume=true"], log, cwd=b) == [0], log.read_text()[-2000:]
    rows = list(csv.DictReader(open(run_dir / "scalars.csv")))
    keys = [(r["step"], r["name"], r["epoch"]) for r in rows]
    assert len(keys) == len(set(keys)) and {"15", "20"} <= {r["step"] for r in rows}  # step 15 once, not twice
    assert {r["step"] for r in csv.DictReader(open(run_dir / "scalars.1.csv"))} <= {"1", "2", "3", "4", "5"}
    assert not [p for p in (a, b) for n in ("mlflow.db", "mlruns") if (p / n).exists()]
    store = client(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
    by_lr = {r.data.params["optim.lr"]: r for r in runs}
    assert len(runs) == 2 and by_lr["1000000000.0"].info.status == "FAILED"
    done = by_lr["0.4"]
    assert done.info.status == "FINISHED" and done.data.tags["dist_resnet.resumed_at_step"] == "10"
    assert [m.step for m in store.get_metric_history(done.info.run_id, "resumed_at_step")] == [10]
    assert done.info.artifact_uri.startswith((run_dir / "mlartifacts").as_uri())
    assert "curves.png" in {f.path for f in store.list_artifacts(done.info.run_id)}
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow_uri"] == f"sqlite:///{run_dir / 'mlflow.db'}"


def test_wandb_online_with_a_server_that_never_answers_costs_seconds(tiny_betons, tmp_path):
    """A W&B server that accepts connections and never answers stalled each start by about 100 s; capped,
    it costs one warning and a few seconds, and the run completes."""
    log = tmp_path / "log"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.time()
        codes = launch("dist_resnet.train", [*TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'run'}",
                                             "train.epochs=1", "run.wandb=online"], log, env={
            "WANDB_BASE_URL": f"http://127.0.0.1:{silent.getsockname()[1]}", "WANDB_API_KEY": "x" * 40,
            "WANDB_MODE": "online"})
        seconds = time.time() - t0
    out = log.read_text()
    assert codes == [0] and "warning: W&B tracking failed" in out and metrics(tmp_path / "run")["completed"], out
    first = float(out.split("first step after ")[1].split("s")[0])
    print(f"W&B to a silent server: first step after {first:.1f} s, whole run {seconds:.1f} s")
    assert first < 30, out[-2000:]


def test_the_csv_log_survives_a_failure_while_a_resume_rewrites_it(tmp_path, monkeypatch):
    """A resume drops the CSV rows past its checkpoint by rewriting the file. It was opened with "w" and
    rewritten in place: a kill or an error during the rewrite lost the whole history. The rewrite is now one
    atomic replace: here the rows fail to be written, and the file keeps every row it had."""
    import csv

    from dist_resnet.tracking import CSV, CsvLog

    log = CsvLog(tmp_path, None)
    for step in range(1, 11):
        log.scalars({"loss/train": 2.0 / step}, step)
    log.close("KILLED")
    before = (tmp_path / CSV).read_bytes()

    def fail(self, rows):
        raise OSError("No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    with pytest.raises(OSError, match="No space left"):
        CsvLog(tmp_path, resumed_step=6)
    assert (tmp_path / CSV).read_bytes() == before
    monkeypatch.undo()
    CsvLog(tmp_path, resumed_step=6).close("FINISHED")
    rows = list(csv.DictReader(open(tmp_path / CSV)))
    assert [int(r["step"]) for r in rows] == list(range(1, 7)) and (tmp_path / CSV).read_bytes() in before
