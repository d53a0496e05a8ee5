"""Leave-one-out splitting: per user, the latest interaction is test, the one before it valid.

Tie rules decide which of several interactions sharing a user's latest timestamp counts as
"latest" (on ML-100K 415 of 943 users have such a tie, so the rule changes the test set):

* ``"file_order"`` (default, what RecBole does): stable sort by time, so among equal
  timestamps the row that comes last in the source file is the latest.
* ``"item_id"``: among equal timestamps the item with the largest *external* id is the latest;
  ids are compared as integers when every item id is an integer, else as strings. Unlike
  ``file_order`` this does not depend on the order of rows in the file.
* ``"random"``: among equal timestamps a seeded random order.

Without timestamps (the source had no timestamp column) each user's interactions are put in
a seeded random order instead, and ``meta["order"]`` says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from acfrec.data.interactions import Interactions
from acfrec.data.sampler import interaction_keys, is_member
from acfrec.data.split import Split
from acfrec.errors import DataValidationError

TieRule = Literal["file_order", "item_id", "random"]
TIE_RULES: tuple[str, ...] = ("file_order", "item_id", "random")

# Largest candidate matrix (elements) held at once while sampling negatives.
_CHUNK_ELEMENTS = 1 << 22


def leave_one_out(
    interactions: Interactions,
    *,
    tie_rule: TieRule = "file_order",
    seed: int = 0,
    n_negatives: int = 99,
    min_interactions: int = 3,
) -> Split:
    """Split every user's latest interaction off as test and the second latest as validation.

    Users with fewer than ``min_interactions`` interactions stay entirely in training. Each
    user with a test item gets ``n_negatives`` distinct items it never interacted with (in
    train, valid or test), uniformly at random, for the sampled protocol.

    Returns:
        A :class:`Split` with ``train`` ``(n_users, n_items)``, ``valid_items`` / ``test_items``
        ``(n_users,)`` (-1: none) and ``negatives`` ``(n_users, n_negatives)`` (-1 rows: none).
    Raises:
        ValueError: unknown ``tie_rule``, ``min_interactions`` < 2 or ``n_negatives`` < 0.
        DataValidationError: a user has fewer than ``n_negatives`` items left to sample.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie_rule {tie_rule!r}; choose one of {', '.join(TIE_RULES)}")
    if min_interactions < 2:
        raise ValueError(
            f"min_interactions must be >= 2 (one valid and one test item), got {min_interactions}"
        )
    if n_negatives < 0:
        raise ValueError(f"n_negatives must be >= 0, got {n_negatives}")

    frame = interactions.frame
    users = frame["user"].to_numpy().astype(np.int64, copy=False)
    items = frame["item"].to_numpy().astype(np.int64, copy=False)
    times = frame["timestamp"].to_numpy().astype(np.float64, copy=False)
    n_users, n_items = interactions.n_users, interactions.n_items
    order_rng = np.random.default_rng([seed, 0])
    negative_rng = np.random.default_rng([seed, 1])

    order = chronological_order(interactions, tie_rule, order_rng)
    counts = np.bincount(users, minlength=n_users)
    ends = np.cumsum(counts)  # user u's rows are order[ends[u] - counts[u] : ends[u]]
    eligible = np.flatnonzero(counts >= min_interactions)
    test_rows = order[ends[eligible] - 1]
    valid_rows = order[ends[eligible] - 2]

    valid_items = np.full(n_users, -1, dtype=np.int64)
    test_items = np.full(n_users, -1, dtype=np.int64)
    valid_items[eligible] = items[valid_rows]
    test_items[eligible] = items[test_rows]
    held_out = np.zeros(users.size, dtype=bool)
    held_out[test_rows] = True
    held_out[valid_rows] = True
    train_rows = order[~held_out[order]]
    if not interactions.has_timestamp:
        # The random order only picks the held-out rows; training history keeps source order.
        train_rows = train_rows[np.lexsort((train_rows, users[train_rows]))]

    train_frame = pl.DataFrame(
        {"user": users[train_rows], "item": items[train_rows], "timestamp": times[train_rows]}
    )
    train = sp.csr_matrix(
        (np.ones(train_rows.size, dtype=np.float32), (users[train_rows], items[train_rows])),
        shape=(n_users, n_items),
    )
    history = interactions.to_csr()
    negatives = np.full((n_users, n_negatives), -1, dtype=np.int64)
    _check_room(interactions, eligible, counts[eligible], n_negatives)
    negatives[eligible] = sample_distinct_negatives(negative_rng, eligible, history, n_negatives)

    # Users whose two latest rows share a timestamp: where the tie rule decides the test item.
    multi = counts >= 2
    tied = np.zeros(n_users, dtype=bool)
    tied[multi] = times[order[ends[multi] - 1]] == times[order[ends[multi] - 2]]
    meta = {
        "source": interactions.meta.get("source"),
        "tie_rule": tie_rule,
        "order": "timestamp" if interactions.has_timestamp else "random (no timestamps)",
        "seed": int(seed),
        "n_negatives": int(n_negatives),
        "min_interactions": int(min_interactions),
        "counts": {
            "n_users": int(n_users),
            "n_items": int(n_items),
            "n_interactions": int(users.size),
            "n_train": int(train_rows.size),
            "n_valid": int(eligible.size),
            "n_test": int(eligible.size),
            "n_train_only_users": int(n_users - eligible.size),
            "n_users_tied_at_latest": int(tied.sum()) if interactions.has_timestamp else None,
        },
        "inputs": {
            "interactions_fingerprint": interactions.fingerprint,
            "tie_rule": tie_rule,
            "seed": int(seed),
            "n_negatives": int(n_negatives),
            "min_interactions": int(min_interactions),
        },
        "interactions": interactions.meta,
    }
    split = Split(
        train=train,
        train_frame=train_frame,
        valid_items=valid_items,
        test_items=test_items,
        negatives=negatives,
        users=interactions.users,
        items=interactions.items,
        meta=meta,
    )
    valid_times = np.full(n_users, np.nan)
    test_times = np.full(n_users, np.nan)
    valid_times[eligible] = times[valid_rows]
    test_times[eligible] = times[test_rows]
    split.heldout_timestamps = (valid_times, test_times)
    split.meta["fingerprint"] = split.fingerprint
    return split


