"""ACF's content tower: cold items scored from content, added without retraining, served by FAISS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from acfrec.api import RecommenderService
from acfrec.data import Interactions
from acfrec.data.cold import ColdSplit, cold_item_split
from acfrec.data.components import AlignedComponents, ComponentStore
from acfrec.datasets.catalogue import Catalogue, planted_catalogue
from acfrec.errors import DataValidationError
from acfrec.eval.cold import evaluate_cold
from acfrec.index import IndexConfig, ItemIndex
from acfrec.models import Recommender, get_model
from acfrec.models.content_knn import RandomScorer, item_content
from acfrec.models.content_tower import ContentTower

TOWER = {"content_tower": True, "dim": 16, "epochs": 60, "progress": False, "seed": 0, "lr": 0.005}


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    """Clicks follow taste only (no popularity browsing): a clear content signal on a small catalogue."""
    return planted_catalogue(n_users=200, n_items=150, seed=0, noise=0.0, click_popularity=0.0)


@pytest.fixture(scope="module")
def cold(catalogue: Catalogue) -> ColdSplit:
    data = Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp", source="catalogue")
    return cold_item_split(data, cold_share=0.3, seed=0, n_negatives=20)


@pytest.fixture(scope="module")
def store(catalogue: Catalogue, tmp_path_factory: pytest.TempPathFactory) -> ComponentStore:
    return catalogue.write_store(tmp_path_factory.mktemp("store") / "frames", dim=16)


@pytest.fixture(scope="module")
def warm_model(cold: ColdSplit, store: ComponentStore) -> Recommender:
    """ACF with a content tower fitted on the warm items only (never changed by the tests)."""
    return get_model("acf")(components_path=str(store.path), **TOWER).fit(cold.warm)


def with_cold_items(model: Recommender, cold: ColdSplit, store: ComponentStore, tmp_path: Path) -> Recommender:
    """A copy of ``model`` (through save / load) with the cold items added."""
    copy = Recommender.load(model.save(tmp_path / "model"))
    added = copy.add_items(store, cold.cold_ids)
    assert np.array_equal(added, cold.cold_items)
    return copy


def source_index(ids: np.ndarray) -> np.ndarray:
    """Catalogue item index of external ids ``i{k}``."""
    return np.char.lstrip(np.asarray(ids).astype(str), "i").astype(int)


# ---------------------------------------------------------------------- cold scoring
def test_cold_items_are_recommended_to_users_whose_tastes_match(
    warm_model: Recommender, cold: ColdSplit, store: ComponentStore, catalogue: Catalogue, tmp_path: Path
) -> None:
    model = with_cold_items(warm_model, cold, store, tmp_path)
    assert model.n_items == cold.n_items and list(model.items.external_ids) == list(cold.items.external_ids)
    users = cold.eval_users()
    top, _ = model.recommend(users, k=5, allow=cold.cold_items)
    assert np.isin(top, cold.cold_items).all()
    affinity = catalogue.truth.affinity
    recommended = affinity[users[:, None], source_index(model.items.external_ids[top])].mean()
    average = affinity[users][:, source_index(cold.cold_ids)].mean()
    assert recommended > 1.5 * average, (recommended, average)
    # and the cold-start protocol agrees: far above random among the cold items
    tower = evaluate_cold(model, cold, ks=(10,), label="tower").metrics
    random = evaluate_cold(RandomScorer(seed=0).fit(cold.warm.train, item_content(store, cold.items)), cold, ks=(10,))
    assert tower["cold"]["Recall@10"] > random.metrics["cold"]["Recall@10"] + 0.12, (tower, random.metrics)


def test_a_cold_items_score_is_finite_and_depends_on_its_content(
    warm_model: Recommender, cold: ColdSplit, store: ComponentStore, tmp_path: Path
) -> None:
    aligned = store.align(cold.items, warm_model.module.features.shape[1])
    own = AlignedComponents(aligned.features[cold.n_warm :], aligned.mask[cold.n_warm :])
    swapped = AlignedComponents(own.features.flip(0), own.mask.flip(0))  # each gets another's frames
    users = np.arange(20)
    scores = []
    for number, content in enumerate((own, swapped)):
        model = Recommender.load(warm_model.save(tmp_path / f"m{number}"))
        model.add_items(content, item_ids=cold.cold_ids)
        scores.append(model.score(users, cold.cold_items))
        # warm items are untouched by adding cold ones
        np.testing.assert_allclose(
            model.score(users, np.arange(cold.n_warm)), warm_model.score(users, np.arange(cold.n_warm)), rtol=1e-5, atol=1e-6
        )
    assert np.isfinite(scores[0]).all()
    assert np.abs(scores[0] - scores[1]).max() > 1e-3


def test_items_without_content_still_get_a_finite_score(
    warm_model: Recommender, store: ComponentStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = Recommender.load(warm_model.save(tmp_path / "m"))
    (absent,) = model.add_items(store, ["not-in-the-store"])  # no content in the store: generic vector
    assert "has no components for 1 of 1" in caplog.text
    assert np.isfinite(model.score(np.arange(5), [absent])).all()
    width, dim = model.module.features.shape[1:]
    empty = AlignedComponents(torch.zeros(2, width, dim), torch.zeros(2, width, dtype=torch.bool))
    added = model.add_items(empty, item_ids=["new-a", "new-b"])
    scores = model.score(np.arange(5), [*added, absent])
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores[:, 0], scores[:, 1])  # no content: one generic vector
    np.testing.assert_allclose(scores[:, 0], scores[:, 2], rtol=1e-5)


def test_added_items_survive_save_and_load(warm_model: Recommender, cold: ColdSplit, store: ComponentStore, tmp_path: Path) -> None:
    model = with_cold_items(warm_model, cold, store, tmp_path)
    loaded = Recommender.load(model.save(tmp_path / "with-cold"))
    assert loaded.items == model.items and loaded.seen.shape == (cold.n_users, cold.n_items)
    users = np.arange(10)
    np.testing.assert_allclose(loaded.score_all(users), model.score_all(users), rtol=1e-6)


def test_scores_are_an_inner_product_of_user_and_item_vectors(warm_model: Recommender) -> None:
    users = np.arange(12)
    expected = warm_model.user_vectors(users) @ warm_model.item_vectors().T
    np.testing.assert_allclose(warm_model.score_all(users).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_tower_trained_after_acf_leaves_warm_scores_exactly_as_without_a_tower(
    warm_model: Recommender, cold: ColdSplit, store: ComponentStore
) -> None:
    assert warm_model.config.tower_training == "after"
    plain = get_model("acf")(components_path=str(store.path), **dict(TOWER, content_tower=False)).fit(cold.warm)
    users = np.arange(cold.n_users)
    torch.testing.assert_close(warm_model.score_all(users), plain.score_all(users), rtol=0, atol=0)
    stages = [entry.get("stage", "acf") for entry in warm_model.history]
    assert stages[-1] == "tower" and stages.count("acf") == len(plain.history)


def test_the_tower_stage_has_its_own_epochs_and_patience(cold: ColdSplit, store: ComponentStore) -> None:
    options = dict(TOWER, pretrain=None, epochs=3, patience=0, components_path=str(store.path))
    capped = get_model("acf")(**dict(options, tower_epochs=1)).fit(cold.warm)
    stages = [entry.get("stage", "acf") for entry in capped.history]
    assert stages.count("tower") == 1 and stages.count("acf") >= 1
    longer = get_model("acf")(**dict(options, tower_epochs=4, tower_patience=10)).fit(cold.warm)
    assert [entry.get("stage", "acf") for entry in longer.history].count("tower") == 4


def test_a_jointly_trained_tower_ranks_cold_items_by_taste(
    cold: ColdSplit, store: ComponentStore, catalogue: Catalogue, tmp_path: Path
) -> None:
    joint = get_model("acf")(components_path=str(store.path), **dict(TOWER, tower_training="joint")).fit(cold.warm)
    assert all("stage" not in entry for entry in joint.history)
    model = with_cold_items(joint, cold, store, tmp_path)
    users = cold.eval_users()
    top, _ = model.recommend(users, k=5, allow=cold.cold_items)
    affinity = catalogue.truth.affinity[users]
    recommended = np.take_along_axis(affinity, source_index(model.items.external_ids[top]), axis=1).mean()
    assert recommended > 1.5 * affinity[:, source_index(cold.cold_ids)].mean()


def test_a_two_stage_run_resumes_from_its_checkpoints(cold: ColdSplit, store: ComponentStore, tmp_path: Path) -> None:
    options = dict(TOWER, pretrain=None, patience=0, components_path=str(store.path))
    whole = get_model("acf")(**dict(options, epochs=3)).fit(cold.warm)
    checkpoints = tmp_path / "checkpoints"
    get_model("acf")(**dict(options, epochs=2, checkpoint_dir=str(checkpoints))).fit(cold.warm)
    first_tower = list(checkpoints.glob("tower-*"))
    # ACF's stage resumes for its third epoch: the tower's checkpoint, trained against the
    # two-epoch model, must not be resumed against the three-epoch one
    resumed = get_model("acf")(**dict(options, epochs=3, checkpoint_dir=str(checkpoints))).fit(cold.warm)
    assert len(first_tower) == 1 and list(checkpoints.glob("tower-*")) != first_tower
    users = np.arange(cold.n_users)
    for model in (resumed, get_model("acf")(**dict(options, epochs=3, checkpoint_dir=str(checkpoints))).fit(cold.warm)):
        torch.testing.assert_close(model.score_all(users), whole.score_all(users), rtol=0, atol=0)
        torch.testing.assert_close(model.module.tower.state_dict(), whole.module.tower.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("training", ["after", "joint"])
def test_training_with_the_tower_is_repeatable(cold: ColdSplit, store: ComponentStore, training: str) -> None:
    options = dict(TOWER, epochs=2, pretrain=None, tower_training=training)
    first = get_model("acf")(components_path=str(store.path), **options).fit(cold.warm)
    second = get_model("acf")(components_path=str(store.path), **options).fit(cold.warm)
    torch.testing.assert_close(first.score_all(np.arange(8)), second.score_all(np.arange(8)), rtol=0, atol=0)


# ------------------------------------------------------------------------ bad input
def test_add_items_errors(warm_model: Recommender, cold: ColdSplit, store: ComponentStore, tmp_path: Path) -> None:
    model = Recommender.load(warm_model.save(tmp_path / "m"))
    with pytest.raises(DataValidationError, match="already in the model"):
        model.add_items(store, [cold.warm.items.external_ids[0]])
    width = model.module.features.shape[1]
    with pytest.raises(DataValidationError, match="dimension 3 but the model was trained on 16"):
        model.add_items(AlignedComponents(torch.zeros(1, width, 3), torch.ones(1, width, dtype=torch.bool)), ["x"])
    with pytest.raises(DataValidationError, match="needs item_ids of the same length"):
        model.add_items(AlignedComponents(torch.zeros(2, width, 16), torch.ones(2, width, dtype=torch.bool)), ["x"])
    assert model.n_items == cold.n_warm  # nothing half-added
    plain = get_model("acf")(dim=8, epochs=1, progress=False, pretrain=None).fit(cold.warm)
    with pytest.raises(DataValidationError, match="content_tower=True"):
        plain.add_items(store)
    with pytest.raises(DataValidationError, match="content_tower=True needs components"):
        get_model("acf")(content_tower=True, dim=8, epochs=1, progress=False, pretrain=None).fit(cold.warm)
    for option in ({"tower_dropout": 1.5}, {"tower_blend": -0.1}, {"tower_hidden": 0}, {"tower_validation_weight": 2.0},
                   {"frame_agreement": -1.0}, {"tower_training": "later"}, {"tower_epochs": 0},
                   {"tower_patience": -1}, {"tower_epochs": 1.5}):
        with pytest.raises(ValueError, match=next(iter(option))):
            get_model("acf")(components_path=str(store.path), **dict(TOWER, **option)).fit(cold.warm)


def test_tower_pooling_is_checked_and_attention_pooling_ignores_padding() -> None:
    with pytest.raises(ValueError, match="tower_pooling"):
        ContentTower(4, 8, pooling="max")
    tower = ContentTower(4, 8, hidden=16, pooling="attention")
    torch.nn.init.normal_(tower.pool_out.weight)
    features = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    padded = features.clone()
    padded[~mask] = 1e6  # whatever sits in a padded slot must not matter
    for a, b in zip(tower(features, mask), tower(padded, mask), strict=True):
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all()


# -------------------------------------------------------------------------- serving
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_service_inserts_new_items_into_the_faiss_index(
    kind: str, warm_model: Recommender, cold: ColdSplit, store: ComponentStore, tmp_path: Path
) -> None:
    model = Recommender.load(warm_model.save(tmp_path / "m"))
    service = RecommenderService(model, index=IndexConfig(kind=kind, nlist=4, nprobe=4))
    before = service.recommend(["u0", "u1"], k=5)
    assert service.item_index().n_items == cold.n_warm and len(before) == 10
    added = service.add_items(store, cold.cold_ids)
    assert added == [str(x) for x in cold.cold_ids]
    assert service.item_index().n_items == cold.n_items
    top = service.recommend(["u0", "u1", "u2"], k=5, allow=added)
    assert len(top) == 15 and set(top["item"]) <= set(added)
    # the index's answer is the model's own ranking of the new items
    user_index = np.arange(3)
    expected, _ = model.recommend(user_index, k=5, allow=cold.cold_items)
    if kind == "flat":
        assert top["item"].tolist() == model.items.external_ids[expected].reshape(-1).tolist()
    scores = service.score("u0", added[:3])
    np.testing.assert_allclose(scores["score"], model.score([0], cold.cold_items[:3])[0], rtol=1e-5)
    # a new user whose history holds only new items still gets attention over them
    fresh = service.recommend_for_history(added[:4], k=5)
    assert len(fresh) == 5 and not set(fresh["item"]) & set(added[:4])


def test_service_refuses_models_without_a_tower(cold: ColdSplit, store: ComponentStore) -> None:
    plain = get_model("bpr-mf")(dim=8, epochs=1, progress=False).fit(cold.warm)
    with pytest.raises(DataValidationError, match="cannot add items from content"):
        RecommenderService(plain).add_items(store)


def test_item_index_add_items_checks_the_old_rows() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    index = ItemIndex.build(vectors[:40])
    with pytest.raises(DataValidationError, match="differ from the vectors"):
        index.add_items(vectors[::-1])
    with pytest.raises(DataValidationError, match="n_total > 40"):
        index.add_items(vectors[:40])
    assert index.add_items(vectors).tolist() == list(range(40, 50))
    fresh = ItemIndex.build(vectors)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    assert np.array_equal(index.search(queries, 7)[0], fresh.search(queries, 7)[0])
    assert index.vectors_fingerprint == fresh.vectors_fingerprint


# ------------------------------------------------------------ cold protocol in compare
def test_cold_result_save_load_round_trip(warm_model: Recommender, cold: ColdSplit, store: ComponentStore, tmp_path: Path) -> None:
    from acfrec.errors import ArtifactError
    from acfrec.eval.cold import ColdResult

    result = evaluate_cold(RandomScorer(seed=1).fit(cold.warm.train, item_content(store, cold.items)), cold, ks=(5, 10))
    loaded = ColdResult.load(result.save(tmp_path / "random"))
    assert loaded.metrics == result.metrics and loaded.ks == result.ks and loaded.model_name == "random"
    assert np.array_equal(loaded.users, result.users) and np.array_equal(loaded.offsets, result.offsets)
    for protocol in ("cold", "all"):
        assert np.array_equal(loaded.per_user("NDCG@10", protocol), result.per_user("NDCG@10", protocol))
    (tmp_path / "random" / "positions.parquet").unlink()
    with pytest.raises(ArtifactError, match="positions.parquet is missing"):
        ColdResult.load(tmp_path / "random")


def test_compare_with_the_cold_protocol_logs_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    from acfrec.cli import main

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    code = main([
        "-q", "--tracking-uri", uri, "compare", "--config", "demo", "--models", "itempop", "acf",
        "--protocols", "cold", "full", "--ks", "10", "20", "--n-negatives", "20", "--out", str(tmp_path / "out"),
        "--set", "data.planted.n_users=150", "data.planted.n_items=100", "acf.content_tower=true", "acf.epochs=3",
        "acf.pretrain=null",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    for row in ("| random |", "| content-pop |", "| content-knn |", "| acf |", "cold Recall@20", "warm items"):
        assert row in printed, printed
    assert "not ranked on cold items: itempop has no content path" in printed
    out = tmp_path / "out"
    assert {p.name for p in (out / "cold").iterdir()} == {"random", "content-pop", "content-knn", "acf"}
    assert (out / "cold_results.md").is_file() and (out / "eval" / "acf").is_dir()
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("acfrec-demo")
    found = client.search_runs([experiment.experiment_id])
    by_name = {run.info.run_name: run for run in found}
    assert {"compare-cold", "random", "content-knn", "acf", "itempop"} <= set(by_name)
    assert "cold.cold.Recall_at_20" in by_name["acf"].data.metrics and "cold.all.NDCG_at_10" in by_name["content-knn"].data.metrics
    assert "test.full.HR_at_10" in by_name["acf"].data.metrics
    assert by_name["compare-cold"].data.tags["acfrec.best_model"] in {"random", "content-pop", "content-knn", "acf"}


def test_compare_cold_needs_content_and_interactions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from acfrec.cli import main

    data = tmp_path / "inter.csv"
    data.write_text("user,item,timestamp\n" + "".join(f"u{u},i{(u * 7 + k) % 40},{k}\n" for u in range(30) for k in range(8)))
    command = ["-q", "--no-track", "compare", "--models", "itempop", "--protocols", "cold", "--n-negatives", "5"]
    assert main([*command, "--data", str(data)]) == 2
    assert "pass --components STORE" in capsys.readouterr().err
    assert main([*command, "--split", str(tmp_path)]) == 2
    assert "not --split" in capsys.readouterr().err


def test_compare_gives_data_components_to_acf(tmp_path: Path) -> None:
    import mlflow

    from acfrec.cli import main

    store = planted_catalogue(n_users=150, n_items=100, seed=0).write_store(tmp_path / "store", dim=8)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    code = main([
        "-q", "--tracking-uri", uri, "compare", "--config", "demo", "--models", "acf", "--protocols", "full",
        "--ks", "10", "--n-negatives", "20", "--components", str(store.path), "--set", "data.planted.n_users=150", "data.planted.n_items=100",
        "acf.epochs=1", "acf.pretrain=null",
    ])
    assert code == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("acfrec-demo").experiment_id])
    acf_run = next(run for run in runs if run.info.run_name == "acf")
    assert acf_run.data.params["model.components_path"] == str(store.path)
