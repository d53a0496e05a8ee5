"""Leave-one-out metrics on hand-computed ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from acfrec.errors import DataValidationError
from acfrec.eval.metrics import hit_rate, metric_values, mrr, ndcg, recall, summarise

RANKS = [0, 1, 9, 10, 99]


def test_hit_rate_by_hand() -> None:
    np.testing.assert_array_equal(hit_rate(RANKS, 10), [1.0, 1.0, 1.0, 0.0, 0.0])
    assert hit_rate(RANKS, 10).mean() == pytest.approx(3 / 5)
    assert hit_rate(RANKS, 1).mean() == pytest.approx(1 / 5)
    assert hit_rate(RANKS, 100).mean() == pytest.approx(1.0)
    assert hit_rate(RANKS, 10).dtype == np.float64


def test_ndcg_by_hand() -> None:
    expected = [1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0, 0.0]
    np.testing.assert_allclose(ndcg(RANKS, 10), expected, rtol=1e-15)
    assert ndcg(RANKS, 10).mean() == pytest.approx(0.38399891597786836, abs=1e-15)
    # rank 10 enters at k = 11, rank 99 at k = 100
    assert ndcg(RANKS, 11)[3] == pytest.approx(1 / math.log2(12))
    assert ndcg(RANKS, 100)[4] == pytest.approx(1 / math.log2(101))


def test_mrr_by_hand() -> None:
    np.testing.assert_allclose(mrr(RANKS), [1.0, 0.5, 0.1, 1 / 11, 0.01])
    np.testing.assert_allclose(mrr(RANKS, k=10), [1.0, 0.5, 0.1, 0.0, 0.0])
    assert mrr(RANKS, k=10).mean() == pytest.approx(0.32)


def test_recall_equals_hit_rate_with_one_held_out_item() -> None:
    np.testing.assert_array_equal(recall(RANKS, 10), hit_rate(RANKS, 10))


def test_accepts_numpy_and_torch() -> None:
    expected = ndcg(RANKS, 10)
    np.testing.assert_array_equal(ndcg(np.array(RANKS, dtype=np.int32), 10), expected)
    np.testing.assert_array_equal(ndcg(torch.tensor(RANKS), 10), expected)
    np.testing.assert_array_equal(ndcg(np.array(RANKS, dtype=np.float64), 10), expected)


def test_summarise_keys_and_means() -> None:
    summary = summarise(RANKS, ks=(10, 100))
    assert set(summary) == {"HR@10", "NDCG@10", "Recall@10", "HR@100", "NDCG@100", "Recall@100", "MRR"}
    assert summary["HR@10"] == pytest.approx(0.6)
    assert summary["Recall@10"] == pytest.approx(0.6)
    assert summary["HR@100"] == pytest.approx(1.0)
    assert summary["NDCG@10"] == pytest.approx(0.38399891597786836)
    assert summary["MRR"] == pytest.approx((1 + 0.5 + 0.1 + 1 / 11 + 0.01) / 5)
    assert all(isinstance(v, float) for v in summary.values())


def test_summarise_empty_is_nan() -> None:
    summary = summarise(np.array([], dtype=np.int64), ks=(10,))
    assert all(math.isnan(v) for v in summary.values())


def test_metric_values_parses_names() -> None:
    np.testing.assert_array_equal(metric_values(RANKS, "HR@10"), hit_rate(RANKS, 10))
    np.testing.assert_array_equal(metric_values(RANKS, "NDCG@5"), ndcg(RANKS, 5))
    np.testing.assert_array_equal(metric_values(RANKS, "MRR"), mrr(RANKS))
    np.testing.assert_array_equal(metric_values(RANKS, "MRR@10"), mrr(RANKS, 10))
    for bad in ("ndcg10", "NDCG", "AUC@10", "HR@"):
        with pytest.raises(DataValidationError, match="unknown metric"):
            metric_values(RANKS, bad)


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ([0, -1], "must be >= 0"),
        ([0.5, 1.0], "whole numbers"),
        ([[0, 1]], "shape"),
        ([float("nan")], "whole"),
    ],
)
def test_bad_ranks_raise(ranks: list, message: str) -> None:
    with pytest.raises(DataValidationError, match=message):
        hit_rate(ranks, 10)


@pytest.mark.parametrize("k", [0, -3, 2.5])
def test_bad_cutoff_raises(k: float) -> None:
    with pytest.raises(DataValidationError, match="cutoff k"):
        ndcg(RANKS, k)  # type: ignore[arg-type]