def chronological_order(
    interactions: Interactions, tie_rule: TieRule, rng: np.random.Generator
) -> np.ndarray:
    """``(n_rows,)`` row permutation sorting by user, then time (oldest first), then the tie rule."""
    frame = interactions.frame
    users = frame["user"].to_numpy()
    rows = np.arange(frame.height)
    if not interactions.has_timestamp:
        return np.lexsort((rng.permutation(frame.height), users))
    times = frame["timestamp"].to_numpy()
    if tie_rule == "file_order":
        ties = rows
    elif tie_rule == "item_id":
        ties = item_id_rank(interactions)[frame["item"].to_numpy()]
    else:
        ties = rng.permutation(frame.height)
    # The frame is in source order, so `rows` as the last key makes every rule total and stable.
    return np.lexsort((rows, ties, times, users))


def item_id_rank(interactions: Interactions) -> np.ndarray:
    """``(n_items,)`` rank of each item's external id: numeric when all ids are integers."""
    external = pl.Series(interactions.items.external_ids.tolist(), dtype=pl.String)
    numeric = external.cast(pl.Int64, strict=False)
    key = numeric if numeric.null_count() == 0 else external
    return key.rank("ordinal").to_numpy().astype(np.int64) - 1


def _check_room(interactions: Interactions, users: np.ndarray, counts: np.ndarray, n_negatives: int) -> None:
    room = interactions.n_items - counts
    short = np.flatnonzero(room < n_negatives)
    if short.size:
        user = int(users[short[0]])
        raise DataValidationError(
            f"{interactions.meta.get('source', '<interactions>')}: user {interactions.users.external_ids[user]!r} "
            f"has interacted with {int(counts[short[0]])} of {interactions.n_items} items, leaving "
            f"{int(room[short[0]])} to sample {n_negatives} distinct negatives from ({short.size} such users); "
            "lower n_negatives"
        )


