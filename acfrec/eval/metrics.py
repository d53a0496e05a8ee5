"""Leave-one-out ranking metrics computed from the rank of each user's held-out item.

Every function takes ``ranks``: a ``(n_users,)`` array (numpy, torch or a list) of 0-based
ranks of the single held-out item (rank 0 = top, see ARCHITECTURE.md for the tie rule) and
returns the per-user values as a ``(n_users,)`` float64 array, so that paired significance
tests can be run on them. :func:`summarise` gives the means.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from acfrec.errors import DataValidationError

_METRIC_NAME = re.compile(r"^(HR|NDCG|Recall|MRR)(?:@(\d+))?$")


def as_ranks(ranks: Any) -> np.ndarray:
    """Coerce ``ranks`` (numpy, torch, list) to a ``(n_users,)`` int64 array of ranks >= 0."""
    if hasattr(ranks, "detach"):  # torch tensor, possibly on an accelerator
        ranks = ranks.detach().cpu().numpy()
    array = np.asarray(ranks)
    if array.ndim != 1:
        raise DataValidationError(f"ranks must have shape (n_users,), got {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(
            np.isfinite(array) & (array == np.round(array))
        ):
            raise DataValidationError(f"ranks must be whole numbers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        bad = int(np.argmin(array))
        raise DataValidationError(f"ranks must be >= 0, got {int(array[bad])} at position {bad}")
    return array


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise DataValidationError(f"cutoff k must be a positive integer, got {k!r}")
    return int(k)


def hit_rate(ranks: Any, k: int) -> np.ndarray:
    """HR@k per user: 1.0 if the held-out item is in the top ``k`` (rank < k), else 0.0. ``(n_users,)``."""
    return (as_ranks(ranks) < _check_k(k)).astype(np.float64)


def ndcg(ranks: Any, k: int) -> np.ndarray:
    """NDCG@k per user with one relevant item: ``1 / log2(rank + 2)`` if rank < k, else 0. ``(n_users,)``."""
    array = as_ranks(ranks)
    # The ideal DCG of a single relevant item is 1, so DCG is NDCG.
    return np.where(array < _check_k(k), 1.0 / np.log2(array + 2.0), 0.0)


def mrr(ranks: Any, k: int | None = None) -> np.ndarray:
    """Reciprocal rank per user, ``1 / (rank + 1)``; 0 beyond the top ``k`` when ``k`` is given. ``(n_users,)``."""
    array = as_ranks(ranks)
    values = 1.0 / (array + 1.0)
    if k is not None:
        values = np.where(array < _check_k(k), values, 0.0)
    return values


def recall(ranks: Any, k: int) -> np.ndarray:
    """Recall@k per user. ``(n_users,)``.

    With leave-one-out there is exactly one held-out item per user, so recall@k (share of the
    user's held-out items found in the top ``k``) equals HR@k; it is reported under its own name
    because papers quote either.
    """
    return hit_rate(ranks, k)


def metric_values(ranks: Any, metric: str) -> np.ndarray:
    """Per-user values ``(n_users,)`` of a metric named like ``"NDCG@10"``, ``"HR@20"``, ``"MRR"``, ``"MRR@10"``."""
    match = _METRIC_NAME.match(metric)
    if match is None or (match.group(2) is None and match.group(1) != "MRR"):
        raise DataValidationError(
            f"unknown metric {metric!r}: use HR@k, NDCG@k, Recall@k, MRR or MRR@k (e.g. 'NDCG@10')"
        )
    name, k = match.group(1), match.group(2)
    cutoff = None if k is None else int(k)
    functions = {"HR": hit_rate, "NDCG": ndcg, "Recall": recall}
    if name == "MRR":
        return mrr(ranks, cutoff)
    return functions[name](ranks, cutoff)


def summarise(ranks: Any, ks: Iterable[int] = (10, 20, 50, 100)) -> dict[str, float]:
    """Mean metrics over users: keys ``HR@k``, ``NDCG@k``, ``Recall@k`` for each ``k``, and ``MRR`` (uncut).

    An empty ``ranks`` gives NaN for every metric.
    """
    array = as_ranks(ranks)
    names = [f"{name}@{_check_k(k)}" for k in ks for name in ("HR", "NDCG", "Recall")] + ["MRR"]
    if array.size == 0:
        return {name: float("nan") for name in names}
    return {name: float(metric_values(array, name).mean()) for name in names}
