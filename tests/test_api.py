"""The Python scoring API (acfrec.load / RecommenderService): external ids in and out, the same
numbers as the model it serves, clear errors, concurrent reads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

import acfrec
from acfrec.api import RecommenderService
from acfrec.data.split import Split
from acfrec.errors import ArtifactError, DataValidationError, UnknownIdError
from acfrec.index import IndexConfig
from acfrec.models import Recommender, get_model

FAST = {"fism": dict(dim=16, epochs=3, progress=False), "itempop": {}, "acf": dict(dim=16, epochs=1, progress=False)}


@pytest.fixture(scope="module")
def saved(small_split: Split, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FISM (served from the item index) and ItemPop (served from score_all), saved once."""
    root = tmp_path_factory.mktemp("api")
    return {name: get_model(name)(**FAST[name]).fit(small_split).save(root / name) for name in ("fism", "itempop")}


@pytest.fixture(scope="module", params=["fism", "itempop"])
def served(request: pytest.FixtureRequest, saved: dict[str, Path]) -> RecommenderService:
    return acfrec.load(saved[request.param])


def external(split: Split, users: np.ndarray) -> list[str]:
    return split.users.to_external(users).tolist()


# ------------------------------------------------------------------- loading
def test_load_gives_a_service_with_the_split_ids(served: RecommenderService, small_split: Split) -> None:
    assert isinstance(served, RecommenderService)
    assert served.users == small_split.users and served.items == small_split.items
    assert served.servable == (served.model.name == "fism")


def test_load_of_a_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="nowhere"):
        acfrec.load(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="not a saved acfrec model"):
        acfrec.load(tmp_path)


def test_a_model_without_id_maps_needs_them_given(small_split: Split, tmp_path: Path) -> None:
    model = get_model("itempop")().fit(small_split.train)  # a bare matrix: no ids known
    path = model.save(tmp_path / "bare")
    assert not (path / "users.json").exists()
    with pytest.raises(ArtifactError, match="users= and items="):
        acfrec.load(path)
    service = RecommenderService(Recommender.load(path), small_split.users, small_split.items)
    expected = small_split.items.to_external(model.recommend([small_split.users.to_index("u0")[0]], k=3)[0][0])
    assert service.recommend("u0", k=3)["item"].tolist() == expected.tolist()
    with pytest.raises(DataValidationError, match="do not match the model"):
        RecommenderService(model, small_split.items, small_split.users)


# ------------------------------------------------------------------- scoring
def test_score_is_the_models_score_in_external_ids(served: RecommenderService, small_split: Split) -> None:
    frame = served.score(user="u3", items=["i5", "i0", "i119", "i5"])
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["user", "item", "score"]
    assert frame["user"].tolist() == ["u3"] * 4 and frame["item"].tolist() == ["i5", "i0", "i119", "i5"]
    user = small_split.users.to_index("u3")
    expected = served.model.score(user, small_split.items.to_index(["i5", "i0", "i119", "i5"]))[0]
    np.testing.assert_allclose(frame["score"].to_numpy(), expected, rtol=1e-6)


