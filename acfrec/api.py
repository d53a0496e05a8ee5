"""The Python scoring API: a trained model served by external ids.

::

    import acfrec
    rec = acfrec.load("runs/acf-ml100k")          # a model folder, or an MLflow URI (runs:/..., models:/...)
    rec.score(user="196", items=["242", "302"])   # user, item, score: candidate scoring
    rec.recommend(users=["196", "186"], k=10)     # user, rank, item, score (rank 0 = top)
    rec.recommend_for_history(items=["242", "51"], k=10)   # a new user known by what they consumed
    rec.explain(user="196", item="302")           # history items (and components) behind a score
    rec.similar_items(item="242", k=10)           # item, rank, similar_item, score

Every id in and out is an external id (a string: ``196`` and ``"196"`` are the same user). Frames
are pandas by default, polars with ``output="polars"``. Ranks are 0-based, as everywhere in acfrec
(and in ``acfrec demo``'s ``top10.parquet``). ``exclude_seen`` drops the items the model was
trained on for that user. Top-N of models whose score is an inner product (BPR-MF, FISM, SVD++,
ALS, implicit-BPR) is served by an :class:`acfrec.index.ItemIndex` (exact flat by default, IVF or
HNSW through ``index=IndexConfig(...)``); other models (ItemPop, ACF) rank ``score_all``.

A service only reads its model after construction, so one instance can serve many threads at
once; the item index is built once, on first use, under a lock.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp
import yaml

from acfrec.data.idmap import IdMap
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.index import IndexConfig, ItemIndex, model_vectors
from acfrec.models.base import Recommender, masked_top_k

OUTPUTS = ("pandas", "polars")
MLFLOW_ARTIFACT_KEY = "acfrec_model"  # the pyfunc artifact holding the model folder
_PAIR_CHUNK = 4096  # (user, item) pairs scored per model call
_HISTORY_CHUNK = 1024  # new-user histories scored per call: (chunk, n_items) scores at a time
_ID_COLUMNS = ("user", "item", "similar_item")

Ids = str | int | Sequence[str | int] | np.ndarray | pd.Series | pl.Series
Frame = pd.DataFrame | pl.DataFrame


def load(path_or_uri: str | Path, tracking_uri: str | None = None, index: IndexConfig | None = None) -> RecommenderService:
    """Load a trained model for serving.

    Args:
        path_or_uri: a model folder written by ``model.save`` (``acfrec train`` / ``acfrec
            demo``), a local MLflow model folder logged by :func:`acfrec.tracking.pyfunc.log_recommender`,
            or an MLflow URI of one (``runs:/<run_id>/model``, ``models:/<name>/<version>``, ...).
        tracking_uri: MLflow tracking server for ``runs:/`` and ``models:/`` URIs; default
            :func:`acfrec.tracking.default_tracking_uri` (``./mlruns/mlflow.db`` unless set).
        index: how top-N is served for inner-product models (default exact flat).
    """
    path = Path(path_or_uri)
    if path.exists():
        return RecommenderService.from_path(path, index)
    if isinstance(path_or_uri, str) and ":/" in path_or_uri:
        from acfrec.tracking.pyfunc import download_model

        with tempfile.TemporaryDirectory(prefix="acfrec-model-") as tmp:
            # everything is read into memory, so the download can go once loaded
            return RecommenderService.from_path(download_model(path_or_uri, tmp, tracking_uri), index)
    raise ArtifactError(f"no model at {str(path_or_uri)!r}: not an existing folder, nor an MLflow URI (runs:/..., models:/...)")


def model_folder(path: str | Path) -> Path:
    """The acfrec model folder at ``path``: ``path`` itself, or the one inside an MLflow pyfunc model folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        artifact = (flavor.get("artifacts") or {}).get(MLFLOW_ARTIFACT_KEY)
        if artifact is None:
            raise ArtifactError(f"{mlmodel} is an MLflow model but not an acfrec one (no {MLFLOW_ARTIFACT_KEY!r} artifact)")
        return path / artifact["path"]
    raise ArtifactError(f"{path} is not a saved acfrec model: neither meta.json nor an MLflow MLmodel file is there")


