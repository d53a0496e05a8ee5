"""Top-k item retrieval with FAISS: exact, IVF and HNSW maximum-inner-product search.

Scores are inner products ``query . item`` (or cosines with ``metric="cosine"``), higher is
better, like every score in acfrec. Models whose score adds an item bias ``b_j`` are served by
augmenting: item vector ``[q_j, b_j]``, query ``[x_u, 1]`` (see :mod:`acfrec.index.vectors`).

* ``flat``: exact; the default.
* ``ivf``: ``IndexIVFFlat`` with an inner-product quantiser, k-means trained on a seeded
  sample; ``nprobe`` of ``nlist`` lists are scanned per query.
* ``hnsw``: ``IndexHNSWFlat``, in one of two spaces (``hnsw_space``). "l2" (default) builds
  the graph in the L2 space of the standard MIPS reduction: item ``[v, sqrt(M - |v|^2)]``, query
  ``[q, 0]`` (``M`` the largest squared item norm), where the nearest items are exactly the top
  inner products; returned scores are recomputed as exact inner products. "ip" builds it on raw
  inner products. Neither wins everywhere (recall@100, M 32, efConstruction 200, efSearch 256):
  when a query's top 100 lies mostly in its own cluster, "l2" wins (0.99 against 0.80 for "ip"
  on 200k vectors in clusters of 200, where "ip" also builds twice as slowly); when the top 100
  spans many small clusters, "ip" wins (0.996 against 0.71 on 20k vectors in clusters of 20).
  Measure recall on your own vectors (benchmarks/bench_retrieval.py) before choosing.

Per-query exclusions (items a user has already seen) are honoured without losing results: each
chunk of queries is searched ``k + (most exclusions of a query in the chunk)`` deep, excluded
items are dropped vectorised and the top ``k`` kept. Queries are grouped by their number of
exclusions so that one heavy user does not deepen everybody's search.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp

from acfrec.data.idmap import IdMap, check_indices
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.utils import atomic_dir, file_sha256, fingerprint_arrays

FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "hnsw")
METRICS = ("ip", "cosine")
HNSW_SPACES = ("l2", "ip")
GPU_MAX_K = 2048  # faiss GPU k-selection limit; deeper searches run on the CPU copy
MIN_POINTS_PER_LIST = 39  # below this faiss k-means warns and the lists are poorly trained

Exclude = sp.spmatrix | Sequence[np.ndarray | Sequence[int]] | None


@dataclass
class IndexConfig:
    """How an :class:`ItemIndex` is built and searched.

    Attributes:
        kind: "flat" (exact), "ivf" or "hnsw".
        metric: "ip" (inner product) or "cosine" (vectors normalised at build and query time).
        nlist: IVF lists; None picks ``2 * sqrt(n_items)`` rounded to a power of two (1024 for
            200k items), capped so each list gets enough training points.
        nprobe: IVF lists scanned per query.
        train_per_list: IVF k-means training sample size per list (seeded sample).
        hnsw_m: HNSW graph degree.
        ef_search: HNSW candidate list size at query time (raised to the search depth if lower).
        ef_construction: HNSW candidate list size while building.
        hnsw_space: "l2" (MIPS-to-L2 reduction) or "ip" (raw inner products); see the module doc.
        use_gpu: "auto" (GPU when faiss has one, flat and IVF only), True (raise without one)
            or False.
        exact_allow_max: allow lists up to this many items are scored exactly against the
            allowed items' vectors instead of filtering the index (faster, and approximate
            indexes return too few results under a very selective filter).
        query_chunk: queries per faiss call at search depth 256 (fewer when deeper, so the
            ``(queries, depth)`` work arrays stay bounded); larger calls are faster on the CPU.
        seed: IVF training sample and k-means seed. HNSW graphs are built multi-threaded and are
            repeatable only with one faiss thread (``faiss.omp_set_num_threads(1)``).
    """

    kind: str = "flat"
    metric: str = "ip"
    nlist: int | None = None
    nprobe: int = 16
    train_per_list: int = 64
    hnsw_m: int = 32
    ef_search: int = 256
    ef_construction: int = 200
    hnsw_space: str = "l2"
    use_gpu: str | bool = "auto"
    exact_allow_max: int = 4096
    query_chunk: int = 2048
    seed: int = 0

    def check(self) -> None:
        """Raise DataValidationError naming the first bad option."""
        if self.kind not in KINDS:
            raise DataValidationError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise DataValidationError(f"index metric must be one of {METRICS}, got {self.metric!r}")
        if self.hnsw_space not in HNSW_SPACES:
            raise DataValidationError(f"hnsw_space must be one of {HNSW_SPACES}, got {self.hnsw_space!r}")
        if self.use_gpu not in ("auto", True, False):
            raise DataValidationError(f"use_gpu must be 'auto', True or False, got {self.use_gpu!r}")
        positive = ("nprobe", "train_per_list", "hnsw_m", "ef_search", "ef_construction", "query_chunk")
        for name in positive + (("nlist",) if self.nlist is not None else ()):
            if int(getattr(self, name)) < 1:
                raise DataValidationError(f"index option {name} must be >= 1, got {getattr(self, name)}")
        if self.exact_allow_max < 0:
            raise DataValidationError(f"index option exact_allow_max must be >= 0, got {self.exact_allow_max}")

    def resolved_nlist(self, n_items: int) -> int:
        """IVF list count for ``n_items`` vectors."""
        cap = max(1, n_items // MIN_POINTS_PER_LIST)
        if self.nlist is not None:
            return min(self.nlist, cap)
        return min(2 ** round(math.log2(2 * math.sqrt(n_items))), cap)


def gpu_count() -> int:
    """GPUs faiss can use (0 for the faiss-cpu build)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def _wants_gpu(config: IndexConfig) -> bool:
    if config.use_gpu is True:
        if gpu_count() == 0:
            raise DataValidationError(
                "use_gpu=True but faiss sees no GPU (faiss.get_num_gpus() == 0, or the faiss-cpu build "
                "is installed): pass use_gpu='auto' to fall back to the CPU, or use_gpu=False"
            )
        if config.kind == "hnsw":
            raise DataValidationError("use_gpu=True: faiss has no GPU HNSW; use kind 'flat' or 'ivf', or use_gpu='auto'")
    return config.use_gpu is not False and config.kind != "hnsw" and gpu_count() > 0


