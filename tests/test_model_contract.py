"""The contract every registered model keeps: fit / score / recommend / save-load / bad input.

Parametrised over :func:`acfrec.models.available_models`, so a newly registered model is tested
without editing this file. Models are shrunk for speed by :func:`fast_options`: generic small
values for the usual option names, plus :data:`FAST_OVERRIDES` for a model that needs more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from acfrec.data.split import Split
from acfrec.errors import DataValidationError, NotFittedError, UnknownIdError
from acfrec.models import Recommender, available_models, get_model

MODELS = available_models()

# Applied to every model whose config has the option: small and quick, no progress bars.
GENERIC_FAST: dict[str, Any] = {
    "epochs": 3,
    "iterations": 3,
    "dim": 16,
    "factors": 16,
    "batch_size": 512,
    "progress": False,
}
# Per-model extras on top of GENERIC_FAST, keyed by registered name (most models need none).
FAST_OVERRIDES: dict[str, dict[str, Any]] = {
    "acf": {"epochs": 1},  # per pair its two attention levels cost ~10x a factor model's step
}


def fast_options(name: str, **extra: Any) -> dict[str, Any]:
    """Config keywords that make model ``name`` small and fast on the test split."""
    fields = {f.name for f in dataclasses.fields(get_model(name).config_class)}
    options = {key: value for key, value in GENERIC_FAST.items() if key in fields}
    return options | FAST_OVERRIDES.get(name, {}) | extra


def make(name: str, **extra: Any) -> Recommender:
    return get_model(name)(**fast_options(name, **extra))


@dataclass
class Fitted:
    name: str
    model: Recommender
    fit_returned: object


@pytest.fixture(scope="module", params=MODELS)
def fitted(request: pytest.FixtureRequest, small_split: Split) -> Fitted:
    """Each registered model, fitted once on the shared small split (read-only in tests)."""
    model = make(request.param)
    return Fitted(request.param, model, model.fit(small_split))


USERS = np.array([0, 3, 7, 199])


# ------------------------------------------------------------------------------ fit
def test_fit_returns_self_and_knows_the_sizes(fitted: Fitted, small_split: Split) -> None:
    assert fitted.fit_returned is fitted.model
    assert (fitted.model.n_users, fitted.model.n_items) == small_split.train.shape
    assert type(fitted.model).name == fitted.name


@pytest.mark.parametrize("name", MODELS)
def test_fit_takes_a_bare_matrix(name: str, small_split: Split) -> None:
    model = make(name).fit(small_split.train, valid=small_split.valid_items)
    scores = model.score_all(USERS)
    assert scores.shape == (USERS.size, small_split.n_items)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("name", MODELS)
def test_fit_on_an_empty_matrix_is_refused(name: str, small_split: Split) -> None:
    with pytest.raises(DataValidationError, match="empty"):
        make(name).fit(sp.csr_matrix(small_split.train.shape, dtype=np.float32))


@pytest.mark.parametrize("name", MODELS)
def test_fit_with_a_wrong_shaped_valid_array_is_refused(name: str, small_split: Split) -> None:
    wrong = np.zeros(small_split.n_users + 1, dtype=np.int64)
    with pytest.raises(DataValidationError, match="shape"):
        make(name).fit(small_split.train, valid=wrong)


def test_same_seed_same_scores(fitted: Fitted, small_split: Split) -> None:
    if not getattr(fitted.model, "deterministic", True):
        pytest.skip(f"{fitted.name} declares deterministic = False with these options")
    again = make(fitted.name).fit(small_split)
    users = np.arange(small_split.n_users)
    assert torch.equal(fitted.model.score_all(users), again.score_all(users))


# ---------------------------------------------------------------------------- score
def test_score_shapes_and_finiteness(fitted: Fitted, small_split: Split) -> None:
    model = fitted.model
    shared = model.score(USERS, [5, 0, 119, 42, 5])
    per_user = model.score(USERS, np.arange(12).reshape(4, 3))
    single = model.score([2], [1])
    for scores, shape in ((shared, (4, 5)), (per_user, (4, 3)), (single, (1, 1))):
        assert isinstance(scores, np.ndarray) and scores.dtype == np.float32
        assert scores.shape == shape
        assert np.isfinite(scores).all()
    assert shared[:, 0].tolist() == shared[:, 4].tolist()  # the same item twice, the same score
    everything = model.score_all(USERS)
    assert isinstance(everything, torch.Tensor) and everything.shape == (4, small_split.n_items)
    assert torch.isfinite(everything).all()


def test_score_agrees_with_score_all(fitted: Fitted, small_split: Split) -> None:
    rng = np.random.default_rng(0)
    users = np.arange(small_split.n_users)
    items = rng.integers(0, small_split.n_items, size=(users.size, 7))
    expected = np.take_along_axis(fitted.model.score_all(users).numpy(), items, axis=1)
    np.testing.assert_allclose(fitted.model.score(users, items), expected, rtol=1e-5, atol=1e-5)


def test_retrieval_vectors_reproduce_the_scores(fitted: Fitted, small_split: Split) -> None:
    """Models servable from an inner-product index must give exactly their own scores that way."""
    from acfrec.index.vectors import model_vectors

    users = np.arange(min(20, small_split.n_users))
    try:
        queries, items = model_vectors(fitted.model, users)
    except NotImplementedError:
        return  # not index-servable (e.g. ItemPop, ACF): nothing to check
    np.testing.assert_allclose(queries @ items.T, fitted.model.score_all(users).numpy(), rtol=1e-4, atol=1e-5)


def test_scores_are_not_all_equal(fitted: Fitted) -> None:
    # A model that scores every item the same would get HR 0 under pessimistic ties.
    assert fitted.model.score_all(USERS).std(dim=1).min() > 0


# ------------------------------------------------------------------------ recommend
def test_recommend_top_k_excludes_seen(fitted: Fitted, small_split: Split) -> None:
    users = np.arange(small_split.n_users)
    items, scores = fitted.model.recommend(users, k=10)
    assert items.shape == scores.shape == (users.size, 10)
    assert items.dtype == np.int64 and scores.dtype == np.float32
    assert items.min() >= 0  # every user has far more than 10 unseen items
    assert all(len(set(row)) == 10 for row in items.tolist())
    assert not np.asarray(small_split.train[users[:, None], items].todense()).any()
    assert np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(scores, fitted.model.score(users, items), rtol=1e-5, atol=1e-5)


def test_recommend_may_return_seen_items_when_asked(fitted: Fitted, small_split: Split) -> None:
    n_items = small_split.n_items
    items, scores = fitted.model.recommend(USERS, k=n_items, exclude_seen=False)
    assert (np.sort(items, axis=1) == np.arange(n_items)).all()  # every item, training ones too
    np.testing.assert_allclose(scores, fitted.model.score(USERS, items), rtol=1e-5, atol=1e-5)


def test_recommend_extra_exclusions(fitted: Fitted, small_split: Split) -> None:
    users = small_split.eval_users("test")
    items, _ = fitted.model.recommend(users, k=10, exclude=small_split.seen("test"))
    assert not (items == small_split.valid_items[users, None]).any()


def test_recommend_bad_k(fitted: Fitted) -> None:
    n_items = fitted.model.n_items
    for k in (0, -1, n_items + 1, n_items + 10_000):
        with pytest.raises(DataValidationError, match="k must be"):
            fitted.model.recommend(USERS, k=k)


# ---------------------------------------------------------------------- bad input
def test_unknown_indices(fitted: Fitted, small_split: Split) -> None:
    model, n_users, n_items = fitted.model, small_split.n_users, small_split.n_items
    calls = [
        lambda: model.score([n_users], [0]),
        lambda: model.score([-1], [0]),
        lambda: model.score([0], [n_items]),
        lambda: model.score([0, 1], [[0], [-5]]),
        lambda: model.recommend([0, n_users], k=5),
        lambda: model.similar_items([n_items], k=5),
    ]
    for call in calls:
        with pytest.raises(UnknownIdError, match="out of range"):
            call()


def test_empty_candidate_list(fitted: Fitted) -> None:
    with pytest.raises(DataValidationError, match="empty candidate"):
        fitted.model.score([0], [])
    with pytest.raises(DataValidationError, match="empty candidate"):
        fitted.model.score([0, 1], np.empty((2, 0), dtype=np.int64))


def test_mismatched_candidate_rows(fitted: Fitted) -> None:
    with pytest.raises(DataValidationError, match="shape"):
        fitted.model.score([0, 1, 2], np.zeros((2, 4), dtype=np.int64))


@pytest.mark.parametrize("name", MODELS)
def test_unfitted_model_refuses_to_work(name: str, tmp_path: Path) -> None:
    model = make(name)
    calls = [
        lambda: model.score([0], [0]),
        lambda: model.score_all(np.array([0])),
        lambda: model.recommend([0], k=1),
        lambda: model.similar_items([0], k=1),
        lambda: model.save(tmp_path / "never"),
    ]
    for call in calls:
        with pytest.raises(NotFittedError):
            call()
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------- similar items
def test_similar_items_or_not_implemented(fitted: Fitted, small_split: Split) -> None:
    queries = np.array([0, 5, 119])
    try:
        items, scores = fitted.model.similar_items(queries, k=5)
    except NotImplementedError:
        return
    assert items.shape == scores.shape == (3, 5)
    assert not (items == queries[:, None]).any()
    assert items.min() >= 0 and items.max() < small_split.n_items
    assert all(len(set(row)) == 5 for row in items.tolist())
    assert np.all(np.diff(scores, axis=1) <= 0)
    with pytest.raises(DataValidationError):
        fitted.model.similar_items(queries, k=small_split.n_items)


# --------------------------------------------------------------------- persistence
def test_save_then_load_gives_the_same_model(fitted: Fitted, small_split: Split, tmp_path: Path) -> None:
    path = fitted.model.save(tmp_path / "model")
    assert (path / "meta.json").is_file()
    for loader in (Recommender, type(fitted.model)):
        loaded = loader.load(path)
        assert type(loaded) is type(fitted.model)
        assert loaded.config == fitted.model.config
        users = np.arange(small_split.n_users)
        assert torch.equal(loaded.score_all(users), fitted.model.score_all(users))
        assert np.array_equal(loaded.recommend(users, k=10)[0], fitted.model.recommend(users, k=10)[0])
        assert (loaded.seen != fitted.model.seen).nnz == 0


def test_save_over_an_existing_folder_replaces_it(fitted: Fitted, tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    (path / "stale.txt").write_text("from an older run")
    fitted.model.save(path)
    fitted.model.save(path)
    assert not (path / "stale.txt").exists()
    assert torch.equal(Recommender.load(path).score_all(USERS), fitted.model.score_all(USERS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old folders left


def test_failing_save_leaves_nothing_behind(
    fitted: Fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fitted.model.save(tmp_path / "kept")

    def broken_state() -> dict:
        raise OSError("disk full")

    monkeypatch.setattr(fitted.model, "_state", broken_state)
    for target in ("fresh", "kept"):
        with pytest.raises(OSError, match="disk full"):
            fitted.model.save(tmp_path / target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # nothing partial, old one intact
    assert torch.equal(Recommender.load(tmp_path / "kept").score_all(USERS), fitted.model.score_all(USERS))


# -------------------------------------------------------------------- id maps
def test_fit_on_a_split_keeps_its_id_maps(fitted: Fitted, small_split: Split) -> None:
    assert fitted.model.users == small_split.users and fitted.model.items == small_split.items


def test_id_maps_survive_save_and_load(fitted: Fitted, small_split: Split, tmp_path: Path) -> None:
    path = fitted.model.save(tmp_path / "model")
    assert (path / "users.json").is_file() and (path / "items.json").is_file()
    loaded = Recommender.load(path)
    assert loaded.users == small_split.users and loaded.items == small_split.items
    assert loaded.items.to_index(["i7"]).tolist() == small_split.items.to_index(["i7"]).tolist()


def test_folders_without_id_maps_still_load(fitted: Fitted, tmp_path: Path) -> None:
    """Folders saved before models kept their ids (or by a model fitted on a bare matrix) load with None."""
    path = fitted.model.save(tmp_path / "model")
    (path / "users.json").unlink()
    (path / "items.json").unlink()
    loaded = Recommender.load(path)
    assert loaded.users is None and loaded.items is None
    assert torch.equal(loaded.score_all(USERS), fitted.model.score_all(USERS))


def test_an_id_map_of_the_wrong_size_is_refused(fitted: Fitted, tmp_path: Path) -> None:
    from acfrec.data.idmap import IdMap
    from acfrec.errors import ArtifactError

    path = fitted.model.save(tmp_path / "model")
    IdMap(["a", "b"], kind="item").save(path / "items.json")
    with pytest.raises(ArtifactError, match="items.json has 2 ids"):
        Recommender.load(path)


# ------------------------------------------------------------- score_histories
HISTORY_USERS = np.array([0, 3, 7, 11])


def test_score_histories_shape_and_rows(fitted: Fitted, small_split: Split) -> None:
    """Scores of new users' histories: one row per history, each independent of the others."""
    histories = small_split.train[HISTORY_USERS]
    scores = fitted.model.score_histories(histories)  # every registered model implements it
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32
    assert scores.shape == (HISTORY_USERS.size, small_split.n_items)
    assert torch.isfinite(scores).all()
    alone = torch.cat([fitted.model.score_histories(histories[[row]]) for row in range(HISTORY_USERS.size)])
    torch.testing.assert_close(scores, alone, rtol=1e-4, atol=1e-5)
    if fitted.name != "itempop":  # popularity ignores the history by design
        assert not torch.allclose(scores[0], scores[1])


