"""``evaluate``: score a fitted model on a Split under the full and sampled protocols.

Keeps the per-user ranks (not just the means) so models can be compared with paired tests
(:mod:`acfrec.eval.compare`) and metrics at any cutoff recomputed later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp

from acfrec.data.split import Split
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.eval.metrics import metric_values, summarise
from acfrec.eval.protocols import full_ranking_ranks, model_label, sampled_ranks
from acfrec.utils import atomic_dir

FORMAT_VERSION = 1
PROTOCOLS = ("full", "sampled")
DEFAULT_KS = (10, 20, 50, 100)


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        model_name: registry name of the model (or a label chosen by the caller).
        target: ``"test"`` or ``"valid"``.
        users: ``(n_eval,)`` int64 evaluated users, in the order of every ranks array.
        ranks: protocol -> ``(n_eval,)`` int64 0-based rank of the held-out item.
        metrics: protocol -> {"HR@10": mean, ...}.
        seconds: protocol -> wall time of ranking.
        ks: the cutoffs of ``metrics``.
    """

    model_name: str
    target: str
    users: np.ndarray
    ranks: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    seconds: dict[str, float]
    ks: tuple[int, ...] = field(default=DEFAULT_KS)

    def table(self) -> pd.DataFrame:
        """Long form: one row per (protocol, metric), columns ``model, protocol, metric, value``."""
        rows = [
            (self.model_name, protocol, metric, value)
            for protocol, values in self.metrics.items()
            for metric, value in values.items()
        ]
        return pd.DataFrame(rows, columns=["model", "protocol", "metric", "value"])

    def per_user(self, metric: str = "NDCG@10", protocol: str = "full") -> np.ndarray:
        """``(n_eval,)`` float64 per-user values of ``metric`` (any cutoff, e.g. "HR@5") under ``protocol``."""
        if protocol not in self.ranks:
            raise DataValidationError(
                f"{self.model_name} was not evaluated with protocol {protocol!r}; it has {sorted(self.ranks)}"
            )
        return metric_values(self.ranks[protocol], metric)

    def save(self, path: str | Path) -> Path:
        """Write folder ``path`` atomically: ``ranks.parquet`` (user + one rank column per protocol),
        ``metrics.json`` and ``meta.json``."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            frame = pl.DataFrame({"user": self.users.astype(np.int64)})
            frame = frame.with_columns(
                [pl.Series(protocol, ranks.astype(np.int64)) for protocol, ranks in self.ranks.items()]
            )
            frame.write_parquet(tmp / "ranks.parquet")
            (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
            meta = {
                "format_version": FORMAT_VERSION,
                "model_name": self.model_name,
                "target": self.target,
                "protocols": list(self.ranks),
                "ks": list(self.ks),
                "seconds": self.seconds,
                "n_users": int(self.users.size),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read a folder written by :meth:`save`; ArtifactError names what is missing or wrong."""
        path = Path(path)
        for name in ("meta.json", "metrics.json", "ranks.parquet"):
            if not (path / name).is_file():
                raise ArtifactError(f"{path} is not a saved evaluation result: {name} is missing")
        try:
            meta = json.loads((path / "meta.json").read_text())
            metrics = json.loads((path / "metrics.json").read_text())
            frame = pl.read_parquet(path / "ranks.parquet")
            protocols = meta["protocols"]
            missing = [c for c in ["user", *protocols] if c not in frame.columns]
            if missing:
                raise ArtifactError(f"{path / 'ranks.parquet'} lacks column(s) {missing}")
            return cls(
                model_name=meta["model_name"],
                target=meta["target"],
                users=frame["user"].to_numpy().astype(np.int64),
                ranks={p: frame[p].to_numpy().astype(np.int64) for p in protocols},
                metrics=metrics,
                seconds={k: float(v) for k, v in meta["seconds"].items()},
                ks=tuple(meta["ks"]),
            )
        except (KeyError, json.JSONDecodeError) as error:
            raise ArtifactError(f"{path} holds a malformed evaluation result: {error!r}") from error


