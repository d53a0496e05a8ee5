"""Content cold-start: the cold-item split, the cold protocol (against a brute-force loop) and the baselines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from acfrec.data import Interactions
from acfrec.data.cold import ColdSplit, cold_item_split
from acfrec.data.components import AlignedComponents
from acfrec.datasets import PlantedData
from acfrec.datasets.catalogue import Catalogue, planted_catalogue
from acfrec.errors import ArtifactError, DataValidationError, NotFittedError, UnknownIdError
from acfrec.eval.cold import ColdResult, cold_table, evaluate_cold, per_user_values, relevant_positions
from acfrec.models.content_knn import (
    ContentKNN,
    ContentPopularity,
    RandomScorer,
    centred,
    item_content,
    mean_content,
)


@pytest.fixture(scope="module")
def interactions(small_planted: PlantedData) -> Interactions:
    return Interactions.from_frame(small_planted.frame, timestamp_col="timestamp", source="planted")


@pytest.fixture(scope="module")
def cold(interactions: Interactions) -> ColdSplit:
    return cold_item_split(interactions, cold_share=0.2, seed=0, n_negatives=20)


def external_pairs(users: np.ndarray, items: np.ndarray, split: ColdSplit, item_ids: np.ndarray) -> set:
    return set(zip(split.users.external_ids[users].tolist(), item_ids[items].tolist(), strict=True))


# ------------------------------------------------------------------------------- split
def test_no_cold_item_reaches_training_or_validation(cold: ColdSplit, interactions: Interactions) -> None:
    cold_ids = set(cold.cold_ids.tolist())
    assert len(cold_ids) == round(0.2 * interactions.n_items) == cold.n_cold
    warm = cold.warm
    assert warm.n_items == cold.n_warm and not cold_ids & set(warm.items.external_ids.tolist())
    seen = set(warm.items.external_ids[warm.train.nonzero()[1]].tolist())
    seen |= set(warm.items.external_ids[warm.valid_items[warm.valid_items >= 0]].tolist())
    seen |= set(warm.items.external_ids[warm.test_items[warm.test_items >= 0]].tolist())
    assert not seen & cold_ids


def test_every_cold_interaction_is_in_the_cold_test(cold: ColdSplit, interactions: Interactions) -> None:
    frame = interactions.frame
    source_items = interactions.items.external_ids
    is_cold = np.isin(source_items[frame["item"].to_numpy()], cold.cold_ids)
    expected = external_pairs(frame["user"].to_numpy()[is_cold], frame["item"].to_numpy()[is_cold], cold, source_items)
    rows, cols = cold.cold_test.nonzero()
    assert cols.min() >= cold.n_warm
    assert external_pairs(rows, cols, cold, cold.items.external_ids) == expected
    warm_count = cold.warm.train.nnz + (cold.warm.valid_items >= 0).sum() + (cold.warm.test_items >= 0).sum()
    assert warm_count + cold.cold_test.nnz == len(interactions)


def test_layout_is_warm_items_then_cold_items(cold: ColdSplit) -> None:
    assert cold.items.external_ids[: cold.n_warm].tolist() == cold.warm.items.external_ids.tolist()
    assert cold.cold_items.tolist() == list(range(cold.n_warm, cold.n_items))
    assert cold.users == cold.warm.users
    known = cold.known()
    assert known.shape == (cold.n_users, cold.n_items) and known[:, cold.n_warm :].nnz == 0
    user = int(np.flatnonzero(cold.warm.test_items >= 0)[0])
    assert known[user, cold.warm.test_items[user]] == 1 and known[user, cold.warm.valid_items[user]] == 1


def test_the_split_is_seeded(interactions: Interactions, cold: ColdSplit) -> None:
    again = cold_item_split(interactions, cold_share=0.2, seed=0, n_negatives=20)
    other = cold_item_split(interactions, cold_share=0.2, seed=1, n_negatives=20)
    assert again.fingerprint == cold.fingerprint and again.cold_ids.tolist() == cold.cold_ids.tolist()
    assert set(other.cold_ids.tolist()) != set(cold.cold_ids.tolist())


@pytest.mark.parametrize("share", [0.0, 1.0, -0.2, 1.5])
def test_cold_share_out_of_range_is_refused(interactions: Interactions, share: float) -> None:
    with pytest.raises(ValueError, match="cold_share"):
        cold_item_split(interactions, cold_share=share)


def test_too_few_items_is_refused() -> None:
    frame = pl.DataFrame({"user": ["a", "a", "b"], "item": ["x", "y", "x"], "timestamp": [1, 2, 3]})
    tiny = Interactions.from_frame(frame, timestamp_col="timestamp", source="tiny.csv")
    with pytest.raises(DataValidationError, match=r"tiny.csv.*0 cold and 2 warm"):
        cold_item_split(tiny, cold_share=0.1, n_negatives=0)


def test_save_load_round_trip_and_tampering(cold: ColdSplit, tmp_path: Path) -> None:
    cold.save(tmp_path / "cold")
    loaded = ColdSplit.load(tmp_path / "cold")
    assert loaded.fingerprint == cold.fingerprint and loaded.items == cold.items
    assert (loaded.cold_test != cold.cold_test).nnz == 0 and loaded.meta["cold_share"] == 0.2
    frame = pl.read_parquet(tmp_path / "cold" / "cold.parquet")
    frame.head(frame.height - 1).write_parquet(tmp_path / "cold" / "cold.parquet")
    with pytest.raises(ArtifactError, match="fingerprint"):
        ColdSplit.load(tmp_path / "cold")
    (tmp_path / "cold" / "items.json").unlink()
    with pytest.raises(ArtifactError, match="missing items.json"):
        ColdSplit.load(tmp_path / "cold")


# ---------------------------------------------------------------------------- protocol
def brute_force(scores: np.ndarray, cold: ColdSplit, protocol: str, metric: str) -> np.ndarray:
    """Per-user metric by sorting each user's candidates, relevant items after equal-scored others."""
    name, k = metric.split("@")
    k = int(k)
    known = cold.known().toarray() > 0
    out = []
    for user in cold.eval_users():
        relevant = set(cold.cold_test[user].indices.tolist())
        if protocol == "cold":
            candidates = list(range(cold.n_warm, cold.n_items))
        else:
            candidates = [j for j in range(cold.n_items) if not known[user, j]]
        ranked = sorted(candidates, key=lambda j: (-scores[user, j], j in relevant))
        hits = [position for position, j in enumerate(ranked) if j in relevant]
        top = [p for p in hits if p < k]
        if name == "Recall":
            out.append(len(top) / len(relevant))
        elif name == "HR":
            out.append(float(bool(top)))
        else:
            ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))
            out.append(sum(1 / math.log2(p + 2) for p in top) / ideal)
    return np.array(out)


