"""Clustered synthetic vectors: a stand-in catalogue for retrieval tests and benchmarks."""

from __future__ import annotations

import numpy as np


def clustered_vectors(
    n_items: int,
    n_queries: int,
    dim: int,
    n_clusters: int = 1000,
    spread: float = 0.5,
    norm_spread: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Items and queries drawn around the same random cluster centres.

    Each vector is ``centre + spread * noise`` scaled by ``exp(norm_spread * noise)``, so norms
    vary between items the way popularity-driven factor norms do and inner-product search is not
    the same as cosine search.

    Returns:
        ``(items, queries)``: ``(n_items, dim)`` and ``(n_queries, dim)`` float32.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)

    def draw(n: int) -> np.ndarray:
        vectors = centres[rng.integers(0, n_clusters, n)]
        vectors += spread * rng.standard_normal((n, dim), dtype=np.float32)
        vectors *= np.exp(norm_spread * rng.standard_normal((n, 1), dtype=np.float32))
        return vectors

    return draw(n_items), draw(n_queries)
