"""The validation split held out of the train beton: class-stratified, drawn from its own seed."""
from __future__ import annotations

import numpy as np

from .manifest import Betons, DataError


def split_indices(betons: Betons, val_fraction: float, val_seed: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(train, val) indices into the train beton: `val_fraction` of every class held out, drawn from
    `val_seed` alone, so every rank, world size, seed and sweep trial sees the same split.
    Without a split: (None, no indices), and training uses the whole beton."""
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