@pytest.mark.parametrize("protocol", ["cold", "all"])
def test_protocol_matches_a_brute_force_loop_with_many_ties(cold: ColdSplit, protocol: str) -> None:
    scores = np.random.default_rng(0).integers(0, 4, size=(cold.n_users, cold.n_items)).astype(np.float32)
    result = evaluate_cold(lambda users: scores[users], cold, ks=(5, 20), chunk_size=37)
    for metric in ("Recall@5", "NDCG@5", "HR@5", "Recall@20", "NDCG@20"):
        np.testing.assert_allclose(result.per_user(metric, protocol), brute_force(scores, cold, protocol, metric))
    assert result.metrics[protocol]["NDCG@20"] == pytest.approx(result.per_user("NDCG@20", protocol).mean())


def test_chunking_does_not_change_the_positions(cold: ColdSplit) -> None:
    scores = torch.from_numpy(np.random.default_rng(1).normal(size=(cold.n_users, cold.n_items)).astype(np.float32))
    whole = evaluate_cold(lambda users: scores[users], cold, chunk_size=10_000)
    chunked = evaluate_cold(lambda users: scores[users], cold, chunk_size=7)
    for protocol in ("cold", "all"):
        assert np.array_equal(whole.positions[protocol], chunked.positions[protocol])


def test_hand_computed_positions() -> None:
    scores = np.array([[3.0, 1.0, 2.0, 2.0], [3.0, 1.0, 2.0, 2.0]], dtype=np.float32)
    # Row 0: item 2 (relevant) ties with item 3 and trails item 0: position 2, pessimistically.
    # Row 1: items 2 and 1 relevant: 2 -> position 2; 1 -> after 0, 3 and the relevant 2: 3.
    rows, cols = np.array([0, 1, 1]), np.array([2, 1, 2])
    assert relevant_positions(scores, rows, cols).tolist() == [2, 3, 2]
    removed = np.array([[True, True, True, False], [True, True, True, True]])  # item 3 gone for user 0
    assert relevant_positions(scores, rows, cols, candidates=removed).tolist() == [1, 3, 2]
    offsets = np.array([0, 1, 3])
    positions = np.array([2, 3, 2])
    np.testing.assert_allclose(per_user_values(positions, offsets, "Recall@3"), [1.0, 0.5])
    ndcg_second = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    np.testing.assert_allclose(per_user_values(positions, offsets, "NDCG@3"), [0.5, ndcg_second])
    np.testing.assert_allclose(per_user_values(positions, offsets, "HR@2"), [0.0, 0.0])


