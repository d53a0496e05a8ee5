"""The cold-start protocol: rank the held-out cold items of a :class:`~acfrec.data.cold.ColdSplit`.

Every user with at least one cold interaction is ranked twice from one ``(chunk, n_items)`` score
matrix over the full item space (warm items first, then cold, see :mod:`acfrec.data.cold`):

* ``"cold"``: among the cold items only (the new-items shelf);
* ``"all"``: among all items, cold ones mixed into the warm catalogue, without the user's known
  warm interactions (train, valid and test: consumed, so neither relevant nor fair competitors).

A user's relevant items are all its cold interactions, so unlike leave-one-out a user has several:
``Recall@k`` = relevant items in the top ``k`` / relevant items, ``NDCG@k`` = DCG@k / ideal DCG@k
(binary gains), both per user, then averaged over users. Ties are pessimistic, as everywhere in
:mod:`acfrec.eval`: a relevant item is placed after every non-relevant candidate scoring the same,
so a constant scorer gets Recall 0 whenever there are more candidates than ``k``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import torch

from acfrec.data.cold import ColdSplit
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.eval.compare import compare, format_table
from acfrec.eval.metrics import metric_values
from acfrec.eval.protocols import _as_numpy_scores, _chunks, _raise_on_nan, model_label
from acfrec.utils import atomic_dir

COLD_PROTOCOLS = ("cold", "all")
FORMAT_VERSION = 1
DEFAULT_COLD_KS = (10, 20, 50)
_COLD_METRICS = ("Recall", "NDCG", "HR")


@dataclass
class ColdResult:
    """Outcome of :func:`evaluate_cold`; duck-compatible with :func:`acfrec.eval.compare`.

    Attributes:
        model_name: label of the scorer.
        users: ``(n_eval,)`` int64 evaluated users (those with a cold interaction).
        offsets: ``(n_eval + 1,)`` int64; user ``users[e]``'s relevant items own entries
            ``offsets[e]:offsets[e + 1]`` of every positions array.
        positions: protocol -> ``(n_relevant,)`` int64 0-based position of every relevant item
            in the user's pessimistic ranking (ordered by user, then cold item index).
        metrics: protocol -> {"Recall@20": mean over users, "NDCG@20": ..., ...}.
        seconds: protocol -> wall seconds of ranking (scoring counted once, under ``"cold"``).
        ks: the cutoffs of ``metrics``.
        target: always ``"cold"`` (lets compare() check that results are alike).
    """

    model_name: str
    users: np.ndarray
    offsets: np.ndarray
    positions: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    seconds: dict[str, float]
    ks: tuple[int, ...] = field(default=DEFAULT_COLD_KS)
    target: str = "cold"

    def per_user(self, metric: str = "Recall@20", protocol: str = "cold") -> np.ndarray:
        """``(n_eval,)`` float64 per-user ``Recall@k``, ``NDCG@k`` or ``HR@k`` (any k) under ``protocol``."""
        if protocol not in self.positions:
            raise DataValidationError(
                f"{self.model_name} was not evaluated with cold protocol {protocol!r}; it has {sorted(self.positions)}"
            )
        return per_user_values(self.positions[protocol], self.offsets, metric)

    def table(self) -> pd.DataFrame:
        """Long form: one row per (protocol, metric), columns ``model, protocol, metric, value``."""
        rows = [(self.model_name, p, m, v) for p, values in self.metrics.items() for m, v in values.items()]
        return pd.DataFrame(rows, columns=["model", "protocol", "metric", "value"])

    def save(self, path: str | Path) -> Path:
        """Write folder ``path`` atomically: ``positions.parquet`` (``user`` of every relevant item,
        one position column per protocol), ``metrics.json`` and ``meta.json``."""
        path = Path(path)
        counts = np.diff(self.offsets)
        with atomic_dir(path) as tmp:
            frame = pl.DataFrame({"user": np.repeat(self.users.astype(np.int64), counts)})
            frame = frame.with_columns([pl.Series(p, found.astype(np.int64)) for p, found in self.positions.items()])
            frame.write_parquet(tmp / "positions.parquet")
            (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
            meta = {
                "format_version": FORMAT_VERSION, "model_name": self.model_name, "target": self.target,
                "protocols": list(self.positions), "ks": list(self.ks), "seconds": self.seconds,
                "users": self.users.astype(np.int64).tolist(), "counts": counts.astype(np.int64).tolist(),
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ColdResult:
        """Read a folder written by :meth:`save`; ArtifactError names what is missing or wrong."""
        path = Path(path)
        for name in ("meta.json", "metrics.json", "positions.parquet"):
            if not (path / name).is_file():
                raise ArtifactError(f"{path} is not a saved cold-start result: {name} is missing")
        try:
            meta = json.loads((path / "meta.json").read_text())
            frame = pl.read_parquet(path / "positions.parquet")
            missing = [c for c in ["user", *meta["protocols"]] if c not in frame.columns]
            if missing:
                raise ArtifactError(f"{path / 'positions.parquet'} lacks column(s) {missing}")
            counts = np.asarray(meta["counts"], dtype=np.int64)
            if int(counts.sum()) != frame.height:
                raise ArtifactError(f"{path / 'positions.parquet'} has {frame.height} rows, meta.json says {int(counts.sum())}")
            return cls(
                model_name=meta["model_name"],
                users=np.asarray(meta["users"], dtype=np.int64),
                offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                positions={p: frame[p].to_numpy().astype(np.int64) for p in meta["protocols"]},
                metrics=json.loads((path / "metrics.json").read_text()),
                seconds={k: float(v) for k, v in meta["seconds"].items()},
                ks=tuple(meta["ks"]),
                target=meta["target"],
            )
        except (KeyError, json.JSONDecodeError) as error:
            raise ArtifactError(f"{path} holds a malformed cold-start result: {error!r}") from error


def per_user_values(positions: np.ndarray, offsets: np.ndarray, metric: str) -> np.ndarray:
    """Per-user metric from the positions of each user's relevant items.

    Args:
        positions: ``(n_relevant,)`` 0-based positions, grouped by user.
        offsets: ``(n_users + 1,)``; every user owns at least one position.
        metric: ``"Recall@k"`` (hits / relevant), ``"NDCG@k"`` (DCG / ideal DCG) or ``"HR@k"``
            (1.0 if any relevant item is in the top ``k``).
    Returns:
        ``(n_users,)`` float64.
    """
    name, _, cutoff = metric.partition("@")
    if name not in _COLD_METRICS or not cutoff:
        raise DataValidationError(f"unknown cold-start metric {metric!r}: use Recall@k, NDCG@k or HR@k (e.g. 'Recall@20')")
    counts = np.diff(offsets)
    owner = np.repeat(np.arange(counts.size), counts)
    if name == "NDCG":
        # The single-item NDCG of metrics.py is the discounted gain of one relevant item.
        dcg = np.bincount(owner, metric_values(positions, f"NDCG@{cutoff}"), minlength=counts.size)
        ideal = np.cumsum(metric_values(np.arange(max(int(counts.max(initial=1)), 1)), f"NDCG@{cutoff}"))
        return dcg / ideal[counts - 1]
    hits = np.bincount(owner, metric_values(positions, f"HR@{cutoff}"), minlength=counts.size)
    return hits / counts if name == "Recall" else (hits > 0).astype(np.float64)


def evaluate_cold(
    model: Any,
    cold: ColdSplit,
    ks: Iterable[int] = DEFAULT_COLD_KS,
    protocols: Sequence[str] = COLD_PROTOCOLS,
    chunk_size: int = 1024,
    label: str | None = None,
) -> ColdResult:
    """Rank every cold-test user's cold items under the ``"cold"`` and ``"all"`` protocols.

    Args:
        model: a scorer over the full item space of ``cold`` (warm then cold): an object with
            ``score_all(users) -> (chunk, n_items)`` or a callable doing the same; torch or numpy.
        ks: cutoffs of the summary metrics.
        chunk_size: users scored at once; memory is about ``chunk_size x n_items x 24`` bytes.
        label: name in results and tables (default: the model's registry or class name).
    Returns:
        :class:`ColdResult`.
    Raises:
        DataValidationError: unknown protocol, no cold-test user, wrong score shape or NaN scores.
    """
    unknown = [p for p in protocols if p not in COLD_PROTOCOLS]
    if unknown or not protocols:
        raise DataValidationError(f"protocols must be a non-empty subset of {COLD_PROTOCOLS}, got {tuple(protocols)}")
    score_all = _score_function(model)
    users = cold.eval_users()
    if users.size == 0:
        raise DataValidationError("the cold split has no user with a cold interaction: nothing to evaluate")
    relevant = cold.cold_test[users]
    known = cold.known() if "all" in protocols else None
    positions = {p: np.empty(relevant.nnz, dtype=np.int64) for p in dict.fromkeys(protocols)}
    seconds = dict.fromkeys(positions, 0.0)
    for start in _chunks(users.size, chunk_size):
        chunk = users[start : start + chunk_size]
        clock = time.perf_counter()
        scores = _chunk_scores(model, score_all, chunk, cold.n_items)
        rows, cols = relevant[start : start + chunk.size].nonzero()
        pairs = slice(relevant.indptr[start], relevant.indptr[start + chunk.size])
        for protocol in positions:
            if protocol == "cold":
                found = relevant_positions(scores[:, cold.n_warm :], rows, cols - cold.n_warm)
            else:
                found = relevant_positions(scores, rows, cols, candidates=~known[chunk].toarray().astype(bool))
            positions[protocol][pairs] = found
            seconds[protocol] += time.perf_counter() - clock
            clock = time.perf_counter()
    offsets = relevant.indptr.astype(np.int64)
    ks = tuple(int(k) for k in ks)
    metrics = {
        p: {f"{name}@{k}": float(per_user_values(found, offsets, f"{name}@{k}").mean()) for k in ks for name in ("Recall", "NDCG")}
        for p, found in positions.items()
    }
    return ColdResult(label or model_label(model), users, offsets, positions, metrics, seconds, ks)


def relevant_positions(
    scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, candidates: np.ndarray | None = None
) -> np.ndarray:
    """Pessimistic 0-based position of every relevant (row, col) in its row's ranking.

    Sorting a row by score (descending) with non-relevant items first among equals, the ``j``-th
    relevant item of a row (in that order) sits after the ``j`` relevant items before it and
    after every non-relevant candidate scoring at least as much. Counting candidates ``>=`` a
    score is a batched binary search in each row's sorted scores.

    Args:
        scores: ``(c, n)`` scores of the candidates of ``c`` users.
        rows, cols: ``(p,)`` relevant pairs, grouped by row (CSR order); relevant items must be
            candidates.
        candidates: ``(c, n)`` bool, False for items removed from the ranking; None keeps all.
    Returns:
        ``(p,)`` int64 positions, aligned with ``rows``.
    """
    values = torch.from_numpy(np.ascontiguousarray(scores))
    ordered, order = torch.sort(values, dim=1)
    n = values.shape[1]
    counts = np.bincount(rows, minlength=values.shape[0])
    starts = np.cumsum(counts) - counts
    slot = np.arange(rows.size) - starts[rows]
    targets = scores[rows, cols]
    padded = torch.zeros((values.shape[0], int(counts.max(initial=0))), dtype=values.dtype)
    padded[rows, slot] = torch.from_numpy(np.ascontiguousarray(targets))
    first_at_least = torch.searchsorted(ordered, padded)  # (c, max_relevant)
    if candidates is None:
        at_least = n - first_at_least
    else:
        kept = torch.from_numpy(candidates).gather(1, order).to(torch.int64)
        # Candidates at sorted positions >= i, for every i (one extra zero column for i = n).
        from_here = torch.cat([kept.flip(1).cumsum(1).flip(1), torch.zeros((kept.shape[0], 1), dtype=torch.int64)], 1)
        at_least = from_here.gather(1, first_at_least)
    relevant_at_least, relevant_before = _relevant_ties(rows, targets, starts)
    return at_least.numpy()[rows, slot] - relevant_at_least + relevant_before


def _relevant_ties(rows: np.ndarray, targets: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per relevant item ``(p,)``: relevant items of its row scoring ``>=`` it (itself included),
    and its index among its row's relevant items by descending score (ties in column order)."""
    order = np.lexsort((-targets, rows))
    row, score = rows[order], targets[order]
    new_group = np.ones(order.size, dtype=bool)
    new_group[1:] = (row[1:] != row[:-1]) | (score[1:] != score[:-1])
    group_last = np.flatnonzero(np.append(new_group[1:], True))
    at_least = np.empty(order.size, dtype=np.int64)
    before = np.empty(order.size, dtype=np.int64)
    at_least[order] = group_last[np.cumsum(new_group) - 1] - starts[row] + 1
    before[order] = np.arange(order.size) - starts[row]
    return at_least, before


def _score_function(model: Any) -> Callable[[np.ndarray], Any]:
    score_all = getattr(model, "score_all", None)
    if callable(score_all):
        return score_all
    if callable(model):
        return model
    raise DataValidationError(
        f"{model_label(model)} cannot be evaluated: pass a model with score_all(users) or a callable users -> scores"
    )


def _chunk_scores(model: Any, score_all: Callable[[np.ndarray], Any], users: np.ndarray, n_items: int) -> np.ndarray:
    scores = _as_numpy_scores(score_all(users))
    if scores.shape != (users.size, n_items):
        raise DataValidationError(
            f"{model_label(model)} returned scores of shape {tuple(scores.shape)}, expected (chunk, n_items) = "
            f"({users.size}, {n_items}) over the cold split's full item space (warm then cold items)"
        )
    _raise_on_nan(model, scores, users)
    return scores


def cold_table(
    results: Mapping[str, ColdResult] | Sequence[ColdResult],
    metrics: Sequence[str] = ("Recall@20", "NDCG@20"),
    protocol: str = "cold",
    markdown: bool = True,
    test: str = "wilcoxon",
) -> str:
    """The :func:`acfrec.eval.compare` table of cold-start results, as text.

    Columns ``"<protocol> <metric>"`` for both protocols and each of ``metrics``; the paired test
    against the best model uses ``metrics[0]`` under ``protocol``.
    """
    frame = compare(results, metric=metrics[0], protocol=protocol, test=test)  # type: ignore[arg-type]
    return format_table(frame, metrics=metrics, markdown=markdown)

