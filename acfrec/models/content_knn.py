"""Content cold-start baselines: they score warm and new (cold) items from item content alone.

These are the reference rows of the cold-start table (:func:`acfrec.eval.cold.evaluate_cold`):

* ``random``: seeded uniform scores, the floor.
* ``content-pop``: popularity by content neighbours; a warm item scores its training popularity,
  a cold item the mean training popularity of its ``k`` most similar warm items (cosine of mean
  content).
* ``content-knn``: a user's profile is the mean (unit-normalised) content of its training
  history; every item scores the cosine between the profile and its content.

Both content baselines centre the content first (``center=True``, see :func:`centred`): on
ML-100K plot text this lifts content-kNN's cold Recall@20 from below random to above it.

They are plain classes, not registered :class:`~acfrec.models.Recommender` models: a Recommender
scores the ``n_items`` of the matrix it was fitted on, while these need item content and score
an item space wider than their training matrix. The interface is small::

    scorer = ContentKNN().fit(train, content)  # train (n_users, n_warm), content (n_items, dim)
    scorer.score_all(users)                    # (batch,) -> (batch, n_items) torch tensor

with the item layout of :class:`~acfrec.data.cold.ColdSplit`: content row ``j`` is item ``j`` of
``cold.items`` (warm items ``0..n_warm-1`` are the columns of ``train``, cold items follow).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from acfrec.data.components import AlignedComponents, ComponentStore
from acfrec.data.idmap import IdMap, check_indices
from acfrec.errors import DataValidationError, NotFittedError

# Cold items compared with the whole warm catalogue at once while searching neighbours.
_NEIGHBOUR_ROWS = 4096


def mean_content(components: AlignedComponents) -> torch.Tensor:
    """``(n_items, dim)`` float32 mean of each item's components; zero for items without content."""
    mask = components.mask.unsqueeze(-1).to(components.features.dtype)
    total = (components.features * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp_min(1.0)


def item_content(store: ComponentStore, items: IdMap, max_components: int = 64) -> torch.Tensor:
    """``(len(items), dim)`` mean content of ``items`` (e.g. ``ColdSplit.items``) from a component store."""
    return mean_content(store.align(items, max_components))


class ContentScorer:
    """Base of the baselines: checks inputs, knows the sizes; subclasses set :meth:`_fit` and :meth:`_scores`."""

    name = "content-scorer"

    def __init__(self, center: bool = True) -> None:
        self.center = bool(center)
        self._shape: tuple[int, int, int] | None = None  # (n_users, n_warm, n_items)

    @property
    def n_users(self) -> int:
        return self._sizes()[0]

    @property
    def n_items(self) -> int:
        """All items the scorer ranks, warm and cold."""
        return self._sizes()[2]

    def _sizes(self) -> tuple[int, int, int]:
        if self._shape is None:
            raise NotFittedError(f"{self.name} is not fitted: call fit(train, content) first")
        return self._shape

    def fit(self, train: sp.spmatrix, content: Any) -> ContentScorer:
        """Fit on the warm training matrix and the content of every item.

        Args:
            train: ``(n_users, n_warm)`` training interactions over the warm items.
            content: ``(n_items, dim)`` item content, ``n_items >= n_warm``, rows ``0..n_warm-1``
                the warm items (numpy or torch).
        Returns:
            self.
        """
        if not sp.issparse(train):
            raise DataValidationError(f"train must be a scipy sparse (n_users, n_warm) matrix, got {type(train).__name__}")
        content = torch.as_tensor(np.asarray(content, dtype=np.float32))
        if content.ndim != 2 or content.shape[0] < train.shape[1]:
            raise DataValidationError(
                f"content must have shape (n_items, dim) with n_items >= n_warm = {train.shape[1]} "
                f"(warm items first), got {tuple(content.shape)}"
            )
        if not torch.isfinite(content).all():
            bad = int(torch.nonzero(~torch.isfinite(content).all(dim=1))[0, 0])
            raise DataValidationError(f"content row {bad} (item index {bad}) holds NaN or inf")
        train = sp.csr_matrix(train, dtype=np.float32)
        self._shape = (train.shape[0], train.shape[1], content.shape[0])
        self._fit(train, centred(content, train.shape[1]) if self.center else content)
        return self

    def _fit(self, train: sp.csr_matrix, content: torch.Tensor) -> None: ...

    def score_all(self, users: Any) -> torch.Tensor:
        """``(batch,)`` users -> ``(batch, n_items)`` scores over warm and cold items."""
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        check_indices(users, self.n_users, "user")
        return self._scores(users)

    def _scores(self, users: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class RandomScorer(ContentScorer):
    """Uniform random scores in ``[0, 1)``, a fixed function of (seed, user, item): chunking never changes them."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(center=False)
        self.seed = int(seed)

    def _scores(self, users: np.ndarray) -> torch.Tensor:
        keys = users.astype(np.uint64)[:, None] * np.uint64(self.n_items) + np.arange(self.n_items, dtype=np.uint64)
        bits = _splitmix64(keys ^ _splitmix64(np.uint64(self.seed)))
        return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)


class ContentPopularity(ContentScorer):
    """Warm items: training popularity; cold items: mean popularity of their ``k`` nearest warm items.

    Nearness is the cosine of mean content. A cold item without content (a zero row) gets the
    mean popularity of all warm items: there is nothing to match it on.
    """

    name = "content-pop"

    def __init__(self, k: int = 10, center: bool = True) -> None:
        super().__init__(center)
        if int(k) < 1:
            raise DataValidationError(f"k must be >= 1, got {k}")
        self.k = int(k)

    def _fit(self, train: sp.csr_matrix, content: torch.Tensor) -> None:
        n_warm = train.shape[1]
        popularity = torch.from_numpy(np.asarray(train.sum(axis=0), dtype=np.float32).reshape(-1))
        unit = F.normalize(content, dim=1)
        neighbours = nearest(unit[n_warm:], unit[:n_warm], min(self.k, n_warm))  # (n_cold, k)
        cold = popularity[neighbours].mean(dim=1)
        has_content = unit[n_warm:].abs().sum(dim=1) > 0
        cold = torch.where(has_content, cold, popularity.mean())
        self.item_scores = torch.cat([popularity, cold])  # (n_items,)

    def _scores(self, users: np.ndarray) -> torch.Tensor:
        return self.item_scores.expand(users.size, -1)


class ContentKNN(ContentScorer):
    """Cosine between a user's mean history content and every item's content.

    Users without training history get a zero profile, hence equal (zero) scores everywhere.
    """

    name = "content-knn"

    def _fit(self, train: sp.csr_matrix, content: torch.Tensor) -> None:
        self.item_unit = F.normalize(content, dim=1)  # (n_items, dim)
        history = train.multiply(1.0 / np.maximum(train.sum(axis=1), 1.0)).tocsr()
        profiles = history @ self.item_unit[: train.shape[1]].numpy()
        self.user_unit = F.normalize(torch.from_numpy(np.asarray(profiles, dtype=np.float32)), dim=1)

    def _scores(self, users: np.ndarray) -> torch.Tensor:
        return self.user_unit[torch.from_numpy(users)] @ self.item_unit.T


def centred(content: torch.Tensor, n_warm: int) -> torch.Tensor:
    """``content`` ``(n_items, dim)`` minus the mean content of the warm items that have content.

    Bag-of-words and pixel features share a large common direction (frequent words, the average
    image) that makes every cosine high and alike; removing it leaves what tells items apart. Rows
    without content stay zero. Only warm items set the mean, so a cold item never shifts the
    others' scores.
    """
    has_content = content.abs().sum(dim=1) > 0
    warm = content[:n_warm][has_content[:n_warm]]
    if warm.shape[0] == 0:
        return content
    return torch.where(has_content[:, None], content - warm.mean(dim=0), content)


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """``(n_queries, k)`` int64 indices of the ``k`` largest inner products of each query with ``keys``.

    Args:
        queries: ``(n_queries, dim)``; keys: ``(n_keys, dim)``, ``k <= n_keys``.
    """
    out = torch.empty((queries.shape[0], k), dtype=torch.int64)
    for start in range(0, queries.shape[0], _NEIGHBOUR_ROWS):
        block = queries[start : start + _NEIGHBOUR_ROWS] @ keys.T
        out[start : start + block.shape[0]] = block.topk(k, dim=1).indices
    return out


def _splitmix64(x: np.ndarray | np.uint64) -> np.ndarray:
    """The splitmix64 finaliser: a well-mixed 64-bit hash of each value (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):  # the hash relies on wrapping
        x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


__all__ = [
    "ContentKNN",
    "ContentPopularity",
    "ContentScorer",
    "RandomScorer",
    "centred",
    "item_content",
    "mean_content",
    "nearest",
]
