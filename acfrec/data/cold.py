"""The cold-item split: a seeded share of items is held out entirely, for content cold-start.

Every interaction with a *cold* item goes to the cold test set, so no model sees a cold item in
training or validation; the *warm* items are split by :func:`acfrec.data.splitting.leave_one_out`
as usual, so warm-item quality (HR@10 and friends) is measured exactly as on any other split.

Item layout (one :class:`IdMap` of all items, :attr:`ColdSplit.items`)::

    0 .. n_warm - 1           warm items, in the order of ``warm.items`` (the warm Split's id map)
    n_warm .. n_items - 1     cold items

Both groups keep the relative order of the source :class:`Interactions`. So a model fitted on
``cold.warm`` scores warm item ``j`` at the same index ``j`` in the full item space, and a
content matrix aligned on ``cold.items`` serves warm and cold items alike. Users are the source
users (``cold.warm.users``); a user whose only interactions were with cold items keeps an empty
training row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from acfrec.data.idmap import IdMap
from acfrec.data.interactions import Interactions
from acfrec.data.split import Split, _check_columns, _read_artifact
from acfrec.data.splitting import TieRule, leave_one_out
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.utils import atomic_dir, fingerprint_arrays

FORMAT_VERSION = 1
COLD_FILES = ("meta.json", "items.json", "cold.parquet", "warm")


@dataclass
class ColdSplit:
    """A leave-one-out split of the warm items plus the held-out cold items and their interactions.

    Attributes:
        warm: leave-one-out :class:`Split` over the warm items only, ``(n_users, n_warm)``.
        items: id map of all items, warm first then cold (see the module docstring).
        cold_frame: every interaction with a cold item, columns ``user`` (int64), ``item``
            (int64, full-space index ``>= n_warm``), ``timestamp`` (float64), sorted by user
            then time.
        meta: how it was made (cold_share, seed, counts, the warm split's meta).
    """

    warm: Split
    items: IdMap
    cold_frame: pl.DataFrame
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cold_test = _csr(self.cold_frame, (self.n_users, self.n_items))

    @property
    def users(self) -> IdMap:
        return self.warm.users

    @property
    def n_users(self) -> int:
        return self.warm.n_users

    @property
    def n_warm(self) -> int:
        return self.warm.n_items

    @property
    def n_items(self) -> int:
        """All items, warm and cold."""
        return len(self.items)

    @property
    def n_cold(self) -> int:
        return self.n_items - self.n_warm

    @property
    def cold_items(self) -> np.ndarray:
        """``(n_cold,)`` int64 full-space indices of the cold items (``n_warm .. n_items - 1``)."""
        return np.arange(self.n_warm, self.n_items, dtype=np.int64)

    @property
    def cold_ids(self) -> np.ndarray:
        """``(n_cold,)`` external ids of the cold items."""
        return self.items.external_ids[self.n_warm :]

    def eval_users(self) -> np.ndarray:
        """``(n_eval,)`` int64 users with at least one cold interaction."""
        return np.flatnonzero(np.diff(self.cold_test.indptr) > 0).astype(np.int64)

    def known(self) -> sp.csr_matrix:
        """``(n_users, n_items)`` CSR, 1.0 for every warm interaction (train, valid and test).

        The cold protocol ranks cold items against the warm catalogue without these: a user
        has consumed them, so they are neither relevant nor fair competitors.
        """
        warm = self.warm
        rows = np.flatnonzero(warm.test_items >= 0)
        held = sp.csr_matrix(
            (np.ones(rows.size, dtype=np.float32), (rows, warm.test_items[rows])), shape=warm.train.shape
        )
        known = (warm.seen("test") + held).tocsr()
        known.data[:] = 1.0
        return widen(known, self.n_items)

    @property
    def fingerprint(self) -> str:
        """Content hash: the warm split, the cold interactions and the full item id map."""
        return fingerprint_arrays(
            np.frombuffer(self.warm.fingerprint.encode(), dtype=np.uint8),
            self.cold_frame["user"].to_numpy().astype(np.int64),
            self.cold_frame["item"].to_numpy().astype(np.int64),
            np.asarray(self.items.external_ids.tolist(), dtype=str),
        )

    def summary(self) -> dict:
        return {
            "n_users": self.n_users,
            "n_warm": self.n_warm,
            "n_cold": self.n_cold,
            "n_cold_interactions": int(self.cold_test.nnz),
            "n_cold_users": int(self.eval_users().size),
            "warm": self.warm.summary(),
            "fingerprint": self.fingerprint,
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write folder ``path`` atomically: ``warm/`` (a saved :class:`Split`), ``items.json``
        (all items, warm first), ``cold.parquet`` (user, item, timestamp) and ``meta.json``."""
        path = Path(path)
        payload = {
            "kind": "acfrec.cold_split",
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "summary": self.summary(),
            "meta": self.meta,
        }
        with atomic_dir(path) as tmp:
            self.warm.save(tmp / "warm")
            self.items.save(tmp / "items.json")
            self.cold_frame.write_parquet(tmp / "cold.parquet")
            (tmp / "meta.json").write_text(json.dumps(payload, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ColdSplit:
        """Read a folder written by :meth:`save`; ArtifactError if incomplete, inconsistent or altered."""
        path = Path(path)
        missing = [name for name in COLD_FILES if not (path / name).exists()]
        if missing:
            raise ArtifactError(f"{path} is not a complete saved cold split: missing {', '.join(missing)}")
        payload = _read_artifact(path / "meta.json", lambda p: json.loads(p.read_text()))
        frame = _read_artifact(path / "cold.parquet", pl.read_parquet)
        _check_columns(path / "cold.parquet", frame, ("user", "item", "timestamp"))
        if payload.get("kind") != "acfrec.cold_split" or payload.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path / 'meta.json'}: not an acfrec cold split of format_version {FORMAT_VERSION} "
                f"(kind={payload.get('kind')!r}, format_version={payload.get('format_version')!r})"
            )
        warm = Split.load(path / "warm")
        items = IdMap.load(path / "items.json")
        _check_loaded(path, warm, items, frame)
        cold = cls(warm, items, _typed(frame), payload.get("meta", {}))
        if cold.fingerprint != payload.get("fingerprint"):
            raise ArtifactError(
                f"{path}: content fingerprint {cold.fingerprint} does not match meta.json's "
                f"{payload.get('fingerprint')!r}; the files were changed after saving"
            )
        return cold


def cold_item_split(
    interactions: Interactions,
    cold_share: float = 0.2,
    seed: int = 0,
    *,
    tie_rule: TieRule = "file_order",
    n_negatives: int = 99,
    min_interactions: int = 3,
) -> ColdSplit:
    """Hold out a seeded ``cold_share`` of the items entirely; leave-one-out split the rest.

    Cold items are drawn uniformly (``round(cold_share * n_items)`` of them, seeded); all their
    interactions form the cold test set. The warm interactions are split by
    :func:`~acfrec.data.splitting.leave_one_out` with ``tie_rule``, ``seed``, ``n_negatives``
    and ``min_interactions`` (negatives are drawn among warm items).

    Returns:
        A :class:`ColdSplit`; the same arguments give the same split.
    Raises:
        ValueError: ``cold_share`` outside ``(0, 1)``.
        DataValidationError: too few items for a cold and a warm part (naming the counts).
    """
    if not 0.0 < float(cold_share) < 1.0:
        raise ValueError(f"cold_share must be in (0, 1), got {cold_share}")
    n_items = interactions.n_items
    n_cold = int(round(float(cold_share) * n_items))
    if n_cold < 1 or n_items - n_cold < 1:
        raise DataValidationError(
            f"{interactions.meta.get('source', '<interactions>')}: cold_share={cold_share} of {n_items} "
            f"items gives {n_cold} cold and {n_items - n_cold} warm items; both parts need at least one item"
        )
    is_cold = np.zeros(n_items, dtype=bool)
    is_cold[np.random.default_rng([seed, 2]).permutation(n_items)[:n_cold]] = True
    # Warm items first, then cold, each group in source order: position in the full item space.
    order = np.concatenate([np.flatnonzero(~is_cold), np.flatnonzero(is_cold)])
    new_index = np.empty(n_items, dtype=np.int64)
    new_index[order] = np.arange(n_items)
    items = IdMap(interactions.items.external_ids[order], kind="item")

    frame = interactions.frame.with_columns(pl.Series("item", new_index[interactions.frame["item"].to_numpy()]))
    n_warm = n_items - n_cold
    warm_part = frame.filter(pl.col("item") < n_warm)
    cold_part = frame.filter(pl.col("item") >= n_warm)
    warm_interactions = Interactions(
        frame=warm_part,
        users=interactions.users,
        items=IdMap(items.external_ids[:n_warm], kind="item"),
        meta={**interactions.meta, "cold_items_removed": n_cold},
    )
    warm = leave_one_out(
        warm_interactions, tie_rule=tie_rule, seed=seed, n_negatives=n_negatives, min_interactions=min_interactions
    )
    cold_frame = _typed(cold_part.sort(["user", "timestamp"], maintain_order=True))
    meta = {
        "source": interactions.meta.get("source"),
        "cold_share": float(cold_share),
        "seed": int(seed),
        "layout": "warm items 0..n_warm-1 (warm split order), cold items n_warm..n_items-1",
        "counts": {
            "n_items": n_items,
            "n_warm": n_warm,
            "n_cold": n_cold,
            "n_warm_interactions": warm_part.height,
            "n_cold_interactions": cold_part.height,
        },
        "inputs": {"interactions_fingerprint": interactions.fingerprint, "cold_share": float(cold_share), "seed": int(seed)},
    }
    return ColdSplit(warm=warm, items=items, cold_frame=cold_frame, meta=meta)


def widen(matrix: sp.spmatrix, n_items: int) -> sp.csr_matrix:
    """A ``(n_users, n_warm)`` matrix as ``(n_users, n_items)`` CSR with empty cold columns."""
    matrix = sp.csr_matrix(matrix)
    if matrix.shape[1] > n_items:
        raise DataValidationError(f"cannot widen a matrix of shape {matrix.shape} to {n_items} items")
    return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), shape=(matrix.shape[0], n_items))