def test_score_histories_bad_input(fitted: Fitted, small_split: Split) -> None:
    fitted.model.score_histories(small_split.train[:1])
    wrong = sp.csr_matrix((1, small_split.n_items + 1), dtype=np.float32)
    for bad in (wrong, small_split.train[:1].toarray()):
        with pytest.raises(DataValidationError, match="histories"):
            fitted.model.score_histories(bad)


# Exact checks of each model's history representation (fast options, shared small split).
@pytest.mark.parametrize("name", ["itempop", "fism"])
def test_history_of_a_training_user_scores_like_that_user(name: str, fitted_by_name, small_split: Split) -> None:
    """ItemPop and FISM see a user only through the history: a copied history scores identically."""
    model = fitted_by_name(name)
    expected = model.score_all(HISTORY_USERS)
    torch.testing.assert_close(model.score_histories(small_split.train[HISTORY_USERS]), expected, rtol=1e-5, atol=1e-6)


def test_svdpp_new_user_has_no_free_factors(fitted_by_name, small_split: Split) -> None:
    model = fitted_by_name("svdpp")
    users = torch.as_tensor(HISTORY_USERS)
    with torch.no_grad():
        free = model.module.user(users) @ model.module.item.weight.T
    expected = model.score_all(HISTORY_USERS) - free
    torch.testing.assert_close(model.score_histories(small_split.train[HISTORY_USERS]), expected, rtol=1e-4, atol=1e-5)