def _check_shapes(model: Any, split: Split) -> None:
    model_shape = (model.n_users, model.n_items)
    split_shape = (split.n_users, split.n_items)
    if model_shape != split_shape:
        raise DataValidationError(
            f"model {model_label(model)} has (n_users, n_items) = {model_shape} but the split has "
            f"{split_shape}: was the model fitted on another split?"
        )


def _rank(
    protocol: str,
    model: Any,
    split: Split,
    target: str,
    users: np.ndarray,
    items: np.ndarray,
    chunk_size: int,
) -> np.ndarray:
    if protocol == "full":
        return full_ranking_ranks(model, users, items, split.seen(target), chunk_size)
    negatives = np.asarray(split.negatives)
    if negatives.ndim != 2 or negatives.shape[0] != split.n_users:
        raise DataValidationError(
            f"split.negatives must have shape (n_users, n_negatives) = ({split.n_users}, m), got {negatives.shape}"
        )
    return sampled_ranks(model, users, items, negatives[users], chunk_size)


def evaluate(
    model: Any,
    split: Split,
    target: str = "test",
    protocols: Sequence[str] = PROTOCOLS,
    ks: Iterable[int] = DEFAULT_KS,
    chunk_size: int = 1024,
) -> EvalResult:
    """Rank every user's held-out ``target`` item under each protocol and summarise.

    Args:
        model: a fitted Recommender over the split's ``(n_users, n_items)``.
        split: the leave-one-out Split it was trained on.
        target: "test" (excludes train + validation items) or "valid" (excludes train items).
        protocols: any of "full" (all unseen items) and "sampled" (the split's negatives).
        ks: metric cutoffs.
        chunk_size: users scored at once in full ranking (memory ~ chunk_size x n_items floats).
    Returns:
        EvalResult with ``(n_eval,)`` ranks per protocol.
    """
    if target not in ("valid", "test"):
        raise DataValidationError(f"target must be 'valid' or 'test', got {target!r}")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise DataValidationError(
            f"protocols must be a non-empty subset of {PROTOCOLS}, got {tuple(protocols)}"
        )
    _check_shapes(model, split)
    ks = tuple(int(k) for k in ks)
    users = split.eval_users(target)
    if users.size == 0:
        raise DataValidationError(f"the split has no users with a {target} item: nothing to evaluate")
    items = split.target_items(target)[users]
    ranks: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for protocol in dict.fromkeys(protocols):
        start = time.perf_counter()
        ranks[protocol] = _rank(protocol, model, split, target, users, items, chunk_size)
        seconds[protocol] = time.perf_counter() - start
    return EvalResult(
        model_name=model_label(model),
        target=target,
        users=users,
        ranks=ranks,
        metrics={protocol: summarise(r, ks) for protocol, r in ranks.items()},
        seconds=seconds,
        ks=ks,
    )


def validation_ndcg(
    model: Any, train_csr: sp.spmatrix, valid_items: np.ndarray, k: int = 10, chunk_size: int = 1024
) -> float:
    """Mean full-ranking NDCG@k on the validation items, training items excluded (early stopping).

    Args:
        train_csr: ``(n_users, n_items)`` training matrix, excluded from the candidates.
        valid_items: ``(n_users,)`` validation item per user, -1 for none (those users are skipped).
    Returns:
        The mean NDCG@k, or NaN when no user has a validation item.
    """
    valid_items = np.asarray(valid_items, dtype=np.int64).reshape(-1)
    if valid_items.shape[0] != train_csr.shape[0]:
        raise DataValidationError(
            f"valid_items has shape {valid_items.shape}, expected (n_users,) = ({train_csr.shape[0]},)"
        )
    users = np.flatnonzero(valid_items >= 0).astype(np.int64)
    if users.size == 0:
        return float("nan")
    ranks = full_ranking_ranks(model, users, valid_items[users], train_csr, chunk_size)
    return float(metric_values(ranks, f"NDCG@{int(k)}").mean())
