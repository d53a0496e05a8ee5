"""Planted-preference interactions: synthetic data whose ground truth is known.

Every item belongs to one of ``n_classes`` classes and every user likes ``classes_per_user`` of
them. A user's interactions are drawn mostly from items of the liked classes, where items are
Zipf-popular within their class, plus a ``noise`` share drawn from global popularity. Timestamps
increase along each user's history in random order, so the latest interaction (the leave-one-out
test target) is itself a draw from the user's preferences, not its least popular item.

The item classes (:attr:`PlantedTruth.item_class`) are the hook for item content: a content
encoder can render each item from its class, so a content-aware model has something to find.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from acfrec.errors import DataValidationError

# Users are sampled in chunks so the (chunk, n_items) key matrix stays small on big catalogues.
_USER_CHUNK = 4096


@dataclass(frozen=True)
class PlantedTruth:
    """What generated the interactions. Dense index ``k`` is external id ``u{k}`` / ``i{k}``.

    Attributes:
        item_class: ``(n_items,)`` int64 class of each item.
        user_classes: ``(n_users, classes_per_user)`` int64 distinct liked classes per user.
        item_popularity: ``(n_items,)`` float64 Zipf weight of each item within its class
            (1.0 for the head item of every class).
    """

    item_class: np.ndarray
    user_classes: np.ndarray
    item_popularity: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.item_class.max()) + 1

    def user_class_mask(self) -> np.ndarray:
        """``(n_users, n_classes)`` bool, True where the user likes the class."""
        mask = np.zeros((self.user_classes.shape[0], self.n_classes), dtype=bool)
        np.put_along_axis(mask, self.user_classes, True, axis=1)
        return mask

    def likes(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each item is of a class its user likes.

        Args:
            users: ``(batch,)`` dense user indices.
            items: ``(batch,)`` or ``(batch, k)`` dense item indices (-1 padding counts as False).
        Returns:
            bool array shaped like ``items``.
        """
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        rows = users if items.ndim == 1 else users[:, None]
        valid = items >= 0
        liked = self.user_class_mask()[rows, self.item_class[np.where(valid, items, 0)]]
        return liked & valid


@dataclass(frozen=True)
class PlantedData:
    """``frame``: columns ``user`` (str ``u0``...), ``item`` (str ``i0``...), ``timestamp`` (int64),
    sorted by user index then time; ``truth``: the generating :class:`PlantedTruth`."""

    frame: pl.DataFrame
    truth: PlantedTruth


def planted_interactions(
    n_users: int = 600,
    n_items: int = 400,
    n_classes: int = 10,
    classes_per_user: int = 2,
    interactions_per_user: tuple[int, int] = (10, 40),
    popularity_skew: float = 1.0,
    noise: float = 0.1,
    seed: int = 0,
) -> PlantedData:
    """Generate seeded interactions with planted class preferences.

    Args:
        interactions_per_user: inclusive ``(low, high)`` range of distinct items per user.
        popularity_skew: Zipf exponent within a class; 0 makes every item equally popular.
        noise: probability mass a user puts on global popularity instead of its classes.
    Returns:
        :class:`PlantedData` with ``sum(n_u)`` rows, no repeated (user, item) pair.
    """
    low, high = _check_params(
        n_users, n_items, n_classes, classes_per_user, interactions_per_user, popularity_skew, noise
    )
    rng = np.random.default_rng(seed)
    item_class = rng.permutation(np.arange(n_items, dtype=np.int64) % n_classes)
    popularity = _zipf_within_class(rng, item_class, n_classes, popularity_skew)
    # Distinct classes per user: the first columns of a random permutation of the classes.
    user_classes = np.argsort(rng.random((n_users, n_classes)), axis=1)[:, :classes_per_user].astype(np.int64)
    truth = PlantedTruth(item_class, user_classes, popularity)
    counts = rng.integers(low, high + 1, size=n_users)
    _check_enough_items(truth, counts, noise)

    items = np.concatenate(
        [
            _sample_items(rng, truth, np.arange(start, min(start + _USER_CHUNK, n_users)), counts, noise)
            for start in range(0, n_users, _USER_CHUNK)
        ]
    )
    users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    timestamps = _increasing_timestamps(rng, counts)
    frame = pl.DataFrame(
        {
            "user": np.char.add("u", users.astype(str)),
            "item": np.char.add("i", items.astype(str)),
            "timestamp": timestamps,
        },
        schema={"user": pl.String, "item": pl.String, "timestamp": pl.Int64},
    )
    return PlantedData(frame, truth)


