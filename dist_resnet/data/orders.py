"""The train split's sample order: one global order per epoch from (seed, epoch), cut into global batches
that each rank slices, so that the order does not depend on the world size and a run resumes at any step.

- `GlobalBatchOrder` (data.order=random): a permutation of every image, each epoch.
- `QuasiRandomOrder` (data.order=quasi_random): for data that does not fit in memory (`data.os_cache=false`,
  FFCV's process cache then holds only the pages that the coming batches need). The pages of the beton
  come in a random order and their images are drawn within a window of about WINDOW pages, so a batch
  reads a few pages, not one per image. FFCV's own QUASI_RANDOM order refuses distributed runs; this one
  is world-size-invariant and resumable like the random one, because it is the same global order cut the
  same way.
"""
from __future__ import annotations

import numpy as np

WINDOW = 6  # pages drawn from at once (FFCV's QUASI_RANDOM buffer)


class GlobalBatchOrder:
    """A sample order that does not depend on the world size.

    Each epoch draws one permutation from (seed, epoch) and cuts it into global
    batches; rank r takes the r-th contiguous slice of every global batch. So 1 rank
    with batch 2B sees, step for step, the union of what 2 ranks with batch B see,
    with no padded duplicates, and a run can resume at any step on any world size.
    (FFCV's `distributed=True` wraps DistributedSampler, whose order and padding
    change with the world size; this replaces it.)
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int, indices: np.ndarray | None = None):
        self.n, self.global_batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.indices = indices  # the beton index of each of the n positions (None: the identity)
        self.steps = n // global_batch
        self.skip: tuple[int, int] | None = None  # (epoch, steps): resume mid-epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's global order: step s takes samples [s * global_batch, (s + 1) * global_batch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)[: self.steps * self.global_batch]

    def sample_order(self, epoch: int) -> np.ndarray:
        """This rank's samples of the epoch, as beton indices (what FFCV asks for)."""
        positions = self.positions(epoch)
        return positions if self.indices is None else self.indices[positions]

    def positions(self, epoch: int) -> np.ndarray:
        """This rank's samples of the epoch, as positions 0..n-1 (a held-out split leaves gaps in the beton)."""
        perm = self.permutation(epoch)
        start = 0
        if self.skip is not None and self.skip[0] == epoch:
            start, self.skip = self.skip[1], None
        share = self.global_batch // self.world
        batches = perm.reshape(self.steps, self.global_batch)
        return np.ascontiguousarray(batches[start:, self.rank * share:(self.rank + 1) * share]).reshape(-1)


class QuasiRandomOrder(GlobalBatchOrder):
    """A global order that reads the beton page by page: each epoch, the pages in a random order, and each
    page's images spread at random over a window of WINDOW pages of that order (image i goes at
    rank(page(i)) + U(0, WINDOW)), so any stretch of the order draws from about WINDOW + 1 pages.
    `pages`: the beton page that holds each of the n positions."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int, indices: np.ndarray | None,
                 pages: np.ndarray, window: float = WINDOW):
        super().__init__(n, global_batch, seed, rank, world, indices)
        self.page_ids, self.page_of = np.unique(np.asarray(pages), return_inverse=True)
        self.window = window

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 0x9A6E])
        place = np.empty(len(self.page_ids))
        place[rng.permutation(len(self.page_ids))] = np.arange(len(self.page_ids))
        t = place[self.page_of] + rng.random(self.n) * self.window
        return np.argsort(t, kind="stable")[: self.steps * self.global_batch]