class ItemIndex:
    """A searchable catalogue of ``(n_items, dim)`` item vectors (use :meth:`build` or :meth:`load`)."""

    def __init__(
        self,
        index: faiss.Index,
        config: IndexConfig,
        dim: int,
        items: IdMap | None,
        vectors_fingerprint: str,
        max_sq_norm: float = 0.0,
    ) -> None:
        self.config = config
        self.dim = dim
        self.items = items
        self.vectors_fingerprint = vectors_fingerprint
        self._cpu = index
        self._max_sq_norm = max_sq_norm
        self._gpu: faiss.Index | None = None
        self._gpu_resources: Any = None
        if _wants_gpu(config):
            self._gpu_resources = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)

    def __repr__(self) -> str:
        return (
            f"ItemIndex(kind={self.config.kind!r}, metric={self.config.metric!r}, n_items={self.n_items}, "
            f"dim={self.dim}, device={self.device!r})"
        )

    @property
    def n_items(self) -> int:
        return int(self._cpu.ntotal)

    @property
    def device(self) -> str:
        """"gpu" when searches run on a GPU copy of the index, else "cpu"."""
        return "cpu" if self._gpu is None else "gpu"

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        item_vectors: np.ndarray,
        items: IdMap | None = None,
        kind: str | None = None,
        metric: str | None = None,
        params: IndexConfig | None = None,
    ) -> ItemIndex:
        """Index ``(n_items, dim)`` item vectors; row ``j`` is item index ``j``.

        ``kind`` and ``metric``, when given, override those of ``params``. ``items`` (optional)
        maps the rows to external ids and is saved and checked with the index.
        """
        config = dataclasses.replace(params or IndexConfig(), **{
            name: value for name, value in (("kind", kind), ("metric", metric)) if value is not None
        })
        config.check()
        vectors = _as_matrix(item_vectors, "item_vectors")
        if items is not None and len(items) != vectors.shape[0]:
            raise DataValidationError(
                f"items id map has {len(items)} ids but item_vectors has {vectors.shape[0]} rows"
            )
        fingerprint, dim = fingerprint_arrays(vectors), vectors.shape[1]
        if config.metric == "cosine":
            vectors = _normalise(vectors)
        max_sq_norm = 0.0
        if config.kind == "flat":
            index = faiss.IndexFlatIP(vectors.shape[1])
        elif config.kind == "ivf":
            index = _trained_ivf(vectors, config)
        elif config.hnsw_space == "ip":
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            vectors, max_sq_norm = _mips_to_l2(vectors)
            index = faiss.IndexHNSWFlat(dim + 1, config.hnsw_m, faiss.METRIC_L2)
        if config.kind == "hnsw":
            index.hnsw.efConstruction = config.ef_construction
        index.add(vectors)
        return cls(index, config, dim, items, fingerprint, max_sq_norm)

    def add_items(self, item_vectors: np.ndarray, items: IdMap | None = None) -> np.ndarray:
        """Index new items without rebuilding: rows ``n_items ..`` of ``item_vectors``.

        Args:
            item_vectors: ``(n_total, dim)``, the whole catalogue after the addition; its first
                ``n_items`` rows must be the vectors this index was built from (checked by
                fingerprint), the rest are added.
            items: the id map of all ``n_total`` items (required when the index has one).
        Returns:
            ``(n_new,)`` int64 indices of the added items.

        An IVF index assigns the new vectors to its existing lists (its centroids are not
        retrained); the HNSW L2 transform pads a new vector longer than every vector it was
        built with by 0, so that item's search is approximate (its rescored score stays exact):
        rebuild when many such items accumulate.
        """
        vectors = _as_matrix(item_vectors, "item_vectors")
        n_old = self.n_items
        if vectors.shape[0] <= n_old or vectors.shape[1] != self.dim:
            raise DataValidationError(
                f"item_vectors must have shape (n_total > {n_old}, {self.dim}) (the catalogue after adding), "
                f"got {vectors.shape}"
            )
        if fingerprint_arrays(np.ascontiguousarray(vectors[:n_old])) != self.vectors_fingerprint:
            raise DataValidationError(
                f"the first {n_old} rows of item_vectors differ from the vectors this index was built from"
            )
        if self.items is not None or items is not None:
            if items is None or len(items) != vectors.shape[0]:
                raise DataValidationError(
                    f"items must be the id map of all {vectors.shape[0]} items, got "
                    f"{'none' if items is None else len(items)}"
                )
        new = vectors[n_old:]
        if self.config.metric == "cosine":
            new = _normalise(new)
        if self.config.kind == "hnsw" and self.config.hnsw_space != "ip":
            new, _ = _mips_to_l2(new, self._max_sq_norm)
        self._cpu.add(np.ascontiguousarray(new, dtype=np.float32))
        if self._gpu is not None:
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._cpu)
        self.vectors_fingerprint = fingerprint_arrays(vectors)
        self.items = items
        return np.arange(n_old, self.n_items, dtype=np.int64)

    # ----------------------------------------------------------------- search
    def search(
        self,
        query_vectors: np.ndarray,
        k: int,
        exclude: Exclude = None,
        allow: np.ndarray | Sequence[int] | None = None,
        deny: np.ndarray | Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items for each query vector.

        Args:
            query_vectors: ``(n_queries, dim)``.
            k: results per query, ``1..n_items``.
            exclude: per-query items to leave out (e.g. the user's training items): a
                ``(n_queries, n_items)`` sparse matrix (nonzeros are excluded) or one array of
                item indices per query.
            allow: ``(m,)`` item indices; only these may be returned (for every query).
            deny: ``(m,)`` item indices never returned.
        Returns:
            ``(items, scores)``: ``(n_queries, k)`` int64 and float32, best first; item -1 and
            score -inf pad a row when fewer than ``k`` items remain.
        """
        queries = self._check_queries(query_vectors)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 < k <= self.n_items:
            raise DataValidationError(f"k must be an integer in 1..n_items={self.n_items}, got {k!r}")
        excluded = _exclusion_matrix(exclude, queries.shape[0], self.n_items)
        allowed = None if allow is None else _item_array(allow, self.n_items, "allow")
        denied = None if deny is None else _item_array(deny, self.n_items, "deny")
        if allowed is not None:
            allowed = allowed if denied is None else np.setdiff1d(allowed, denied)
            if allowed.size <= self.config.exact_allow_max:
                return self._search_subset(queries, int(k), excluded, allowed)
        return self._search_index(queries, int(k), excluded, allowed, denied)

    def _search_index(
        self, queries: np.ndarray, k: int, excluded: sp.csr_matrix, allowed: np.ndarray | None, denied: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        selector, n_candidates = self._selector(allowed, denied)
        out_items = np.full((queries.shape[0], k), -1, dtype=np.int64)
        out_scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        depths = k + np.diff(excluded.indptr)
        for rows in _depth_chunks(depths, self.config.query_chunk):
            depth = min(int(depths[rows].max()), n_candidates)
            if depth == 0:
                continue
            ids, scores = self._raw_search(queries[rows], depth, selector)
            out_items[rows], out_scores[rows] = _drop_excluded(ids, scores, excluded[rows], k)
        return out_items, out_scores

    def _search_subset(
        self, queries: np.ndarray, k: int, excluded: sp.csr_matrix, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores against the allowed items only: ``(n, m)`` per chunk, then top-k."""
        out_items = np.full((queries.shape[0], k), -1, dtype=np.int64)
        out_scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        if allowed.size == 0:
            return out_items, out_scores
        vectors = self._reconstruct(allowed)
        position = np.full(self.n_items, -1, dtype=np.int64)
        position[allowed] = np.arange(allowed.size)
        keep = min(k, allowed.size)
        for start in range(0, queries.shape[0], self.config.query_chunk):
            stop = min(start + self.config.query_chunk, queries.shape[0])
            scores = queries[start:stop] @ vectors.T
            rows, cols = excluded[start:stop].nonzero()
            hit = position[cols] >= 0
            scores[rows[hit], position[cols[hit]]] = -np.inf
            top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
            top_scores = np.take_along_axis(scores, top, 1)
            valid = np.isfinite(top_scores)
            out_items[start:stop, :keep] = np.where(valid, allowed[top], -1)
            out_scores[start:stop, :keep] = np.where(valid, top_scores, -np.inf)
        return out_items, out_scores

    def _selector(self, allowed: np.ndarray | None, denied: np.ndarray | None) -> tuple[Any, int]:
        """A faiss IDSelector for the allow/deny lists (None without) and how many items pass it."""
        if allowed is not None:
            return _IdSelector(allowed), int(allowed.size)
        if denied is not None and denied.size:
            return _IdSelector(denied, negate=True), self.n_items - int(denied.size)
        return None, self.n_items

    def _raw_search(self, queries: np.ndarray, depth: int, selector: Any) -> tuple[np.ndarray, np.ndarray]:
        """faiss search ``depth`` deep: ``(n, depth)`` ids (-1 missing) and inner products, best first."""
        config = self.config
        if self._gpu is not None and selector is None and depth <= GPU_MAX_K:
            if config.kind == "ivf":
                self._gpu.nprobe = config.nprobe
            scores, ids = self._gpu.search(queries, depth)
            return ids, scores
        sel = None if selector is None else selector.selector
        if config.kind == "flat":
            params = None if sel is None else faiss.SearchParameters(sel=sel)
            scores, ids = self._cpu.search(queries, depth, params=params)
            return ids, scores
        if config.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=config.nprobe, sel=sel)
            scores, ids = self._cpu.search(queries, depth, params=params)
            return ids, scores
        params = faiss.SearchParametersHNSW(efSearch=max(config.ef_search, depth), sel=sel)
        if config.hnsw_space == "ip":
            scores, ids = self._cpu.search(queries, depth, params=params)
            return ids, scores
        augmented = np.hstack([queries, np.zeros((queries.shape[0], 1), dtype=np.float32)])
        _, ids = self._cpu.search(augmented, depth, params=params)
        return self._rescore(queries, ids)

    def _rescore(self, queries: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of HNSW's L2 results, re-sorted: ``(n, depth)`` ids -> ids, scores."""
        found = ids >= 0
        distinct, inverse = np.unique(np.where(found, ids, 0), return_inverse=True)
        vectors = self._reconstruct(distinct)
        scores = np.einsum("nd,nkd->nk", queries, vectors[inverse.reshape(ids.shape)])
        scores = np.where(found, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)

    def _reconstruct(self, item_ids: np.ndarray) -> np.ndarray:
        """``(m,)`` item indices -> ``(m, dim)`` indexed vectors (normalised for cosine)."""
        if item_ids.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._cpu.reconstruct_batch(np.ascontiguousarray(item_ids, dtype=np.int64))[:, : self.dim]

    def _check_queries(self, query_vectors: np.ndarray) -> np.ndarray:
        queries = _as_matrix(query_vectors, "query_vectors", allow_empty=True)
        if queries.shape[1] != self.dim:
            raise DataValidationError(
                f"query_vectors must have shape (n_queries, {self.dim}) to match the index, got {queries.shape}"
            )
        return _normalise(queries) if self.config.metric == "cosine" else queries

    def to_external(self, item_indices: np.ndarray) -> np.ndarray:
        """``(n, k)`` results of :meth:`search` -> external ids (None where padded)."""
        if self.items is None:
            raise DataValidationError("this index was built without an items id map")
        item_indices = np.asarray(item_indices, dtype=np.int64)
        out = np.full(item_indices.shape, None, dtype=object)
        found = item_indices >= 0
        out[found] = self.items.to_external(item_indices[found])
        return out

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write folder ``path`` atomically: ``index.faiss``, ``items.json`` (if any), ``meta.json``."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            faiss.write_index(self._cpu, str(tmp / "index.faiss"))
            if self.items is not None:
                self.items.save(tmp / "items.json")
            meta = {
                "format_version": FORMAT_VERSION,
                "kind": self.config.kind,
                "metric": self.config.metric,
                "config": dataclasses.asdict(self.config),
                "dim": self.dim,
                "n_items": self.n_items,
                "vectors_fingerprint": self.vectors_fingerprint,
                "items_fingerprint": None if self.items is None else _ids_fingerprint(self.items),
                "index_sha256": file_sha256(tmp / "index.faiss"),
                "max_sq_norm": self._max_sq_norm,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        vectors: np.ndarray | None = None,
        items: IdMap | None = None,
        use_gpu: str | bool | None = None,
    ) -> ItemIndex:
        """Load a saved index, checking that its files were saved together.

        ``vectors`` / ``items``, when given, must be the item vectors / id map the index was
        built from (e.g. the serving model's): ArtifactError otherwise. ``use_gpu`` overrides
        the saved option.
        """
        path = Path(path)
        meta = _read_meta(path)
        index_path = path / "index.faiss"
        if not index_path.is_file():
            raise ArtifactError(f"saved index {path} is incomplete: index.faiss is missing")
        if file_sha256(index_path) != meta["index_sha256"]:
            raise ArtifactError(
                f"{index_path} does not match {path / 'meta.json'} (sha256 differs): "
                "the index file was replaced or modified after saving"
            )
        index = faiss.read_index(str(index_path))
        if index.ntotal != meta["n_items"]:
            raise ArtifactError(f"{index_path} holds {index.ntotal} items, meta.json says {meta['n_items']}")
        stored = _load_items(path, meta)
        if vectors is not None and fingerprint_arrays(_as_matrix(vectors, "vectors")) != meta["vectors_fingerprint"]:
            raise ArtifactError(f"index {path} was built from different item vectors than the ones given")
        if items is not None and items != stored:
            raise ArtifactError(f"index {path} was saved with a different items id map than the one given")
        config_fields = {f.name for f in dataclasses.fields(IndexConfig)}
        config = IndexConfig(**{k: v for k, v in meta["config"].items() if k in config_fields})
        if use_gpu is not None:
            config.use_gpu = use_gpu
        config.check()
        return cls(index, config, int(meta["dim"]), stored, meta["vectors_fingerprint"], float(meta["max_sq_norm"]))


class _IdSelector:
    """A faiss IDSelectorBatch (optionally negated) that keeps the objects it points to alive."""

    def __init__(self, item_ids: np.ndarray, negate: bool = False) -> None:
        self.ids = np.ascontiguousarray(item_ids, dtype=np.int64)
        self.batch = faiss.IDSelectorBatch(self.ids)
        self.selector = faiss.IDSelectorNot(self.batch) if negate else self.batch


# --------------------------------------------------------------------------- helpers
def _as_matrix(values: Any, name: str, allow_empty: bool = False) -> np.ndarray:
    """``(n, dim)`` finite float32, C-contiguous; DataValidationError naming ``name`` otherwise."""
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    try:
        array = np.ascontiguousarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise DataValidationError(f"{name} must be a numeric (n, dim) array: {error}") from error
    if array.ndim != 2 or array.shape[1] == 0 or (array.shape[0] == 0 and not allow_empty):
        raise DataValidationError(f"{name} must have shape (n, dim) with n >= 1 and dim >= 1, got {array.shape}")
    if not np.isfinite(array).all():
        row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise DataValidationError(f"{name} has a NaN or infinite value in row {row}")
    return array


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, np.finfo(np.float32).tiny), dtype=np.float32)