def test_fold_in_solves_implicit_als_user_step(fitted_by_name, small_split: Split) -> None:
    """``fold_in`` with ALS's confidence and ridge is ``implicit``'s own user solve (which ALS uses)."""
    from acfrec.models._factor import fold_in

    model = fitted_by_name("als")
    histories = small_split.train[HISTORY_USERS]
    ours = fold_in(torch.from_numpy(model.item_factors()), histories, confidence=model.config.alpha,
                   regularization=model.config.regularization, relative=False)
    np.testing.assert_allclose(ours.numpy(), model._history_user_factors(histories), rtol=1e-3, atol=1e-5)
    scores = model.score_histories(histories)
    np.testing.assert_allclose(scores.numpy(), ours.numpy() @ model.item_factors().T, rtol=1e-3, atol=1e-4)


def test_bpr_fold_in_is_the_weighted_least_squares_optimum(fitted_by_name, small_split: Split) -> None:
    """The gradient of the fold-in objective vanishes at BPR-MF's new-user vectors."""
    from acfrec.models._factor import FOLD_IN_CONFIDENCE, FOLD_IN_REGULARIZATION

    model = fitted_by_name("bpr-mf")
    histories = small_split.train[HISTORY_USERS]
    factors = model.module.item.weight.detach().double()
    x = model._history_user_vectors(histories).double()
    preference = torch.as_tensor(histories.toarray(), dtype=torch.float64)
    confidence = 1 + (FOLD_IN_CONFIDENCE - 1) * preference
    ridge = FOLD_IN_REGULARIZATION * (factors.T @ factors).trace() / factors.shape[1]
    gradient = ((confidence * (x @ factors.T - preference)) @ factors) + ridge * x
    assert gradient.abs().max() < 1e-3 * (1 + (confidence * preference) @ factors).abs().max()


@pytest.fixture(scope="module")
def fitted_by_name(small_split: Split):
    """``fitted_by_name(name)``: model ``name`` with the fast options, fitted once per module."""
    cache: dict[str, Recommender] = {}

    def get(name: str) -> Recommender:
        if name not in cache:
            cache[name] = make(name).fit(small_split)
        return cache[name]

    return get