def sample_distinct_negatives(
    rng: np.random.Generator,
    users: np.ndarray,
    history: sp.csr_matrix,
    n_negatives: int,
    rounds: int = 4,
) -> np.ndarray:
    """Per user, ``n_negatives`` distinct items outside its row of ``history``, uniformly.

    Draws an oversized candidate row per user, drops candidates in the history and repeats
    within the row, and keeps the first ``n_negatives`` survivors (a uniform sample without
    replacement). Rows that come up short are redrawn wider; after ``rounds`` tries the few
    left (users who consumed most of the catalogue) rank the whole complement by random keys.
    Memory stays bounded by working on chunks of users.

    Args:
        users: ``(n,)`` user indices into ``history`` ``(n_users, n_items)``; each must have at
            least ``n_negatives`` items outside its history.
    Returns:
        ``(n, n_negatives)`` int64.
    """
    users = np.asarray(users, dtype=np.int64)
    n_items = history.shape[1]
    out = np.full((users.size, n_negatives), -1, dtype=np.int64)
    if n_negatives == 0 or users.size == 0:
        return out
    keys = interaction_keys(history)
    pending = np.arange(users.size)
    width = n_negatives + n_negatives // 2 + 8
    for _ in range(rounds):
        for chunk in _chunks(pending, max(1, _CHUNK_ELEMENTS // width)):
            out[chunk] = _draw_rows(rng, users[chunk], n_items, keys, n_negatives, width)
        pending = pending[out[pending, 0] < 0]
        if pending.size == 0:
            return out
        width *= 2
    for chunk in _chunks(pending, max(1, _CHUNK_ELEMENTS // n_items)):
        out[chunk] = _rank_complement(rng, history[users[chunk]], n_negatives)
    return out


def _chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, rows.size, size):
        yield rows[start : start + size]


def _draw_rows(
    rng: np.random.Generator, users: np.ndarray, n_items: int, keys: np.ndarray, n: int, width: int
) -> np.ndarray:
    """``(len(users), n)`` distinct non-history draws; rows with too few survivors are all -1."""
    candidates = rng.integers(0, n_items, size=(users.size, width), dtype=np.int64)
    usable = ~is_member(keys, users[:, None], candidates, n_items) & ~_repeats(candidates)
    take = usable & (np.cumsum(usable, axis=1) <= n)
    complete = take.sum(axis=1) == n
    out = np.full((users.size, n), -1, dtype=np.int64)
    out[complete] = candidates[complete][take[complete]].reshape(-1, n)
    return out


def _repeats(candidates: np.ndarray) -> np.ndarray:
    """Mask of entries equal to an earlier entry of the same row, ``(rows, width)``."""
    order = np.argsort(candidates, axis=1, kind="stable")
    ranked = np.take_along_axis(candidates, order, axis=1)
    repeat_sorted = np.zeros(candidates.shape, dtype=bool)
    repeat_sorted[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    repeats = np.empty_like(repeat_sorted)
    np.put_along_axis(repeats, order, repeat_sorted, axis=1)
    return repeats


def _rank_complement(rng: np.random.Generator, rows: sp.csr_matrix, n: int) -> np.ndarray:
    """The ``n`` non-history items with the smallest uniform random keys, per row ``(r, n)``."""
    keys = rng.random(rows.shape)
    keys[rows.toarray() > 0] = np.inf
    picked = np.argpartition(keys, n - 1, axis=1)[:, :n]
    by_key = np.argsort(np.take_along_axis(keys, picked, axis=1), axis=1)
    return np.take_along_axis(picked, by_key, axis=1).astype(np.int64)