def test_score_pairs_matches_score_all(served: RecommenderService, small_split: Split) -> None:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, small_split.n_users, 500), rng.integers(0, small_split.n_items, 500)
    frame = served.score_pairs(external(small_split, users), small_split.items.to_external(items), output="polars")
    assert isinstance(frame, pl.DataFrame) and frame.schema["user"] == pl.String
    expected = served.model.score_all(users).numpy()[np.arange(500), items]
    np.testing.assert_allclose(frame["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ top-N
def test_recommend_matches_the_model(served: RecommenderService, small_split: Split) -> None:
    users = np.arange(0, small_split.n_users, 7)
    frame = served.recommend(external(small_split, users), k=5)
    assert list(frame.columns) == ["user", "rank", "item", "score"]
    assert frame["rank"].tolist() == list(range(5)) * users.size  # 0-based, like acfrec's ranks
    items, scores = served.model.recommend(users, k=5)
    np.testing.assert_allclose(frame["score"].to_numpy().reshape(-1, 5), scores, rtol=1e-5, atol=1e-6)
    got = small_split.items.to_index(frame["item"].tolist()).reshape(-1, 5)
    # the index may order exact ties differently: compare the scores of what it returned
    np.testing.assert_allclose(served.model.score(users, got), scores, rtol=1e-5, atol=1e-6)
    assert not np.asarray(small_split.train[users[:, None], got].todense()).any()  # seen excluded


def test_recommend_can_keep_seen_items_and_filter(served: RecommenderService, small_split: Split) -> None:
    seen = small_split.items.to_external(small_split.train[0].indices).tolist()
    everything = served.recommend("u0", k=small_split.n_items, exclude_seen=False)
    assert set(everything["item"]) == set(small_split.items.external_ids)
    allowed = seen[:2] + ["i1", "i2", "i3"]
    only = served.recommend("u0", k=10, allow=allowed, deny=["i2"])
    assert set(only["item"]) == set(allowed) - set(seen) - {"i2"}  # fewer rows than k: no padding rows
    top = served.recommend("u0", k=3)["item"].tolist()
    assert top[0] not in served.recommend("u0", k=3, deny=[top[0]])["item"].tolist()


def test_pandas_and_polars_agree(served: RecommenderService) -> None:
    as_pandas = served.recommend(["u1", "u2"], k=4)
    as_polars = served.recommend(["u1", "u2"], k=4, output="polars")
    assert isinstance(as_polars, pl.DataFrame)
    assert as_polars.schema == {"user": pl.String, "rank": pl.Int64, "item": pl.String, "score": pl.Float32}
    pd.testing.assert_frame_equal(as_polars.to_pandas(), as_pandas, check_dtype=False)


def test_recommend_for_a_training_history_is_that_users_top_n(saved: dict[str, Path], small_split: Split) -> None:
    """FISM sees users only through their histories: a copied history gets the same top-N."""
    service = acfrec.load(saved["fism"])
    histories = [small_split.items.to_external(small_split.train[u].indices).tolist() for u in (4, 9)]
    frame = service.recommend_for_history(histories, k=5)
    assert list(frame.columns) == ["history", "rank", "item", "score"]
    known = service.recommend(["u4", "u9"], k=5)
    np.testing.assert_allclose(frame["score"].to_numpy(), known["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    single = service.recommend_for_history(histories[0], k=5)
    assert single["history"].unique().tolist() == [0] and single["item"].tolist() == frame["item"].tolist()[:5]
    assert not set(single["item"]) & set(histories[0])
    with_history = service.recommend_for_history(histories[0], k=small_split.n_items, exclude_history=False)
    assert len(with_history) == small_split.n_items


def test_similar_items(saved: dict[str, Path], small_split: Split) -> None:
    service = acfrec.load(saved["fism"])
    frame = service.similar_items(item=["i3", "i40"], k=4)
    assert list(frame.columns) == ["item", "rank", "similar_item", "score"]
    items, scores = service.model.similar_items(small_split.items.to_index(["i3", "i40"]), k=4)
    assert frame["similar_item"].tolist() == small_split.items.to_external(items.ravel()).tolist()
    np.testing.assert_allclose(frame["score"].to_numpy(), scores.ravel(), rtol=1e-6)
    with pytest.raises(NotImplementedError, match="no item vectors"):
        acfrec.load(saved["itempop"]).similar_items("i3", k=4)


def test_an_approximate_index_is_a_config_away(saved: dict[str, Path]) -> None:
    exact = acfrec.load(saved["fism"]).recommend(["u1", "u2"], k=5)
    hnsw = acfrec.load(saved["fism"], index=IndexConfig(kind="hnsw"))
    assert hnsw.item_index().config.kind == "hnsw"
    assert set(hnsw.recommend(["u1", "u2"], k=5)["item"]) == set(exact["item"])  # 120 items: HNSW is exact here


# ------------------------------------------------------------------ explain
def test_fism_explain_splits_the_score_by_history_item(saved: dict[str, Path], small_split: Split) -> None:
    service = acfrec.load(saved["fism"])
    history = set(small_split.items.to_external(small_split.train[5].indices))
    found = service.explain(user="u5", item="i17", top_items=len(history))
    assert found["user"] == "u5" and found["item"] == "i17"
    assert {entry["item"] for entry in found["history"]} == history
    parts = found["bias"] + found["user_term"] + sum(entry["contribution"] for entry in found["history"])
    assert parts == pytest.approx(found["score"], abs=1e-5)
    assert found["score"] == pytest.approx(float(service.score("u5", ["i17"])["score"][0]), abs=1e-6)


def test_acf_explain_names_history_items(small_split: Split, tmp_path: Path) -> None:
    model = get_model("acf")(**FAST["acf"]).fit(small_split)
    service = acfrec.load(model.save(tmp_path / "acf"))
    found = service.explain(user="u5", item="i17", top_items=3)
    history = set(small_split.items.to_external(small_split.train[5].indices))
    assert len(found["history"]) == 3 and {entry["item"] for entry in found["history"]} <= history
    assert found["score"] == pytest.approx(float(service.score("u5", ["i17"])["score"][0]), abs=1e-5)


def test_explain_on_a_model_that_cannot(saved: dict[str, Path]) -> None:
    with pytest.raises(NotImplementedError, match="'itempop' models cannot explain"):
        acfrec.load(saved["itempop"]).explain("u1", "i1")


# ------------------------------------------------------------------ bad input
def test_clear_errors(served: RecommenderService, small_split: Split) -> None:
    n_items = small_split.n_items
    cases = [
        (UnknownIdError, "unknown user id 'nobody'", lambda: served.recommend(["u1", "nobody"], k=3)),
        (UnknownIdError, "unknown item id 'i999'", lambda: served.score("u1", ["i1", "i999"])),
        (UnknownIdError, "unknown user id 'ghost'", lambda: served.score("ghost", ["i1"])),
        (UnknownIdError, "unknown item id 'x'", lambda: served.recommend_for_history(["i1", "x"], k=3)),
        (UnknownIdError, "unknown item id 'gone'", lambda: served.recommend("u1", k=3, deny=["gone"])),
        (DataValidationError, "empty candidate list", lambda: served.score("u1", [])),
        (DataValidationError, "history 0 is empty", lambda: served.recommend_for_history([], k=3)),
        (DataValidationError, f"k={n_items + 1} is larger than the catalogue", lambda: served.recommend("u1", k=n_items + 1)),
        (DataValidationError, "k must be at least 1", lambda: served.recommend("u1", k=0)),
        (TypeError, "k must be an integer", lambda: served.recommend("u1", k="10")),
        (TypeError, "k must be an integer", lambda: served.recommend("u1", k=2.5)),
        (TypeError, "items must be a list of ids", lambda: served.score("u1", "i1")),
        (TypeError, "user must be one id", lambda: served.score(["u1"], ["i1"])),
        (TypeError, r"users\[1\] must be an id", lambda: served.recommend(["u1", None], k=3)),
        (TypeError, "users must be an id or a list", lambda: served.recommend({"u1"}, k=3)),
        (DataValidationError, "output must be one of", lambda: served.recommend("u1", k=3, output="csv")),
        (DataValidationError, "must pair up", lambda: served.score_pairs(["u1", "u2"], ["i1"])),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_int_ids_are_the_same_as_their_strings(small_split: Split, tmp_path: Path) -> None:
    frame = small_split.train_frame  # dense indices as external ids: "0", "1", ...
    from acfrec.data.interactions import Interactions
    from acfrec.data.splitting import leave_one_out

    numeric = leave_one_out(Interactions.from_frame(frame.select("user", "item", "timestamp"), timestamp_col="timestamp"))
    service = acfrec.load(get_model("itempop")().fit(numeric).save(tmp_path / "numeric"))
    assert service.recommend(7, k=3).equals(service.recommend("7", k=3))
    assert service.score(7, [1, 2])["item"].tolist() == ["1", "2"]


# ------------------------------------------------------------------ threads
def test_concurrent_reads_match_serial_results(saved: dict[str, Path], small_split: Split) -> None:
    """Many threads on one service (index path, and the torch score_all path) give the serial answers."""
    rng = np.random.default_rng(1)
    requests = [external(small_split, rng.integers(0, small_split.n_users, 16)) for _ in range(12)]
    for servable in (True, False):
        service = acfrec.load(saved["fism"])
        service.servable = servable  # force the score_all path of the same torch model

        def answer(users: list[str], service: RecommenderService = service) -> tuple[pd.DataFrame, pd.DataFrame]:
            return service.recommend(users, k=10), service.score_pairs(users, ["i1"] * len(users))

        with ThreadPoolExecutor(max_workers=8) as pool:
            parallel = list(pool.map(answer, requests * 2))
        serial = [answer(users) for users in requests * 2]
        for (top_p, score_p), (top_s, score_s) in zip(parallel, serial, strict=True):
            pd.testing.assert_frame_equal(top_p, top_s)
            pd.testing.assert_frame_equal(score_p, score_s)
