"""Ranks of held-out items under the two leave-one-out protocols, chunked over users.

* Full ranking: the held-out item against every item the user has not already consumed.
* Sampled: the held-out item against the split's fixed sampled negatives (99 per user).

Both use pessimistic ties (ARCHITECTURE.md): rank = candidates scoring strictly higher plus
candidates tied with the target, so a constant model never gets a free hit. Memory is bounded
by ``chunk_size x n_items`` scores at a time. Models hand back torch tensors; the comparisons
run on a zero-copy numpy view of them (see ``_as_numpy_scores``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from acfrec.data.idmap import check_indices
from acfrec.errors import DataValidationError


def model_label(model: Any) -> str:
    """A readable model name for messages and results: the registry name, else the class name."""
    name = getattr(model, "name", None)
    return name if isinstance(name, str) and name != "base" else type(model).__name__


def _check_users_targets(model: Any, users: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if users.shape != targets.shape:
        raise DataValidationError(
            f"users and targets must have the same shape (n,), got {users.shape} and {targets.shape}"
        )
    check_indices(users, model.n_users, "user")
    check_indices(targets, model.n_items, "item")
    return users, targets


def _as_numpy_scores(scores: Any) -> np.ndarray:
    """A ``(chunk, m)`` score tensor or array as a float numpy array, zero-copy for CPU float tensors.

    The comparisons below run in numpy because its boolean row counts are several times faster
    than torch's on CPU (torch widens the bool mask before summing); an accelerator's chunk is
    copied to the host once, which costs far less than scoring it.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach()
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()
        return scores.cpu().numpy()
    scores = np.asarray(scores)
    return scores if scores.dtype.kind == "f" else scores.astype(np.float32)


def _raise_on_nan(model: Any, scores: np.ndarray, users: np.ndarray) -> None:
    """Raise naming the model and first user whose ``(chunk, m)`` scores hold NaN."""
    bad_rows = np.isnan(scores.max(axis=1))  # max propagates NaN: one cheap pass
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        raise DataValidationError(
            f"model {model_label(model)} produced NaN scores for user {int(users[row])} "
            f"({int(bad_rows.sum())} user(s) with NaN in this chunk of {users.size}); "
            "a diverged model cannot be ranked"
        )


def _chunks(n: int, chunk_size: int) -> range:
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise DataValidationError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return range(0, n, int(chunk_size))


def _canonical_exclude(exclude: sp.spmatrix | None, model: Any) -> sp.csr_matrix | None:
    if exclude is None:
        return None
    if not sp.issparse(exclude):
        raise DataValidationError(
            f"exclude must be a scipy sparse (n_users, n_items) matrix, got {type(exclude).__name__}"
        )
    expected = (model.n_users, model.n_items)
    if exclude.shape != expected:
        raise DataValidationError(
            f"exclude has shape {exclude.shape} but model {model_label(model)} has (n_users, n_items) = {expected}"
        )
    exclude = sp.csr_matrix(exclude)
    if not exclude.has_canonical_format:
        # duplicate (user, item) entries would otherwise be subtracted twice from a rank
        exclude = exclude.copy()
        exclude.sum_duplicates()
    return exclude