def _typed(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(
        pl.col("user").cast(pl.Int64), pl.col("item").cast(pl.Int64), pl.col("timestamp").cast(pl.Float64)
    )


def _csr(frame: pl.DataFrame, shape: tuple[int, int]) -> sp.csr_matrix:
    users, items = frame["user"].to_numpy(), frame["item"].to_numpy()
    matrix = sp.csr_matrix((np.ones(users.size, dtype=np.float32), (users, items)), shape=shape)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _check_loaded(path: Path, warm: Split, items: IdMap, frame: pl.DataFrame) -> None:
    """Raise ArtifactError unless the id maps and the cold frame fit the documented layout."""
    n_warm = warm.n_items
    if len(items) <= n_warm or not np.array_equal(items.external_ids[:n_warm], warm.items.external_ids):
        raise ArtifactError(
            f"{path / 'items.json'}: must list the {n_warm} warm items of warm/items.json first, then "
            f"at least one cold item; it has {len(items)} items"
        )
    users, cold = frame["user"].to_numpy(), frame["item"].to_numpy()
    if users.size and (users.min() < 0 or users.max() >= warm.n_users or cold.min() < n_warm or cold.max() >= len(items)):
        raise ArtifactError(
            f"{path / 'cold.parquet'}: users must be in 0..{warm.n_users - 1} and items in the cold "
            f"range {n_warm}..{len(items) - 1}"
        )
