"""The leave-one-out ``Split``: the one object every model is trained and scored on.

Built by :func:`acfrec.data.splitting.leave_one_out`; saved as parquet + ``meta.json`` so every
model, ours or a peer's (RecBole atomic-file export), is scored on exactly the same split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from acfrec.data.idmap import IdMap
from acfrec.utils import fingerprint_arrays

Target = Literal["valid", "test"]


@dataclass
class Split:
    """A leave-one-out split over dense user/item indices.

    Attributes:
        train: ``(n_users, n_items)`` CSR float32, 1.0 where the user interacted in training.
        train_frame: training interactions, columns ``user`` (int64), ``item`` (int64),
            ``timestamp`` (float64; file order when the source had none), sorted by user then time
            (stable), so the most recent history of a user is its last rows.
        valid_items: ``(n_users,)`` int64, the held-out validation item, -1 for users without one.
        test_items: ``(n_users,)`` int64, the held-out test item, -1 for users without one.
        negatives: ``(n_users, n_negatives)`` int64 sampled-protocol negatives (items the user
            never interacted with, seeded); rows of users without a test item are -1.
        users, items: id maps from external ids to the dense indices above.
        meta: how it was made (source, tie rule, seed, counts, dropped rows, ...).
    """

    train: sp.csr_matrix
    train_frame: pl.DataFrame
    valid_items: np.ndarray
    test_items: np.ndarray
    negatives: np.ndarray
    users: IdMap
    items: IdMap
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    def target_items(self, target: Target) -> np.ndarray:
        """``(n_users,)`` held-out item per user for ``target``, -1 where none."""
        if target not in ("valid", "test"):
            raise ValueError(f"target must be 'valid' or 'test', got {target!r}")
        return self.valid_items if target == "valid" else self.test_items

    def eval_users(self, target: Target = "test") -> np.ndarray:
        """``(n_eval,)`` int64 users that have a held-out item for ``target``."""
        return np.flatnonzero(self.target_items(target) >= 0).astype(np.int64)

    def seen(self, target: Target = "test") -> sp.csr_matrix:
        """``(n_users, n_items)`` CSR of items excluded from ranking for ``target``.

        Validation ranks against everything but training items; test also excludes the
        validation item (the user has consumed it by test time), as RecBole does.
        """
        if target == "valid":
            return self.train
        rows = np.flatnonzero(self.valid_items >= 0)
        extra = sp.csr_matrix(
            (np.ones(rows.size, dtype=np.float32), (rows, self.valid_items[rows])),
            shape=self.train.shape,
        )
        seen = (self.train + extra).tocsr()
        seen.data[:] = 1.0
        return seen

    @property
    def fingerprint(self) -> str:
        """Content hash of the split (train pairs, held-out items, negatives, id maps)."""
        coo = self.train.tocoo()
        order = np.lexsort((coo.col, coo.row))
        return fingerprint_arrays(
            coo.row[order].astype(np.int64),
            coo.col[order].astype(np.int64),
            self.valid_items,
            self.test_items,
            self.negatives,
            np.asarray(self.users.external_ids.tolist(), dtype=str),
            np.asarray(self.items.external_ids.tolist(), dtype=str),
        )

    def summary(self) -> dict:
        return {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_train": int(self.train.nnz),
            "n_valid": int((self.valid_items >= 0).sum()),
            "n_test": int((self.test_items >= 0).sum()),
            "fingerprint": self.fingerprint,
        }
