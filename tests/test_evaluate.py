"""Full / sampled ranking protocols, evaluate, EvalResult persistence and compare.

Ranks are checked against an independent, deliberately plain reference: a Python loop per user
that sorts the surviving candidates with ``np.lexsort`` (target after its ties).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from acfrec.data.idmap import IdMap
from acfrec.data.split import Split
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.eval import (
    EvalResult,
    compare,
    evaluate,
    format_table,
    full_ranking_ranks,
    sampled_ranks,
    summarise,
    validation_ndcg,
)
from acfrec.eval.metrics import ndcg
from acfrec.models.base import Recommender, TrainData


class FixedScores(Recommender):
    """A model whose ``score_all`` reads rows of a fixed ``(n_users, n_items)`` matrix."""

    def __init__(self, scores: Any) -> None:
        super().__init__()
        self.matrix = torch.as_tensor(np.asarray(scores), dtype=torch.float32)
        self.batches: list[int] = []

    def _fit(self, data: TrainData) -> None:
        if tuple(data.train.shape) != tuple(self.matrix.shape):
            raise DataValidationError(f"train {data.train.shape} vs scores {tuple(self.matrix.shape)}")

    def score_all(self, users: np.ndarray) -> torch.Tensor:
        self._require_fitted()
        self.batches.append(len(users))
        return self.matrix[torch.as_tensor(np.asarray(users, dtype=np.int64))]

    def _state(self) -> dict[str, Any]:
        return {"scores": self.matrix}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.matrix = state["scores"]


def fitted(scores: Any, train: sp.csr_matrix | None = None) -> FixedScores:
    scores = np.asarray(scores, dtype=np.float32)
    if train is None:
        train = sp.csr_matrix(([1.0], ([0], [0])), shape=scores.shape, dtype=np.float32)
    return FixedScores(scores).fit(train)  # type: ignore[return-value]


def reference_rank(scores: np.ndarray, target: int, candidates: np.ndarray) -> int:
    """Pessimistic rank of ``target`` among ``candidates`` (which include it) by a full sort."""
    is_target = (candidates == target).astype(int)
    order = np.lexsort((is_target, -scores[candidates]))  # descending score, target last in ties
    return int(np.flatnonzero(candidates[order] == target)[0])


def reference_full(
    scores: np.ndarray, users: np.ndarray, targets: np.ndarray, exclude: np.ndarray
) -> np.ndarray:
    out = []
    for user, target in zip(users, targets, strict=True):
        keep = ~exclude[user].astype(bool)
        keep[target] = True
        out.append(reference_rank(scores[user], target, np.flatnonzero(keep)))
    return np.array(out)


def reference_sampled(
    scores: np.ndarray, users: np.ndarray, targets: np.ndarray, negatives: np.ndarray
) -> np.ndarray:
    return np.array(
        [
            reference_rank(scores[u], t, np.concatenate([[t], negs]))
            for u, t, negs in zip(users, targets, negatives, strict=True)
        ]
    )


def tied_scores(rng: np.random.Generator, n_users: int, n_items: int, levels: int = 4) -> np.ndarray:
    """Integer-valued scores: many ties per row."""
    return rng.integers(0, levels, size=(n_users, n_items)).astype(np.float32)


def make_split(rng: np.random.Generator, n_users: int = 30, n_items: int = 60, n_neg: int = 20) -> Split:
    """A random leave-one-out split; the last two users have no test item (one also no valid)."""
    train = (rng.random((n_users, n_items)) < 0.2).astype(np.float32)
    train[:, 0] = 1.0  # every user has at least one training item
    valid = np.full(n_users, -1, dtype=np.int64)
    test = np.full(n_users, -1, dtype=np.int64)
    negatives = np.full((n_users, n_neg), -1, dtype=np.int64)
    for user in range(n_users):
        unseen = rng.permutation(np.flatnonzero(train[user] == 0))
        if user < n_users - 1:
            valid[user] = unseen[0]
        if user < n_users - 2:
            test[user] = unseen[1]
            negatives[user] = unseen[2 : 2 + n_neg]
    rows, cols = np.nonzero(train)
    frame = pl.DataFrame(
        {
            "user": rows.astype(np.int64),
            "item": cols.astype(np.int64),
            "timestamp": np.arange(rows.size, dtype=np.float64),
        }
    )
    return Split(
        train=sp.csr_matrix(train),
        train_frame=frame,
        valid_items=valid,
        test_items=test,
        negatives=negatives,
        users=IdMap(range(n_users), kind="user"),
        items=IdMap(range(n_items), kind="item"),
    )


# --------------------------------------------------------------------------- full ranking
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_full_ranking_matches_reference_with_ties_and_exclusions(chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 25, 50
    scores = tied_scores(rng, n_users, n_items)
    exclude = (rng.random((n_users, n_items)) < 0.3).astype(np.float32)
    users = rng.permutation(n_users)[:20]
    targets = rng.integers(0, n_items, size=users.size)
    exclude[users[:5], targets[:5]] = 1.0  # some targets sit inside the exclusion set
    model = fitted(scores)
    ranks = full_ranking_ranks(model, users, targets, sp.csr_matrix(exclude), chunk_size=chunk_size)
    assert ranks.dtype == np.int64 and ranks.shape == (20,)
    np.testing.assert_array_equal(ranks, reference_full(scores, users, targets, exclude))
    assert max(model.batches) <= chunk_size


def test_full_ranking_by_hand() -> None:
    model = fitted([[5.0, 4.0, 3.0, 3.0, 1.0]])
    exclude = sp.csr_matrix(np.array([[1, 0, 1, 0, 0]], dtype=np.float32))
    # no exclusion: 5, 4 above, 3 tied (pessimistic) -> rank 3
    assert full_ranking_ranks(model, [0], [2], None)[0] == 3
    # item 0 excluded; the target (2) is in exclude too but still ranked: 4 above, 3 tied
    assert full_ranking_ranks(model, [0], [2], exclude)[0] == 2
    assert full_ranking_ranks(model, [0], [0], exclude)[0] == 0


def test_duplicate_entries_in_exclude_are_counted_once() -> None:
    model = fitted([[5.0, 4.0, 3.0]])
    exclude = sp.csr_matrix((np.ones(2, np.float32), np.array([0, 0]), np.array([0, 2])), shape=(1, 3))
    assert full_ranking_ranks(model, [0], [2], exclude)[0] == 1


def test_constant_model_gets_no_free_hits() -> None:
    rng = np.random.default_rng(1)
    split = make_split(rng)
    result = evaluate(fitted(np.zeros((split.n_users, split.n_items)), split.train), split)
    assert result.metrics["full"]["HR@10"] == 0.0
    assert result.metrics["sampled"]["HR@10"] == 0.0
    assert np.all(result.ranks["sampled"] == split.negatives.shape[1])
    n_candidates = split.n_items - np.asarray(split.seen("test")[result.users].sum(axis=1)).ravel()
    np.testing.assert_array_equal(result.ranks["full"], n_candidates - 1)


def test_nan_scores_raise_naming_model_and_user() -> None:
    scores = np.ones((4, 6), dtype=np.float32)
    scores[2, 3] = np.nan
    model = fitted(scores)
    with pytest.raises(DataValidationError, match=r"FixedScores produced NaN scores for user 2"):
        full_ranking_ranks(model, [0, 1, 2, 3], [0, 0, 0, 0], None, chunk_size=2)
    with pytest.raises(DataValidationError, match=r"FixedScores produced NaN scores for user 2"):
        sampled_ranks(model, [1, 2], [0, 0], [[3, 4], [3, 4]])


def test_full_ranking_bad_inputs() -> None:
    model = fitted(np.zeros((3, 4)))
    with pytest.raises(DataValidationError, match=r"exclude has shape \(3, 5\)"):
        full_ranking_ranks(model, [0], [0], sp.csr_matrix((3, 5)))
    with pytest.raises(DataValidationError, match="same shape"):
        full_ranking_ranks(model, [0, 1], [0], None)
    with pytest.raises(DataValidationError, match="chunk_size"):
        full_ranking_ranks(model, [0], [0], None, chunk_size=0)
    with pytest.raises(Exception, match="item index 4"):
        full_ranking_ranks(model, [0], [4], None)


# --------------------------------------------------------------------------- sampled
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_sampled_matches_reference(chunk_size: int) -> None:
    rng = np.random.default_rng(2)
    n_users, n_items = 15, 40
    scores = tied_scores(rng, n_users, n_items, levels=3)
    users = np.arange(n_users)
    targets = rng.integers(0, n_items, size=n_users)
    negatives = np.stack(
        [rng.choice(np.setdiff1d(np.arange(n_items), [t]), 9, replace=False) for t in targets]
    )
    ranks = sampled_ranks(fitted(scores), users, targets, negatives, chunk_size=chunk_size)
    np.testing.assert_array_equal(ranks, reference_sampled(scores, users, targets, negatives))
    assert ranks.min() >= 0 and ranks.max() <= 9


def test_sampled_bad_negatives() -> None:
    model = fitted(np.zeros((2, 5)))
    with pytest.raises(DataValidationError, match="holds -1"):
        sampled_ranks(model, [0, 1], [0, 0], [[1, 2], [-1, -1]])
    with pytest.raises(DataValidationError, match="contain its held-out item 0"):
        sampled_ranks(model, [0, 1], [0, 0], [[1, 2], [0, 3]])
    with pytest.raises(DataValidationError, match=r"shape \(n_users, n_negatives\)"):
        sampled_ranks(model, [0, 1], [0, 0], [1, 2])


# --------------------------------------------------------------------------- evaluate
def test_evaluate_matches_reference_on_a_split() -> None:
    rng = np.random.default_rng(3)
    split = make_split(rng)
    scores = tied_scores(rng, split.n_users, split.n_items, levels=6)
    result = evaluate(fitted(scores, split.train), split, ks=(5, 10), chunk_size=8)
    users = split.eval_users("test")
    targets = split.test_items[users]
    np.testing.assert_array_equal(result.users, users)
    assert result.users.size == split.n_users - 2
    np.testing.assert_array_equal(
        result.ranks["full"], reference_full(scores, users, targets, split.seen("test").toarray())
    )
    np.testing.assert_array_equal(
        result.ranks["sampled"], reference_sampled(scores, users, targets, split.negatives[users])
    )
    assert result.metrics["full"] == summarise(result.ranks["full"], (5, 10))
    assert result.model_name == "FixedScores" and result.target == "test"
    assert set(result.seconds) == {"full", "sampled"}


def test_evaluate_valid_excludes_only_train() -> None:
    rng = np.random.default_rng(4)
    split = make_split(rng)
    scores = tied_scores(rng, split.n_users, split.n_items, levels=6)
    result = evaluate(fitted(scores, split.train), split, target="valid", protocols=("full",))
    users = split.eval_users("valid")
    assert users.size == split.n_users - 1
    expected = reference_full(scores, users, split.valid_items[users], split.train.toarray())
    np.testing.assert_array_equal(result.ranks["full"], expected)
    assert list(result.ranks) == ["full"]


def test_evaluate_rejects_mismatched_shapes_and_bad_options() -> None:
    split = make_split(np.random.default_rng(5))
    other = fitted(np.zeros((split.n_users, split.n_items + 1)))
    with pytest.raises(
        DataValidationError,
        match=rf"\({split.n_users}, {split.n_items + 1}\).*\({split.n_users}, {split.n_items}\)",
    ):
        evaluate(other, split)
    model = fitted(np.zeros((split.n_users, split.n_items)), split.train)
    with pytest.raises(DataValidationError, match="protocols"):
        evaluate(model, split, protocols=("auc",))
    with pytest.raises(DataValidationError, match="target"):
        evaluate(model, split, target="train")


def test_eval_result_table_per_user_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    split = make_split(rng)
    result = evaluate(fitted(rng.random((split.n_users, split.n_items)), split.train), split, ks=(10,))
    table = result.table()
    assert list(table.columns) == ["model", "protocol", "metric", "value"]
    assert len(table) == 2 * 4  # 2 protocols x (HR, NDCG, Recall @10, MRR)
    row = table[(table.protocol == "sampled") & (table.metric == "NDCG@10")]
    assert row.value.item() == pytest.approx(result.metrics["sampled"]["NDCG@10"])
    np.testing.assert_allclose(result.per_user("NDCG@10", "full").mean(), result.metrics["full"]["NDCG@10"])
    np.testing.assert_array_equal(result.per_user("NDCG@3", "sampled"), ndcg(result.ranks["sampled"], 3))
    with pytest.raises(DataValidationError, match="protocol 'x'"):
        result.per_user("HR@10", "x")

    saved = result.save(tmp_path / "eval")
    assert sorted(p.name for p in saved.iterdir()) == ["meta.json", "metrics.json", "ranks.parquet"]
    loaded = EvalResult.load(saved)
    assert (loaded.model_name, loaded.target, loaded.ks) == (result.model_name, result.target, result.ks)
    np.testing.assert_array_equal(loaded.users, result.users)
    for protocol in result.ranks:
        np.testing.assert_array_equal(loaded.ranks[protocol], result.ranks[protocol])
    assert loaded.metrics == result.metrics and loaded.seconds == result.seconds
    (saved / "metrics.json").unlink()
    with pytest.raises(ArtifactError, match="metrics.json is missing"):
        EvalResult.load(saved)


def test_validation_ndcg_by_hand() -> None:
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    train = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=np.float32))
    model = fitted(scores, train)
    # user 0: item 0 excluded, target 2 -> rank 1; user 1: item 3 excluded, target 2 -> rank 0; user 2 skipped
    expected = (1 / math.log2(3) + 1.0) / 2
    assert validation_ndcg(model, train, np.array([2, 2, -1]), k=10) == pytest.approx(expected)
    assert validation_ndcg(model, train, np.array([2, 2, -1]), k=1) == pytest.approx(0.5)
    assert math.isnan(validation_ndcg(model, train, np.array([-1, -1, -1])))


# --------------------------------------------------------------------------- compare
def _good_and_noisy(rng: np.random.Generator) -> tuple[Split, EvalResult, EvalResult]:
    split = make_split(rng, n_users=150, n_items=120, n_neg=30)
    noise = rng.random((split.n_users, split.n_items))
    boosted = noise.copy()
    users = split.eval_users("test")
    boosted[users, split.test_items[users]] += 0.7  # the good model likes the held-out items
    good = evaluate(FixedScores(boosted).fit(split.train), split, ks=(10,))
    noisy = evaluate(FixedScores(noise).fit(split.train), split, ks=(10,))
    return split, good, noisy


def test_compare_finds_the_clearly_better_model() -> None:
    _, good, noisy = _good_and_noisy(np.random.default_rng(7))
    table = compare({"good": good, "noisy": noisy}, metric="NDCG@10", test="wilcoxon")
    assert list(table["model"]) == ["good", "noisy"]
    assert {"full HR@10", "full NDCG@10", "sampled HR@10", "sampled NDCG@10", "full MRR"} <= set(
        table.columns
    )
    best, worse = table.iloc[0], table.iloc[1]
    assert bool(best["best"]) and math.isnan(best["p_value"])
    assert worse["vs"] == "good" and worse["diff"] < -0.2
    assert worse["p_value"] < 1e-6
    assert worse["diff"] == pytest.approx(noisy.per_user().mean() - good.per_user().mean())


def test_compare_bootstrap_ci_excludes_zero_and_is_seeded() -> None:
    _, good, noisy = _good_and_noisy(np.random.default_rng(8))
    results = {"noisy": noisy, "good": good}
    table = compare(results, metric="HR@10", protocol="sampled", test="bootstrap", n_boot=500, seed=1)
    row = table.set_index("model").loc["noisy"]
    assert row["ci_low"] < row["diff"] < row["ci_high"] < 0
    assert row["p_value"] < 0.01
    again = compare(results, metric="HR@10", protocol="sampled", test="bootstrap", n_boot=500, seed=1)
    assert again.set_index("model").loc["noisy", "ci_low"] == row["ci_low"]


def test_compare_identical_models_is_not_significant() -> None:
    _, good, _ = _good_and_noisy(np.random.default_rng(9))
    table = compare({"a": good, "b": good})
    assert table.set_index("model").loc["b", "p_value"] == 1.0


def test_compare_rejects_different_users_and_duplicate_names() -> None:
    _, good, noisy = _good_and_noisy(np.random.default_rng(10))
    fewer = EvalResult(
        noisy.model_name,
        noisy.target,
        noisy.users[:-1],
        {p: r[:-1] for p, r in noisy.ranks.items()},
        noisy.metrics,
        noisy.seconds,
    )
    with pytest.raises(DataValidationError, match="different users"):
        compare({"good": good, "fewer": fewer})
    with pytest.raises(DataValidationError, match="two results are named 'FixedScores'"):
        compare([good, noisy])
    with pytest.raises(DataValidationError, match="test must be"):
        compare({"good": good}, test="t-test")


def test_compare_aligns_users_by_index() -> None:
    _, good, noisy = _good_and_noisy(np.random.default_rng(11))
    order = np.random.default_rng(0).permutation(noisy.users.size)
    shuffled = EvalResult(
        "shuffled",
        noisy.target,
        noisy.users[order],
        {p: r[order] for p, r in noisy.ranks.items()},
        noisy.metrics,
        noisy.seconds,
    )
    plain = compare({"good": good, "noisy": noisy}).set_index("model")
    mixed = compare({"good": good, "noisy": shuffled}).set_index("model")
    assert mixed.loc["noisy", "p_value"] == plain.loc["noisy", "p_value"]


def test_format_table_bolds_best_per_column() -> None:
    _, good, noisy = _good_and_noisy(np.random.default_rng(12))
    table = compare({"good": good, "noisy": noisy})
    text = format_table(table, metrics=["HR@10", "NDCG@10"])
    lines = text.splitlines()
    assert (
        lines[0]
        == "| model | full HR@10 | full NDCG@10 | sampled HR@10 | sampled NDCG@10 | vs | diff | p_value |"
    )
    good_line = next(line for line in lines if line.startswith("| good "))
    noisy_line = next(line for line in lines if line.startswith("| noisy "))
    assert good_line.count("**") == 2 * 4 and "**" not in noisy_line
    assert f"**{good.metrics['full']['NDCG@10']:.4f}**" in good_line
    plain = format_table(table, metrics=["full NDCG@10"], markdown=False, show_tests=False)
    assert plain.splitlines()[0].split() == ["model", "full", "NDCG@10"]
    assert plain.splitlines()[1].endswith("*") and not plain.splitlines()[2].endswith("*")
    assert "**" not in format_table(table, bold_best=False)
