"""Early stopping (train.early_stop_*): the rule, the stop of a real run, its resume to the same stop.
The runs have dropout and drop-path on too: their masks must be seeded for the resume to be exact, and
the exported graph must hold neither."""
from __future__ import annotations

import json
import sys

import pytest

from dist_resnet.checkpoint import load
from dist_resnet.engine.monitor import Monitor
from tests.conftest import TINY, run
from tests.launch import launch
from tests.runs import assert_same_run, metrics


def stop_epoch(monitor: Monitor, values: list[float | None]) -> int | None:
    for epoch, v in enumerate(values, 1):
        monitor.update({} if v is None else {monitor.key: v}, epoch)
        if monitor.stopped:
            return epoch
    return None


def test_the_rule_counts_evaluations_without_an_improvement_of_min_delta():
    # accuracy: 0.50 is the reference; +0.005 (< min_delta) is no improvement but is the best (best.pt)
    m = Monitor("val_acc", patience=2, min_delta=0.01)
    assert stop_epoch(m, [0.50, 0.505, 0.52, 0.525, 0.521, 0.9]) == 5
    assert (m.best, m.best_epoch, m.reference) == (0.525, 4, 0.52)
    # loss: lower is better; an epoch without a validation evaluation counts nothing
    m = Monitor("val_loss", patience=2, min_delta=0.1)
    assert stop_epoch(m, [2.0, None, 1.5, 1.45, None, 1.6, 1.0]) == 6
    assert (m.best, m.best_epoch) == (1.45, 4)
    assert stop_epoch(Monitor("val_acc", patience=0), [0.5, 0.4, 0.3, 0.2]) is None  # 0 = off
    # the counter survives a checkpoint
    a = Monitor("val_loss", patience=3)
    stop_epoch(a, [1.0, 1.1, 1.2])
    b = Monitor("val_loss", patience=3)
    b.load_state_dict(a.state_dict())
    assert stop_epoch(b, [1.3]) == 1 and b.best == 1.0


def test_early_stopping_without_a_validation_split_is_a_config_error(tiny_betons, tmp_path):
    p = run([sys.executable, "-m", "dist_resnet.train", *TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'r'}",
             "train.early_stop_patience=2"], check=False)
    assert p.returncode == 2 and "set data.val_fraction" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


STOPPING = [*TINY, "train.epochs=6", "data.val_fraction=0.2", "train.early_stop_patience=2",
            "train.early_stop_monitor=val_loss", "train.early_stop_min_delta=10",  # never improves by 10: stop at 3
            "model.dropout=0.3", "model.drop_path=0.3"]


def train(run_dir, *extra, env=None) -> tuple[int, str]:
    log = run_dir.with_name(run_dir.name + ".log")
    code = launch("dist_resnet.train", [*extra, f"run.dir={run_dir}"], log, env=env)[0]
    return code, log.read_text()


@pytest.fixture(scope="module")
def stopped_run(tiny_betons, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("early") / "run"
    code, log = train(run_dir, *STOPPING, f"data.dir={tiny_betons}")
    assert code == 0, log
    return run_dir


def test_a_run_stops_at_the_evaluation_patience_allows_and_records_it(stopped_run):
    m = metrics(stopped_run)
    assert m["stopped_early"] and m["stop_epoch"] == 3 and m["epochs"] == 3 and m["completed"] and not m["stopped"]
    vals = [r["val_loss"] for r in m["history"]]
    assert m["monitor"] == "val_loss" and m["monitor_best"] == min(vals)
    assert m["monitor_best_epoch"] == vals.index(min(vals)) + 1
    assert "test_acc" in m["history"][-1] and all("test_acc" not in r for r in m["history"][:-1])  # test at the stop
    best = load(stopped_run / "best.pt")
    assert best["epoch"] == m["monitor_best_epoch"] and best["monitor"]["best"] == min(vals)
    assert load(stopped_run / "last.pt")["monitor"]["stop_epoch"] == 3
    assert json.loads((stopped_run / "per_class.json").read_text())["classes"]  # the end of a run: its results
    assert not list(stopped_run.glob("*.png"))  # run.pictures=false (TINY): per_class.json, without the PNGs


def test_a_run_killed_before_its_stop_resumes_to_the_same_stop(stopped_run, tiny_betons, tmp_path):
    run_dir, argv = tmp_path / "run", [*STOPPING, f"data.dir={tiny_betons}"]
    code, _ = train(run_dir, *argv, env={"DIST_RESNET_FAULT": "step:20"})  # in epoch 3
    assert code == -9 and load(run_dir / "last.pt")["epoch"] == 2
    code, out = train(run_dir, *argv, "train.resume=true")
    assert code == 0 and "stopped early after epoch 3" in out
    assert_same_run(stopped_run, run_dir)  # the dropout and drop-path masks too
    code, out = train(run_dir, *argv, "train.resume=true")
    assert code == 0 and "already finished (3 of 6 epochs)" in out


def test_the_exported_graph_has_no_dropout_or_drop_path(stopped_run, tmp_path):
    import onnx

    from dist_resnet import export

    check = export.main([str(stopped_run / "last.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                         "--verify-test-set"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert not ops & {"Dropout", "RandomUniform", "RandomUniformLike", "Bernoulli", "RandomNormal"}, ops
    assert check["check"]["fp32_top1_agreement"] == 1.0 and check["test"]["top1"]["fp32"] == metrics(stopped_run)["test_acc"]
