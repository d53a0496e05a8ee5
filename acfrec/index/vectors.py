"""Query and item vectors of a trained model for inner-product retrieval.

A model can be served by an :class:`acfrec.index.ItemIndex` when its score is an inner product
``score_all(users) == user_vectors(users) @ item_vectors().T``. An item bias ``b_j`` is folded in
by one extra column: item ``[q_j, b_j]``, user ``[x_u, 1]`` (:func:`augment_bias`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from acfrec.errors import DataValidationError


def augment_bias(
    user_vectors: np.ndarray, item_vectors: np.ndarray, item_bias: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an item bias into the inner product.

    Args:
        user_vectors: ``(n_users, dim)``.
        item_vectors: ``(n_items, dim)``.
        item_bias: ``(n_items,)`` (or ``(n_items, 1)``), or None for no bias.
    Returns:
        ``(n_users, dim + 1)`` ``[x_u, 1]`` and ``(n_items, dim + 1)`` ``[q_j, b_j]`` float32
        (unchanged inputs, as float32, when ``item_bias`` is None).
    """
    users = np.asarray(user_vectors, dtype=np.float32)
    items = np.asarray(item_vectors, dtype=np.float32)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise DataValidationError(
            f"user_vectors (n_users, dim) and item_vectors (n_items, dim) must share dim, got {users.shape} and {items.shape}"
        )
    if item_bias is None:
        return users, items
    bias = np.asarray(item_bias, dtype=np.float32).reshape(-1)
    if bias.shape != (items.shape[0],):
        raise DataValidationError(f"item_bias must have shape (n_items,) = ({items.shape[0]},), got {np.shape(item_bias)}")
    return (
        np.hstack([users, np.ones((users.shape[0], 1), dtype=np.float32)]),
        np.hstack([items, bias[:, None]]),
    )


def model_vectors(model: Any, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(queries (n_users, d), items (n_items, d))`` whose inner products are ``model``'s scores.

    Uses the model's ``user_vectors(users)`` and ``item_vectors()`` (bias already folded in), or
    for the ``implicit`` wrappers ``user_factors()`` and ``item_factors()``.
    """
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    if hasattr(model, "user_vectors") and hasattr(model, "item_vectors"):
        queries, items = model.user_vectors(users), model.item_vectors()
    elif hasattr(model, "user_factors") and hasattr(model, "item_factors"):
        queries, items = model.user_factors()[users], model.item_factors()
    else:
        raise NotImplementedError(
            f"{type(model).__name__} cannot be served from an index: it needs user_vectors(users) and "
            "item_vectors() with score_all(users) == user_vectors(users) @ item_vectors().T"
        )
    return np.ascontiguousarray(queries, dtype=np.float32), np.ascontiguousarray(items, dtype=np.float32)