class RecommenderService:
    """A fitted model plus its id maps, answering requests in external ids.

    Args:
        model: a fitted :class:`~acfrec.models.Recommender`.
        users, items: id maps; default the model's own (set when it was fitted on a Split and
            saved with it).
        index: how top-N is served for inner-product models (default exact flat).
    """

    def __init__(
        self, model: Recommender, users: IdMap | None = None, items: IdMap | None = None, index: IndexConfig | None = None
    ) -> None:
        n_users, n_items = model._require_fitted().shape
        users = model.users if users is None else users
        items = model.items if items is None else items
        if users is None or items is None:
            raise ArtifactError(
                f"{type(model).__name__} has no external id maps (fitted on a bare matrix, or saved before models "
                "kept them): pass users= and items= (e.g. split.users, split.items)"
            )
        if (len(users), len(items)) != (n_users, n_items):
            raise DataValidationError(
                f"id maps ({len(users)} users, {len(items)} items) do not match the model ({n_users} users, {n_items} items)"
            )
        self.model, self.users, self.items = model, users, items
        module = getattr(model, "module", None)
        if module is not None:
            module.eval()  # once, so concurrent score_all calls never toggle the mode under each other
        self.index_config = index or IndexConfig()
        self.servable = _has_vectors(model)
        self._index: ItemIndex | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_path(cls, path: str | Path, index: IndexConfig | None = None) -> RecommenderService:
        """A service for the model folder at ``path`` (see :func:`model_folder`)."""
        return cls(Recommender.load(model_folder(path)), index=index)

    def __repr__(self) -> str:
        return (
            f"RecommenderService(model={self.model.name!r}, users={len(self.users)}, items={len(self.items)}, "
            f"top_n={'index ' + self.index_config.kind if self.servable else 'score_all'})"
        )

    # ------------------------------------------------------------------ scoring
    def score(self, user: str | int, items: Ids, output: str = "pandas") -> Frame:
        """Scores of candidate ``items`` for one ``user``, in the candidates' order.

        Returns a frame ``user, item, score`` (one row per candidate, higher is better).
        """
        user_id = _single_id(user, "user")
        item_ids = _id_list(items, "items", single=False)
        if not item_ids:
            raise DataValidationError("empty candidate list: give at least one item id in items")
        return self.score_pairs([user_id] * len(item_ids), item_ids, output)

    def score_pairs(self, users: Ids, items: Ids, output: str = "pandas") -> Frame:
        """Scores of ``(users[i], items[i])`` pairs; returns a frame ``user, item, score``."""
        user_ids, item_ids = _id_list(users, "users"), _id_list(items, "items")
        if len(user_ids) != len(item_ids):
            raise DataValidationError(f"users and items must pair up: {len(user_ids)} users, {len(item_ids)} items")
        _check_output(output)
        user_index, item_index = self.users.to_index(user_ids), self.items.to_index(item_ids)
        scores = np.empty(len(user_ids), dtype=np.float32)
        for start in range(0, scores.size, _PAIR_CHUNK):
            rows = slice(start, start + _PAIR_CHUNK)
            # one candidate per row: (chunk, 1), so the model's own pair scorer does the work
            scores[rows] = self.model.score(user_index[rows], item_index[rows, None])[:, 0]
        return _frame({"user": user_ids, "item": item_ids, "score": scores}, output)

    # ---------------------------------------------------------------- top-N
    def recommend(
        self,
        users: Ids,
        k: int = 10,
        exclude_seen: bool = True,
        allow: Ids | None = None,
        deny: Ids | None = None,
        output: str = "pandas",
    ) -> Frame:
        """Top-``k`` items of each user; returns a frame ``user, rank, item, score``.

        Args:
            users: one user id or a list of them.
            exclude_seen: leave out the user's training items.
            allow: only these item ids may be recommended. deny: these never are.
        Users with fewer than ``k`` eligible items get fewer rows.
        """
        user_ids = _id_list(users, "users")
        self._check_k(k, len(self.items))
        _check_output(output)
        user_index = self.users.to_index(user_ids)
        allowed, denied = self._optional_items(allow, "allow"), self._optional_items(deny, "deny")
        if self.servable:
            queries, _ = model_vectors(self.model, user_index)
            seen = self.model.seen[user_index] if exclude_seen else None
            items, scores = self.item_index().search(queries, k, exclude=seen, allow=allowed, deny=denied)
        else:
            items, scores = self.model.recommend(user_index, k, exclude_seen=exclude_seen, allow=allowed, deny=denied)
        return self._top_frame("user", np.asarray(user_ids, dtype=object), items, scores, output)

    def recommend_for_history(
        self,
        items: Ids | Sequence[Ids],
        k: int = 10,
        exclude_history: bool = True,
        allow: Ids | None = None,
        deny: Ids | None = None,
        output: str = "pandas",
    ) -> Frame:
        """Top-``k`` items for new users known only by the items they consumed.

        Args:
            items: one history (a list of item ids) or several (a list of such lists).
            exclude_history: leave out the history's own items.
        Returns:
            a frame ``history, rank, item, score``; ``history`` is the 0-based position of the
            history in ``items``.
        Needs a model with ``score_histories`` (NotImplementedError naming the model otherwise).
        """
        histories = self._history_matrix(items)
        self._check_k(k, len(self.items))
        _check_output(output)
        blocked = self.model.blocked_items(self._optional_items(allow, "allow"), self._optional_items(deny, "deny"))
        out_items = np.empty((histories.shape[0], k), dtype=np.int64)
        out_scores = np.empty((histories.shape[0], k), dtype=np.float32)
        for start in range(0, histories.shape[0], _HISTORY_CHUNK):
            chunk = histories[start : start + _HISTORY_CHUNK]
            rows = slice(start, start + chunk.shape[0])
            scores = self.model.score_histories(chunk)
            out_items[rows], out_scores[rows] = masked_top_k(scores, k, [chunk] if exclude_history else [], blocked)
        return self._top_frame("history", np.arange(histories.shape[0]), out_items, out_scores, output)

    def similar_items(self, item: Ids, k: int = 10, output: str = "pandas") -> Frame:
        """The ``k`` items most similar to each given item (cosine of item vectors, the item itself left out).

        Returns a frame ``item, rank, similar_item, score``.
        """
        item_ids = _id_list(item, "item")
        self._check_k(k, len(self.items) - 1, "other items in the catalogue")
        _check_output(output)
        similar, scores = self.model.similar_items(self.items.to_index(item_ids), k)
        return self._top_frame("item", np.asarray(item_ids, dtype=object), similar, scores, output, "similar_item")

    # --------------------------------------------------------------- explain
    def explain(self, user: str | int, item: str | int, top_items: int = 5, top_components: int = 3) -> dict[str, Any]:
        """Why ``item`` scores what it does for ``user``, in external ids.

        For ACF: ``{"user", "item", "score", "user_term", "history": [{"item", "alpha",
        "contribution", "components": [{"component", "beta"}]}]}``: the history items with the
        largest attention weights and, per item, its most attended components (indices into
        that item's own components). FISM and SVD++ give the same shape, their score split
        exactly into ``bias + user_term + sum of per-history-item contributions`` (no
        components). Other models raise NotImplementedError.
        """
        explain = getattr(self.model, "explain", None)
        if explain is None:
            raise NotImplementedError(
                f"{self.model.name!r} models cannot explain a score: it is not built from the user's history "
                "(explanations exist for acf, fism and svdpp)"
            )
        user_index = int(self.users.to_index(_single_id(user, "user"))[0])
        item_index = int(self.items.to_index(_single_id(item, "item"))[0])
        found = explain(user_index, item_index, top_items=top_items, top_components=top_components)
        history = [dict(entry, item=str(self.items.external_ids[entry["item"]])) for entry in found["history"]]
        return dict(found, user=str(user), item=str(item), history=history)

    # -------------------------------------------------------------- new items
    def add_items(self, components: Any, item_ids: Ids | None = None) -> list[str]:
        """Add items nobody has consumed yet, from their content, without retraining.

        The model computes the new items' vectors from their components (ACF trained with
        ``content_tower=True``); a built item index gets them inserted, so ``recommend``,
        ``score`` and ``similar_items`` serve them at once. Call it between requests: it changes
        the model.

        Args:
            components: a :class:`~acfrec.data.components.ComponentStore` (by default every store
                item the model does not know yet) or aligned components of the new items.
            item_ids: which store items to add, or the names of the aligned rows.
        Returns:
            the added items' external ids, in index order.
        """
        add = getattr(self.model, "add_items", None)
        if add is None:
            raise DataValidationError(
                f"{type(self.model).__name__} cannot add items from content: train ACF with content_tower=True"
            )
        if self.model.items is None or self.model.items != self.items:
            raise ArtifactError("add_items needs the model's own item id map (the model was given another one)")
        ids = None if item_ids is None else _id_list(item_ids, "item_ids")
        with self._lock:
            added = add(components, ids)
            self.items = self.model.items
            if self._index is not None:
                _, vectors = model_vectors(self.model, np.zeros(1, dtype=np.int64))
                self._index.add_items(vectors, items=self.items)
        return [str(x) for x in self.items.to_external(added)]

    # ---------------------------------------------------------------- helpers
    def item_index(self) -> ItemIndex:
        """The item index serving top-N (built on first use from the model's item vectors)."""
        if self._index is None:
            with self._lock:
                if self._index is None:
                    _, vectors = model_vectors(self.model, np.zeros(1, dtype=np.int64))
                    self._index = ItemIndex.build(vectors, items=self.items, params=self.index_config)
        return self._index

    @staticmethod
    def _check_k(k: int, limit: int, limit_name: str = "items in the catalogue") -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an integer, got {type(k).__name__} {k!r}")
        if k < 1:
            raise DataValidationError(f"k must be at least 1, got {k}")
        if k > limit:
            raise DataValidationError(f"k={k} is larger than the catalogue: there are {limit} {limit_name}")

    def _optional_items(self, ids: Ids | None, name: str) -> np.ndarray | None:
        return None if ids is None else self.items.to_index(_id_list(ids, name))

    def _history_matrix(self, items: Ids | Sequence[Ids]) -> sp.csr_matrix:
        """One history or a list of them -> ``(n, n_items)`` CSR of 1.0."""
        is_batch = isinstance(items, (list, tuple)) and bool(items) and not _is_id(items[0])
        histories = [_id_list(h, f"items[{i}]") for i, h in enumerate(items)] if is_batch else [_id_list(items, "items")]
        for position, history in enumerate(histories):
            if not history:
                raise DataValidationError(f"history {position} is empty: give at least one consumed item id")
        indices = self.items.to_index([item for history in histories for item in history])
        rows = np.repeat(np.arange(len(histories)), [len(history) for history in histories])
        matrix = sp.csr_matrix(
            (np.ones(indices.size, dtype=np.float32), (rows, indices)), shape=(len(histories), len(self.items))
        )
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        return matrix

    def _top_frame(
        self, key: str, keys: np.ndarray, items: np.ndarray, scores: np.ndarray, output: str, item_column: str = "item"
    ) -> Frame:
        """``(n,)`` query keys and ``(n, k)`` results (-1 padded) -> long frame ``key, rank, item_column, score``."""
        n, k = items.shape
        found = (items >= 0).ravel()
        return _frame(
            {
                key: np.repeat(keys, k)[found],
                "rank": np.tile(np.arange(k, dtype=np.int64), n)[found],
                item_column: self.items.external_ids[items.ravel()[found]],
                "score": scores.ravel()[found].astype(np.float32),
            },
            output,
        )