def full_ranking_ranks(
    model: Any,
    users: Any,
    targets: Any,
    exclude: sp.spmatrix | None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """0-based rank of each target among all items, excluded items removed.

    Args:
        model: a fitted Recommender; ``model.score_all(users)`` gives ``(chunk, n_items)`` scores.
        users: ``(n,)`` user indices.
        targets: ``(n,)`` held-out item per user.
        exclude: ``(n_users, n_items)`` CSR of items removed from the candidates (e.g.
            ``split.seen("test")``); the target itself is never removed. ``None`` keeps all.
        chunk_size: users scored at once; memory is about ``chunk_size x n_items`` floats.
    Returns:
        ``(n,)`` int64 ranks (pessimistic ties).
    Raises:
        DataValidationError: on NaN scores (naming model and user) or mismatched shapes.
    """
    users, targets = _check_users_targets(model, users, targets)
    exclude = _canonical_exclude(exclude, model)
    ranks = np.empty(users.size, dtype=np.int64)
    for start in _chunks(users.size, chunk_size):
        chunk_users = users[start : start + chunk_size]
        chunk_targets = targets[start : start + chunk_size]
        ranks[start : start + chunk_users.size] = _full_chunk(model, chunk_users, chunk_targets, exclude)
    return ranks


def _full_chunk(
    model: Any, users: np.ndarray, targets: np.ndarray, exclude: sp.csr_matrix | None
) -> np.ndarray:
    """Ranks for one chunk: ``(c,)`` users and targets -> ``(c,)`` int64."""
    scores = _as_numpy_scores(model.score_all(users))
    if scores.shape != (users.size, model.n_items):
        raise DataValidationError(
            f"model {model_label(model)}.score_all returned shape {tuple(scores.shape)}, "
            f"expected (chunk, n_items) = ({users.size}, {model.n_items})"
        )
    _raise_on_nan(model, scores, users)
    target_scores = scores[np.arange(users.size), targets]
    # Count over every item, then take back the excluded ones: this never copies or mutates
    # the (chunk, n_items) score matrix (score_all may hand back a model's own tensor).
    at_least = np.count_nonzero(scores >= target_scores[:, None], axis=1) - 1  # minus the target
    if exclude is not None:
        rows, cols = exclude[users].nonzero()
        keep = cols != targets[rows]
        rows, cols = rows[keep], cols[keep]
        hit = scores[rows, cols] >= target_scores[rows]
        at_least -= np.bincount(rows[hit], minlength=users.size)
    return at_least.astype(np.int64)


def sampled_ranks(
    model: Any,
    users: Any,
    targets: Any,
    negatives: Any,
    chunk_size: int = 1024,
) -> np.ndarray:
    """0-based rank of each target among itself and its sampled negatives.

    Args:
        model: a fitted Recommender; ``model.score(users, candidates)`` with candidates
            ``(chunk, 1 + n_neg)``, target first.
        users: ``(n,)`` user indices.
        targets: ``(n,)`` held-out item per user.
        negatives: ``(n, n_neg)`` sampled negative items per user (never the target).
        chunk_size: users scored at once.
    Returns:
        ``(n,)`` int64 ranks in ``0..n_neg`` (pessimistic ties).
    """
    users, targets = _check_users_targets(model, users, targets)
    negatives = np.asarray(negatives, dtype=np.int64)
    if negatives.ndim != 2 or negatives.shape[0] != users.size or negatives.shape[1] == 0:
        raise DataValidationError(
            f"negatives must have shape (n_users, n_negatives) = ({users.size}, >=1), got {negatives.shape}"
        )
    if negatives.size and negatives.min() < 0:
        row = int(np.flatnonzero((negatives < 0).any(axis=1))[0])
        raise DataValidationError(
            f"negatives row of user {int(users[row])} holds -1 (no sampled negatives for this user)"
        )
    clash = (negatives == targets[:, None]).any(axis=1)
    if clash.any():
        row = int(np.flatnonzero(clash)[0])
        raise DataValidationError(
            f"negatives of user {int(users[row])} contain its held-out item {int(targets[row])}"
        )
    candidates = np.concatenate([targets[:, None], negatives], axis=1)
    ranks = np.empty(users.size, dtype=np.int64)
    for start in _chunks(users.size, chunk_size):
        chunk = slice(start, start + chunk_size)
        scores = _as_numpy_scores(model.score(users[chunk], candidates[chunk]))
        _raise_on_nan(model, scores, users[chunk])
        ranks[chunk] = np.count_nonzero(scores[:, 1:] >= scores[:, :1], axis=1)
    return ranks
