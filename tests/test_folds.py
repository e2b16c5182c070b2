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