def test_relevant_items_tied_with_each_other_take_consecutive_places() -> None:
    scores = np.array([[5.0, 5.0, 5.0, 1.0]], dtype=np.float32)
    positions = relevant_positions(scores, np.array([0, 0]), np.array([0, 2]))
    assert sorted(positions.tolist()) == [1, 2]  # after the tied non-relevant item 1


def test_oracle_and_constant_scorers(cold: ColdSplit) -> None:
    oracle = evaluate_cold(lambda users: cold.cold_test[users].toarray(), cold, ks=(10,))
    counts = np.diff(cold.cold_test[cold.eval_users()].indptr)
    np.testing.assert_allclose(oracle.per_user("NDCG@10", "cold"), 1.0)
    np.testing.assert_allclose(oracle.per_user("Recall@10", "all"), np.minimum(counts, 10) / counts)
    constant = evaluate_cold(lambda users: np.zeros((users.size, cold.n_items)), cold, ks=(10,))
    assert constant.metrics["all"]["Recall@10"] == 0.0  # pessimistic ties: no free hits


def test_bad_scorers_and_names_are_refused(cold: ColdSplit) -> None:
    with pytest.raises(DataValidationError, match=r"shape \(3, 96\).*n_items\) = \(3, 120\)"):
        evaluate_cold(lambda users: np.zeros((users.size, cold.n_warm)), cold, chunk_size=3)
    with pytest.raises(DataValidationError, match="NaN"):
        evaluate_cold(lambda users: np.full((users.size, cold.n_items), np.nan), cold)
    with pytest.raises(DataValidationError, match="protocols"):
        evaluate_cold(lambda users: np.zeros((users.size, cold.n_items)), cold, protocols=("sampled",))
    with pytest.raises(DataValidationError, match="score_all"):
        evaluate_cold(object(), cold)
    result = evaluate_cold(lambda users: np.zeros((users.size, cold.n_items)), cold, ks=(10,), protocols=("cold",))
    with pytest.raises(DataValidationError, match="MRR"):
        result.per_user("MRR@10")
    with pytest.raises(DataValidationError, match="'all'"):
        result.per_user("Recall@10", "all")


# --------------------------------------------------------------------------- baselines
@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return planted_catalogue(n_users=200, n_items=150, seed=0)


@pytest.fixture(scope="module")
def catalogue_cold(catalogue: Catalogue) -> ColdSplit:
    data = Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp", source="catalogue")
    return cold_item_split(data, cold_share=0.3, seed=0, n_negatives=20)


@pytest.fixture(scope="module")
def pixel_content(catalogue: Catalogue, catalogue_cold: ColdSplit, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    store = catalogue.write_store(tmp_path_factory.mktemp("store") / "frames", dim=16)
    return item_content(store, catalogue_cold.items)


def test_content_knn_finds_planted_classes_among_cold_items(
    catalogue: Catalogue, catalogue_cold: ColdSplit, pixel_content: torch.Tensor
) -> None:
    cold = catalogue_cold
    results = {}
    for scorer in (RandomScorer(seed=0), ContentPopularity(k=5), ContentKNN()):
        results[scorer.name] = evaluate_cold(scorer.fit(cold.warm.train, pixel_content), cold, ks=(10,))
    knn, random = results["content-knn"].metrics, results["random"].metrics
    assert knn["cold"]["Recall@10"] > random["cold"]["Recall@10"] + 0.1
    assert knn["all"]["NDCG@10"] > 2 * random["all"]["NDCG@10"]
    # The top cold items of content kNN show the user's liked digit classes far more than average.
    users = cold.eval_users()
    top = torch.topk(results_scores(ContentKNN().fit(cold.warm.train, pixel_content), users, cold), 5).indices
    source = np.char.lstrip(cold.items.external_ids[cold.n_warm + top.numpy()].astype(str), "i").astype(int)
    affinity = catalogue.truth.affinity
    cold_source = np.char.lstrip(cold.cold_ids.astype(str), "i").astype(int)
    assert affinity[users[:, None], source].mean() > 1.5 * affinity[users][:, cold_source].mean()
    table = cold_table(results, metrics=("Recall@10", "NDCG@10"))
    assert "cold Recall@10" in table and "all NDCG@10" in table and "content-knn" in table


def results_scores(scorer: ContentKNN, users: np.ndarray, cold: ColdSplit) -> torch.Tensor:
    return scorer.score_all(users)[:, cold.n_warm :]


def test_content_popularity_is_the_mean_popularity_of_content_neighbours() -> None:
    train = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 1], [1, 0, 0]], dtype=np.float32))  # popularity 3, 1, 1
    content = np.array([[1, 0], [0, 1], [0.1, 1], [1, 0.2], [0, 0]], dtype=np.float32)  # items 3, 4 cold
    scorer = ContentPopularity(k=2, center=False).fit(train, content)
    scores = scorer.score_all([0, 2])
    # Item 3 is nearest to items 0 (pop 3) and 2 (pop 1); item 4 has no content: the warm mean 5/3.
    np.testing.assert_allclose(scores[0].numpy(), [3, 1, 1, 2, 5 / 3], rtol=1e-6)
    assert torch.equal(scores[0], scores[1])


