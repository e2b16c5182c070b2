"""K-fold cross-validation's building block: data.folds=K data.fold=i holds out fold i of a seeded,
class-stratified K-fold split of the train set."""
from __future__ import annotations

import numpy as np
import pytest

from dist_resnet.config import ConfigError, load_config
from dist_resnet.data.manifest import Betons
from dist_resnet.data.split import split_indices


def test_three_folds_are_stratified_disjoint_and_cover_the_train_set(tiny_betons):
    betons = Betons.open(str(tiny_betons))
    labels = betons.train_labels()
    folds = [split_indices(betons, 0.0, 7, 3, i) for i in range(3)]
    vals = [v for _, v in folds]
    assert sorted(np.concatenate(vals).tolist()) == list(range(len(labels)))  # disjoint and covering
    for train, val in folds:
        assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == len(labels)
        per_class = np.bincount(labels[val], minlength=10)
        assert per_class.max() - per_class.min() <= 1  # every class spread evenly (100 per class: 33 or 34)
    again = [split_indices(betons, 0.0, 7, 3, i)[1] for i in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(vals, again))  # the seed alone fixes them
    assert not np.array_equal(vals[0], split_indices(betons, 0.0, 8, 3, 0)[1])


@pytest.mark.parametrize("overrides, message", [
    (["data.folds=1"], "bad value for 'data.folds': 1; it must be >= 2 (0 = off)"),
    (["data.folds=3", "data.fold=3"], "bad value for 'data.fold': 3; it must be in 0..2"),
    (["data.fold=1"], "set data.folds=K first"),
    (["data.folds=3", "data.val_fraction=0.1"], "leave data.val_fraction at 0"),
])
def test_fold_settings_that_cannot_work_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, ["data.dir=x", "run.dir=y", *overrides])


def test_a_k_fold_sweep_refuses_a_validation_fraction_too(tmp_path, capsys):
    from dist_resnet import sweep

    with pytest.raises(SystemExit) as e:
        sweep.main(["--study", "s", "--out", str(tmp_path / "s"), "--folds", "3", "--space", "optim.lr=[0.1]",
                    "data.dir=x", "data.val_fraction=0.1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the folds are the validation splits" in err and len(err.strip().splitlines()) == 1


def test_a_k_fold_sweep_with_early_stopping_scores_best_pt_resumes_between_folds_and_refits(tiny_betons, tmp_path,
                                                                                             monkeypatch, capfd):
    """k-fold with early stopping: the base config is checked as each fold runs it (it used to be refused,
    with two errors that contradicted each other). The sweep's stop lands after fold 0 and before fold 1:
    the trial is queued, never completed on fold 0 alone. Resumed, fold 0 is kept and fold 1 trains; the
    value is the folds' mean at the epochs their best.pt holds (not the last, `patience` evaluations
    later); --final trains on the whole train split for the folds' mean stop epoch, early stopping off."""
    import statistics

    import optuna

    from dist_resnet import rundir, sweep
    from dist_resnet.sweep import folds as folds_module
    from tests.conftest import TINY

    out = tmp_path / "k2"
    args = ["--config", TINY[1], "--study", "es", "--out", str(out), "--trials", "1", "--folds", "2", "--sampler",
            "random", "--seed", "0", "--pruner", "none", "--space", "optim.lr=[0.4]", f"data.dir={tiny_betons}",
            *TINY[2:], "train.epochs=4", "train.early_stop_patience=1", "train.early_stop_min_delta=0.3"]
    done = folds_module.Folds.fold_done

    def then_stop(self, i, acc, needed):  # the stop arrives between the two folds
        done(self, i, acc, needed)
        self.sweep.stop.set()

    monkeypatch.setattr(folds_module.Folds, "fold_done", then_stop)
    with pytest.raises(SystemExit) as e:
        sweep.main(args)
    assert e.value.code == 75
    trial = optuna.load_study(study_name="es", storage=sweep.make_storage(None, out, 60)).trials[0]
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["error"].startswith("interrupted")
    monkeypatch.setattr(folds_module.Folds, "fold_done", done)
    result = sweep.main([*args, "--final"])
    row = next(r for r in result["table"] if r["state"] == "complete")
    assert "already finished" in (out / row["run_dir"] / "fold-0" / "train.log").read_text()  # kept, not retrained
    best, stops = [], []
    for i in range(2):
        m = rundir.read_metrics(out / row["run_dir"] / f"fold-{i}")
        assert m["stopped_early"] and m["stop_epoch"] == 2  # no gain of 0.3 after epoch 1: patience 1 runs out
        best.append(next(r["val_acc"] for r in m["history"] if r["epoch"] == m["monitor_best_epoch"]))
        stops.append(m["stop_epoch"])
    assert row["val_acc"] == pytest.approx(statistics.fmean(best)) and [row["fold_0"], row["fold_1"]] == best
    final = rundir.read_metrics(out / "final")
    assert result["final"]["epochs"] == round(statistics.fmean(stops)) == len(final["history"])
    assert final["completed"] and not final["stopped_early"] and "early stopping off" in result["final"]["note"]
    assert final["test_count"] == 200 and "holds no checkpoint yet" not in capfd.readouterr().out
