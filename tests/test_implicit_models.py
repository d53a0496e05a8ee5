"""The ``implicit`` wrappers agree with ``implicit`` itself and keep the scores it would give."""

from __future__ import annotations

import warnings

import implicit.gpu
import numpy as np
import pytest
import torch
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking

from acfrec.data.split import Split
from acfrec.datasets import PlantedData
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.models import Recommender, get_model

ALS_OPTIONS = dict(factors=16, regularization=0.05, alpha=5.0, iterations=6, seed=3)
BPR_OPTIONS = dict(factors=16, learning_rate=0.05, regularization=0.01, iterations=30, seed=3)


def reference(name: str, split: Split) -> AlternatingLeastSquares | BayesianPersonalizedRanking:
    """``implicit``'s own model, fitted with the same options on the same matrix."""
    if name == "als":
        options = dict(ALS_OPTIONS)
        estimator = AlternatingLeastSquares(random_state=options.pop("seed"), num_threads=1, **options)
    else:
        options = dict(BPR_OPTIONS)
        estimator = BayesianPersonalizedRanking(random_state=options.pop("seed"), num_threads=1, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # implicit's BLAS-threads advice
        estimator.fit(split.train, show_progress=False)
    return estimator


@pytest.mark.parametrize(("name", "options"), [("als", ALS_OPTIONS), ("implicit-bpr", BPR_OPTIONS)])
def test_same_factors_and_top10_as_implicit(name: str, options: dict, small_split: Split) -> None:
    model = get_model(name)(**options).fit(small_split)
    estimator = reference(name, small_split)
    np.testing.assert_array_equal(model.user_factors(), estimator.user_factors)
    np.testing.assert_array_equal(model.item_factors(), estimator.item_factors)

    users = np.arange(small_split.n_users)
    ours, our_scores = model.recommend(users, k=10)
    theirs, their_scores = estimator.recommend(
        users, small_split.train[users], N=10, filter_already_liked_items=True
    )
    np.testing.assert_allclose(our_scores, their_scores, rtol=1e-5, atol=1e-6)
    # Identical lists, except where two scores tie to float precision and the order may swap.
    same = (ours == theirs).all(axis=1)
    assert same.mean() > 0.99
    assert all(set(a) == set(b) for a, b in zip(ours[~same], theirs[~same], strict=True))


def test_single_user_recommend_matches_implicit(small_split: Split) -> None:
    model = get_model("als")(**ALS_OPTIONS).fit(small_split)
    estimator = reference("als", small_split)
    for user in (0, 57, 199):
        ids, _ = estimator.recommend(user, small_split.train[user], N=10, filter_already_liked_items=True)
        assert model.recommend([user], k=10)[0][0].tolist() == ids.tolist()


def test_bpr_keeps_its_item_bias_column(small_split: Split) -> None:
    model = get_model("implicit-bpr")(**BPR_OPTIONS).fit(small_split)
    users, items = model.user_factors(), model.item_factors()
    assert items.shape == (small_split.n_items, BPR_OPTIONS["factors"] + 1)
    assert np.all(users[:, -1] == 1.0)
    assert np.abs(items[:, -1]).max() > 0  # the bias was learned, so dropping it would change scores
    expected = users[:5] @ items.T
    np.testing.assert_allclose(model.score_all(np.arange(5)).numpy(), expected, rtol=1e-6)
    without_bias = users[:5, :-1] @ items[:, :-1].T
    assert not np.allclose(model.score_all(np.arange(5)).numpy(), without_bias)


def test_als_is_repeatable_across_thread_counts(small_split: Split) -> None:
    one = get_model("als")(**ALS_OPTIONS, num_threads=1).fit(small_split)
    two = get_model("als")(**ALS_OPTIONS, num_threads=2).fit(small_split)
    np.testing.assert_array_equal(one.score_all(np.arange(20)).numpy(), two.score_all(np.arange(20)).numpy())
    assert one.deterministic and two.deterministic


def test_bpr_declares_determinism_by_thread_count() -> None:
    assert get_model("implicit-bpr")(num_threads=1).deterministic
    assert not get_model("implicit-bpr")(num_threads=2).deterministic


def test_config_reaches_implicit(small_split: Split) -> None:
    base = get_model("als")(**ALS_OPTIONS).fit(small_split).score_all(np.arange(10))
    for change in ({"alpha": 20.0}, {"regularization": 1.0}, {"seed": 4}, {"iterations": 2}):
        other = get_model("als")(**(ALS_OPTIONS | change)).fit(small_split).score_all(np.arange(10))
        assert not torch.allclose(base, other), change
    assert get_model("als")(**(ALS_OPTIONS | {"factors": 8})).fit(small_split).item_factors().shape[1] == 8


def test_learns_the_planted_classes(small_split: Split, small_planted: PlantedData) -> None:
    users = small_split.eval_users()
    user_index = small_split.users.external_ids[users].astype(str)
    truth_users = np.char.lstrip(user_index, "u").astype(np.int64)
    truth_items = np.char.lstrip(small_split.items.external_ids.astype(str), "i").astype(np.int64)
    for name, options in (("als", ALS_OPTIONS), ("implicit-bpr", BPR_OPTIONS)):
        model = get_model(name)(**options).fit(small_split)
        items, _ = model.recommend(users, k=10)
        liked = small_planted.truth.likes(truth_users, truth_items[items]).mean()
        # Two liked classes of ten: a model blind to the plant gets about 0.2.
        assert liked > 0.5, (name, liked)


def test_epoch_callbacks_and_history(small_split: Split) -> None:
    for name, options, key in (("als", ALS_OPTIONS, "seconds"), ("implicit-bpr", BPR_OPTIONS, "correct")):
        seen: list[int] = []
        model = get_model(name)(**options)
        model.callbacks.append(
            lambda epoch, metrics, seen=seen, key=key: seen.append(epoch) if key in metrics else None
        )
        model.fit(small_split)
        assert seen == list(range(1, options["iterations"] + 1))  # numbered from 1, like the trainer
        assert [row["epoch"] for row in model.history] == seen


def test_fit_takes_a_bare_matrix_like_a_split(small_split: Split) -> None:
    from_split = get_model("als")(**ALS_OPTIONS).fit(small_split)
    from_matrix = get_model("als")(**ALS_OPTIONS).fit(small_split.train)
    np.testing.assert_array_equal(from_split.item_factors(), from_matrix.item_factors())


@pytest.mark.skipif(implicit.gpu.HAS_CUDA, reason="implicit is built with CUDA here")
def test_use_gpu_without_cuda_is_a_clear_error(small_split: Split) -> None:
    with pytest.raises(DataValidationError, match="CUDA"):
        get_model("als")(use_gpu=True).fit(small_split)


def test_load_rejects_factors_of_the_wrong_shape(small_split: Split, tmp_path) -> None:
    model = get_model("als")(**ALS_OPTIONS).fit(small_split)
    model.save(tmp_path / "als")
    state = torch.load(tmp_path / "als" / "state.pt")
    state["item_factors"] = state["item_factors"][:-1]
    torch.save(state, tmp_path / "als" / "state.pt")
    with pytest.raises(ArtifactError, match="item_factors"):
        Recommender.load(tmp_path / "als")