def _check_params(
    n_users: int,
    n_items: int,
    n_classes: int,
    classes_per_user: int,
    interactions_per_user: tuple[int, int],
    popularity_skew: float,
    noise: float,
) -> tuple[int, int]:
    if n_users < 1:
        raise DataValidationError(f"n_users must be >= 1, got {n_users}")
    if not 1 <= n_classes <= n_items:
        raise DataValidationError(f"n_classes must be in 1..n_items={n_items}, got {n_classes}")
    if not 1 <= classes_per_user <= n_classes:
        raise DataValidationError(
            f"classes_per_user must be in 1..n_classes={n_classes}, got {classes_per_user}"
        )
    bounds = np.asarray(interactions_per_user).reshape(-1)
    low, high = (int(bounds[0]), int(bounds[-1])) if bounds.size == 2 else (0, -1)
    if not 1 <= low <= high <= n_items:
        raise DataValidationError(
            f"interactions_per_user must satisfy 1 <= low <= high <= n_items={n_items}, got {interactions_per_user}"
        )
    if popularity_skew < 0:
        raise DataValidationError(f"popularity_skew must be >= 0, got {popularity_skew}")
    if not 0.0 <= noise <= 1.0:
        raise DataValidationError(f"noise must be in [0, 1], got {noise}")
    return low, high


def _zipf_within_class(
    rng: np.random.Generator, item_class: np.ndarray, n_classes: int, skew: float
) -> np.ndarray:
    """``(n_items,)`` weight ``(rank + 1) ** -skew`` with a random popularity rank inside each class."""
    order = np.lexsort((rng.random(item_class.size), item_class))
    class_start = np.searchsorted(item_class[order], np.arange(n_classes))
    rank = np.empty(item_class.size, dtype=np.int64)
    rank[order] = np.arange(item_class.size) - class_start[item_class[order]]
    return (rank + 1.0) ** -skew


def _item_probabilities(truth: PlantedTruth, users: np.ndarray, noise: float) -> np.ndarray:
    """``(len(users), n_items)`` probability of each item under each user's preference mixture."""
    class_mass = np.bincount(truth.item_class, weights=truth.item_popularity)
    within_class = truth.item_popularity / class_mass[truth.item_class]
    n_liked = truth.user_classes.shape[1]
    liked = truth.user_class_mask()[users][:, truth.item_class]
    global_share = truth.item_popularity / truth.item_popularity.sum()
    return (1.0 - noise) * liked * (within_class / n_liked) + noise * global_share


def _sample_items(
    rng: np.random.Generator, truth: PlantedTruth, users: np.ndarray, counts: np.ndarray, noise: float
) -> np.ndarray:
    """Items of ``users`` drawn without replacement (Gumbel top-k), flattened user by user."""
    with np.errstate(divide="ignore"):
        keys = np.log(_item_probabilities(truth, users, noise)) + rng.gumbel(
            size=(users.size, truth.item_class.size)
        )
    width = int(counts[users].max())
    # The `width` largest keys per row (unordered), then their Gumbel order: the first n_u of
    # that order are a weighted draw of n_u distinct items.
    top = np.argpartition(-keys, width - 1, axis=1)[:, :width]
    ranked = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1), axis=1)
    # Shuffle each user's chosen set so its time order (and so the held-out last item) is random.
    take = np.arange(width)[None, :] < counts[users][:, None]
    shuffle = np.where(take, rng.random(take.shape), np.inf)
    return np.take_along_axis(ranked, np.argsort(shuffle, axis=1), axis=1)[take].astype(np.int64)


def _increasing_timestamps(rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
    """``(sum(counts),)`` int64 strictly increasing within each user's run, random start and gaps."""
    starts = rng.integers(1_000_000_000, 1_100_000_000, size=counts.size)
    total = np.cumsum(rng.integers(1, 86_400, size=int(counts.sum())))
    first = np.cumsum(counts) - counts
    return np.repeat(starts, counts) + total - np.repeat(total[first], counts)


def _check_enough_items(truth: PlantedTruth, counts: np.ndarray, noise: float) -> None:
    if noise > 0:
        return
    # Without noise a user can only reach items of its own classes.
    reachable = np.bincount(truth.item_class)[truth.user_classes].sum(axis=1)
    short = np.flatnonzero(counts > reachable)
    if short.size:
        user = int(short[0])
        raise DataValidationError(
            f"user u{user} needs {int(counts[user])} interactions but its classes hold only "
            f"{int(reachable[user])} items; raise noise above 0 or lower interactions_per_user"
        )
