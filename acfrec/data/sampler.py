"""Vectorised BPR triple sampling: (user, positive, negative) with negatives outside the history.

No Python loop per sample: negatives are drawn for the whole epoch at once and only the few that
hit a training item are redrawn, round by round, with a sorted-key membership test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


def interaction_keys(matrix: sp.csr_matrix) -> np.ndarray:
    """Sorted int64 keys ``user * n_items + item`` of the non-zeros of ``matrix``."""
    coo = matrix.tocoo()
    keys = coo.row.astype(np.int64) * matrix.shape[1] + coo.col.astype(np.int64)
    keys.sort()
    return keys


def is_member(sorted_keys: np.ndarray, users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Boolean mask: does (users[k], items[k]) appear among ``sorted_keys``. Shapes broadcast."""
    keys = users.astype(np.int64) * n_items + items.astype(np.int64)
    position = np.searchsorted(sorted_keys, keys)
    position = np.minimum(position, max(sorted_keys.size - 1, 0))
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    return sorted_keys[position] == keys


def sample_negatives(
    rng: np.random.Generator,
    users: np.ndarray,
    n_items: int,
    sorted_keys: np.ndarray,
    n_per_user: int = 1,
    max_rounds: int = 100,
) -> np.ndarray:
    """Uniform negatives not in each user's history.

    Args:
        users: ``(n,)`` user indices.
        sorted_keys: from :func:`interaction_keys` over the items to avoid.
    Returns:
        ``(n, n_per_user)`` int64 items. Users who have consumed every item cannot get a
        negative; a ValueError names the first one after ``max_rounds`` redraws.
    """
    users = np.asarray(users, dtype=np.int64)
    negatives = rng.integers(0, n_items, size=(users.size, n_per_user), dtype=np.int64)
    user_grid = np.broadcast_to(users[:, None], negatives.shape)
    bad = is_member(sorted_keys, user_grid, negatives, n_items)
    for _ in range(max_rounds):
        if not bad.any():
            return negatives
        negatives[bad] = rng.integers(0, n_items, size=int(bad.sum()), dtype=np.int64)
        bad[bad] = is_member(sorted_keys, user_grid[bad], negatives[bad], n_items)
    if bad.any():
        user = int(user_grid[bad][0])
        raise ValueError(f"could not sample a negative for user index {user}: it has interacted with (nearly) every item")
    return negatives


@dataclass
class BPRBatch:
    """One batch of training triples; ``negatives`` is ``(batch, n_negatives)``."""

    users: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray


class BPRSampler:
    """Yields shuffled epochs of (user, positive, negatives) over the training matrix.

    One epoch visits every training interaction once as a positive, in a seeded random order,
    each with ``n_negatives`` uniform negatives outside the user's training history.
    """

    def __init__(self, train: sp.csr_matrix, batch_size: int = 1024, n_negatives: int = 1, seed: int = 0) -> None:
        if train.nnz == 0:
            raise ValueError("cannot sample BPR triples from an empty training matrix")
        self.train = train.tocsr()
        self.batch_size = int(batch_size)
        self.n_negatives = int(n_negatives)
        self.rng = np.random.default_rng(seed)
        coo = self.train.tocoo()
        self.users = coo.row.astype(np.int64)
        self.items = coo.col.astype(np.int64)
        self.sorted_keys = interaction_keys(self.train)

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.users.size // self.batch_size)

    def epoch(self) -> Iterator[BPRBatch]:
        order = self.rng.permutation(self.users.size)
        users, positives = self.users[order], self.items[order]
        negatives = sample_negatives(self.rng, users, self.train.shape[1], self.sorted_keys, self.n_negatives)
        for start in range(0, users.size, self.batch_size):
            stop = start + self.batch_size
            yield BPRBatch(users[start:stop], positives[start:stop], negatives[start:stop])

    def state(self) -> dict:
        """RNG state, so a resumed run continues the same sequence of epochs."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