# ------------------------------------------------------------------ id arguments
def _is_id(value: object) -> bool:
    return isinstance(value, (str, int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _single_id(value: object, name: str) -> str:
    if not _is_id(value):
        raise TypeError(f"{name} must be one id (str or int), got {type(value).__name__} {value!r}")
    return str(value)


def _id_list(values: object, name: str, single: bool = True) -> list[str]:
    """Ids as a list of str; a bare id counts as a list of one when ``single``; TypeError otherwise."""
    if _is_id(values):
        if not single:
            raise TypeError(f"{name} must be a list of ids, got the single {type(values).__name__} {values!r}; wrap it in a list")
        return [str(values)]
    if isinstance(values, (pd.Series, pl.Series)):
        values = values.to_list()
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be an id or a list of ids, got {type(values).__name__}")
    bad = next((i for i, v in enumerate(values) if not _is_id(v)), None)
    if bad is not None:
        raise TypeError(f"{name}[{bad}] must be an id (str or int), got {type(values[bad]).__name__} {values[bad]!r}")
    return [str(v) for v in values]


def _has_vectors(model: Recommender) -> bool:
    """Whether ``model_vectors`` can serve ``model`` from an inner-product index."""
    return all(hasattr(model, name) for name in ("user_vectors", "item_vectors")) or all(
        hasattr(model, name) for name in ("user_factors", "item_factors")
    )


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise DataValidationError(f"output must be one of {OUTPUTS}, got {output!r}")


def _frame(columns: dict[str, Any], output: str) -> Frame:
    """Columns -> a pandas or polars frame; ids as strings, ranks int64, scores float32."""
    if output == "polars":
        return pl.DataFrame(
            [pl.Series(name, list(values), dtype=pl.String) if name in _ID_COLUMNS else pl.Series(name, values)
             for name, values in columns.items()]
        )
    return pd.DataFrame(
        {name: np.asarray(values, dtype=object) if name in _ID_COLUMNS else values for name, values in columns.items()}
    )