def test_content_knn_is_the_cosine_to_the_mean_history() -> None:
    train = sp.csr_matrix(np.array([[1, 1, 0], [0, 0, 0]], dtype=np.float32))
    content = np.array([[2, 0], [0, 3], [1, 1], [1, 0]], dtype=np.float32)
    scores = ContentKNN(center=False).fit(train, content).score_all([0, 1]).numpy()
    np.testing.assert_allclose(scores[0], [1 / math.sqrt(2), 1 / math.sqrt(2), 1.0, 1 / math.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(scores[1], 0.0)  # no history, no preference


def test_centring_removes_the_warm_mean_and_keeps_missing_content_zero() -> None:
    content = torch.tensor([[1.0, 2.0], [3.0, 2.0], [0.0, 0.0], [9.0, 9.0], [0.0, 0.0]])  # items 3, 4 cold
    out = centred(content, n_warm=3)
    assert out.tolist() == [[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [7.0, 7.0], [0.0, 0.0]]


def test_random_scores_are_a_fixed_function_of_seed_user_and_item() -> None:
    train = sp.csr_matrix(np.eye(3, dtype=np.float32))
    scorer = RandomScorer(seed=3).fit(train, np.zeros((5, 2)))
    together = scorer.score_all([0, 1, 2])
    assert torch.equal(together[2], scorer.score_all([2])[0]) and not torch.equal(together[0], together[1])
    assert ((together >= 0) & (together < 1)).all()
    assert not torch.equal(together, RandomScorer(seed=4).fit(train, np.zeros((5, 2))).score_all([0, 1, 2]))


def test_baseline_input_errors() -> None:
    train = sp.csr_matrix(np.eye(3, dtype=np.float32))
    with pytest.raises(NotFittedError, match="fit"):
        ContentKNN().score_all([0])
    with pytest.raises(DataValidationError, match=r"n_warm = 3.*\(2, 4\)"):
        ContentKNN().fit(train, np.zeros((2, 4)))
    content = np.zeros((4, 2), dtype=np.float32)
    content[3, 1] = np.nan
    with pytest.raises(DataValidationError, match="row 3"):
        ContentKNN().fit(train, content)
    with pytest.raises(UnknownIdError, match="user index 7"):
        ContentKNN().fit(train, np.ones((4, 2))).score_all([7])
    with pytest.raises(DataValidationError, match="sparse"):
        ContentKNN().fit(np.eye(3), np.ones((4, 2)))


def test_mean_content_ignores_padding() -> None:
    features = torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[5.0, 5.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    means = mean_content(AlignedComponents(features, mask))
    assert means.tolist() == [[2.0, 1.0], [5.0, 5.0], [0.0, 0.0]]


def test_result_is_a_long_table(cold: ColdSplit) -> None:
    result = evaluate_cold(RandomScorer().fit(cold.warm.train, np.ones((cold.n_items, 2))), cold, ks=(10,))
    assert isinstance(result, ColdResult) and result.model_name == "random"
    table = result.table()
    assert set(table["protocol"]) == {"cold", "all"} and set(table["metric"]) == {"Recall@10", "NDCG@10"}