def _mips_to_l2(vectors: np.ndarray, max_sq_norm: float | None = None) -> tuple[np.ndarray, float]:
    """``(n, d)`` -> ``(n, d + 1)`` vectors of equal norm whose L2 order is the inner-product order.

    ``max_sq_norm``: that of an existing index (items added later); a longer vector gets 0.
    """
    sq_norms = np.einsum("nd,nd->n", vectors, vectors)
    max_sq_norm = float(sq_norms.max()) if max_sq_norm is None else max_sq_norm
    extra = np.sqrt(np.maximum(max_sq_norm - sq_norms, 0.0))
    return np.ascontiguousarray(np.hstack([vectors, extra[:, None]]), dtype=np.float32), max_sq_norm


def _trained_ivf(vectors: np.ndarray, config: IndexConfig) -> faiss.Index:
    n, dim = vectors.shape
    nlist = config.resolved_nlist(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = config.seed
    rng = np.random.default_rng(config.seed)
    size = min(n, nlist * config.train_per_list)
    sample = vectors if size == n else vectors[np.sort(rng.choice(n, size, replace=False))]
    index.train(sample)
    index.make_direct_map()  # reconstruct() for exact allow-list scoring
    return index


def _item_array(values: Any, n_items: int, name: str) -> np.ndarray:
    """Sorted distinct int64 item indices, range-checked."""
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise DataValidationError(f"{name} must be a 1-D array of item indices, got shape {array.shape} dtype {array.dtype}")
    array = np.unique(array.astype(np.int64))
    check_indices(array, n_items, "item")
    return array


def _exclusion_matrix(exclude: Exclude, n_queries: int, n_items: int) -> sp.csr_matrix:
    """Per-query exclusions as a ``(n_queries, n_items)`` CSR with sorted, distinct indices."""
    if exclude is None:
        return sp.csr_matrix((n_queries, n_items), dtype=np.int8)
    if sp.issparse(exclude):
        if exclude.shape != (n_queries, n_items):
            raise DataValidationError(
                f"exclude must have shape (n_queries, n_items) = ({n_queries}, {n_items}), got {exclude.shape}"
            )
        matrix = sp.csr_matrix(exclude)
        matrix.eliminate_zeros()
    else:
        rows = [np.asarray(row, dtype=np.int64).reshape(-1) for row in exclude]
        if len(rows) != n_queries:
            raise DataValidationError(f"exclude must hold one item array per query ({n_queries}), got {len(rows)}")
        lengths = np.fromiter((row.size for row in rows), dtype=np.int64, count=n_queries)
        indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        check_indices(indices, n_items, "item")
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        matrix = sp.csr_matrix((np.ones(indices.size, dtype=np.int8), indices, indptr), shape=(n_queries, n_items))
    matrix.sum_duplicates()  # also sorts indices; duplicates would overcount the search depth
    return matrix


def _depth_chunks(depths: np.ndarray, query_chunk: int) -> list[np.ndarray]:
    """Query rows grouped so depths in a group differ by under 2x; ``query_chunk * 256 / depth`` rows at most.

    One heavy user then deepens only the search of users with similar histories, and the
    ``(rows, depth)`` work arrays stay bounded.
    """
    order = np.argsort(depths, kind="stable")
    bucket = np.floor(np.log2(np.maximum(depths[order], 1))).astype(np.int64)
    chunks = []
    for group in np.split(order, np.flatnonzero(np.diff(bucket)) + 1):
        if group.size == 0:
            continue
        step = max(1, query_chunk * 256 // int(depths[group[-1]]))
        chunks += [group[start : start + step] for start in range(0, group.size, step)]
    return chunks


def _drop_excluded(ids: np.ndarray, scores: np.ndarray, excluded: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove excluded and missing results from ``(n, depth)`` best-first rows; keep ``(n, k)``."""
    n, depth = ids.shape
    n_items = excluded.shape[1]
    drop = ids < 0
    if excluded.nnz:
        rows, cols = excluded.nonzero()
        row_of = np.arange(n, dtype=np.int64)[:, None]
        drop |= np.isin(row_of * n_items + ids, rows.astype(np.int64) * n_items + cols)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept results first, in score order
    ids, scores, drop = (np.take_along_axis(a, order, 1) for a in (ids, scores, drop))
    ids = np.where(drop, -1, ids)
    scores = np.where(drop, -np.inf, scores).astype(np.float32)
    if depth < k:
        ids = np.pad(ids, ((0, 0), (0, k - depth)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, k - depth)), constant_values=-np.inf)
    return ids, scores


def _ids_fingerprint(items: IdMap) -> str:
    return hashlib.sha256("\x1f".join(items.external_ids.tolist()).encode()).hexdigest()[:16]


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise ArtifactError(f"{path} is not a saved acfrec index: meta.json is missing")
    try:
        meta = json.loads(meta_path.read_text())
        missing = [key for key in ("config", "dim", "n_items", "vectors_fingerprint", "index_sha256") if key not in meta]
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{meta_path} is not valid JSON: {error}") from error
    if missing:
        raise ArtifactError(f"{meta_path} lacks {missing}")
    return meta


def _load_items(path: Path, meta: dict[str, Any]) -> IdMap | None:
    expected = meta.get("items_fingerprint")
    if expected is None:
        return None
    items = IdMap.load(path / "items.json")
    if len(items) != meta["n_items"]:
        raise ArtifactError(f"{path / 'items.json'} has {len(items)} ids but the index holds {meta['n_items']} items")
    if _ids_fingerprint(items) != expected:
        raise ArtifactError(f"{path / 'items.json'} does not match meta.json (fingerprint differs): the id map was modified")
    return items
