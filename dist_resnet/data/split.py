"""The validation split held out of the train beton: class-stratified, drawn from its own seed; or fold i
of a class-stratified K-fold split of it (scikit-learn's StratifiedKFold, shuffled by that seed)."""
from __future__ import annotations

import numpy as np

from .manifest import Betons, DataError


def fold_indices(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions of fold `fold` of `folds`: every class spread evenly over the folds, the folds
    disjoint and covering all images, fixed by `seed` alone (the same on every rank, world size and trial)."""
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(labels).min(initial=len(labels)) if len(labels) else 0)
    if smallest < folds:
        raise DataError(f"data.folds={folds} needs at least {folds} train images of every class; the rarest has "
                        f"{smallest}: use fewer folds")
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    train, val = next(s for i, s in enumerate(splits) if i == fold)
    return np.sort(train), np.sort(val)


def split_indices(betons: Betons, val_fraction: float, val_seed: int, folds: int = 0,
                  fold: int = 0) -> tuple[np.ndarray | None, np.ndarray]:
    """(train, val) indices into the train beton: `val_fraction` of every class held out, drawn from
    `val_seed` alone, so every rank, world size, seed and sweep trial sees the same split.
    With `folds`: fold `fold` of the stratified K-fold split is held out instead.
    Without a split: (None, no indices), and training uses the whole beton."""
    if folds:
        return fold_indices(betons.train_labels(), folds, fold, val_seed)
    if not val_fraction:
        return None, np.arange(0)
    labels = betons.train_labels()
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(val_fraction * len(members)))
        val.append(np.random.default_rng([val_seed, int(c)]).choice(members, k, replace=False))
    val = np.sort(np.concatenate(val))
    if len(val) == 0:
        raise DataError(f"data.val_fraction={val_fraction} holds out no image of the {len(labels)} train images; "
                        "raise it")
    return np.setdiff1d(np.arange(len(labels)), val), val
