"""The planted-preference generator: shape, determinism, and that the plant is really there."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from acfrec.datasets import PlantedData, planted_interactions
from acfrec.errors import DataValidationError


def dense(data: PlantedData) -> tuple[np.ndarray, np.ndarray]:
    """``(n,)`` user and item indices of the frame's rows (external id ``u12`` is index 12)."""
    users = data.frame["user"].str.slice(1).cast(pl.Int64).to_numpy()
    items = data.frame["item"].str.slice(1).cast(pl.Int64).to_numpy()
    return users, items


@pytest.fixture(scope="module")
def default() -> PlantedData:
    return planted_interactions()


def test_frame_shape_and_types(default: PlantedData) -> None:
    frame = default.frame
    assert frame.schema == pl.Schema({"user": pl.String, "item": pl.String, "timestamp": pl.Int64})
    users, items = dense(default)
    counts = np.bincount(users, minlength=600)
    assert counts.size == 600 and counts.min() >= 10 and counts.max() <= 40
    assert frame.height == counts.sum()
    assert items.min() >= 0 and items.max() < 400
    assert not frame.select("user", "item").is_duplicated().any()
    assert np.all(np.diff(users) >= 0)  # grouped by user index


def test_timestamps_increase_within_each_user(default: PlantedData) -> None:
    users, _ = dense(default)
    times = default.frame["timestamp"].to_numpy()
    same_user = users[1:] == users[:-1]
    assert np.all(np.diff(times)[same_user] > 0)


def test_truth_shapes(default: PlantedData) -> None:
    truth = default.truth
    assert truth.item_class.shape == (400,) and truth.user_classes.shape == (600, 2)
    assert np.bincount(truth.item_class).tolist() == [40] * 10
    assert np.all(truth.user_classes[:, 0] != truth.user_classes[:, 1])
    assert truth.user_class_mask().sum(axis=1).tolist() == [2] * 600
    assert truth.item_popularity.max() == 1.0


def test_same_seed_same_data_other_seed_other_data() -> None:
    first, again, other = (planted_interactions(n_users=50, n_items=60, seed=s) for s in (3, 3, 4))
    assert first.frame.equals(again.frame)
    assert np.array_equal(first.truth.user_classes, again.truth.user_classes)
    assert np.array_equal(first.truth.item_class, again.truth.item_class)
    assert not first.frame.equals(other.frame)


def test_interactions_concentrate_on_liked_classes(default: PlantedData) -> None:
    users, items = dense(default)
    assert default.truth.likes(users, items).mean() > 0.7
    # The held-out (latest) item of each user follows the preference too, not only the bulk.
    last = np.r_[users[1:] != users[:-1], True]
    assert default.truth.likes(users[last], items[last]).mean() > 0.7


def test_pure_noise_has_no_class_preference() -> None:
    data = planted_interactions(noise=1.0, seed=1)
    users, items = dense(data)
    # Two liked classes out of ten: chance level is 0.2.
    assert abs(data.truth.likes(users, items).mean() - 0.2) < 0.05


def test_no_noise_means_only_liked_classes() -> None:
    data = planted_interactions(n_users=100, noise=0.0, seed=2)
    users, items = dense(data)
    assert data.truth.likes(users, items).all()


def test_popularity_skew_is_visible() -> None:
    def head_to_tail(skew: float) -> float:
        data = planted_interactions(popularity_skew=skew, seed=5)
        _, items = dense(data)
        counts = np.bincount(items, minlength=400)
        weight = data.truth.item_popularity
        return counts[weight == weight.max()].mean() / counts[weight <= np.quantile(weight, 0.5)].mean()

    assert head_to_tail(1.0) > 3.0
    assert head_to_tail(0.0) < 1.5


def test_likes_handles_padding_and_2d() -> None:
    data = planted_interactions(
        n_users=5, n_items=20, n_classes=4, classes_per_user=1, interactions_per_user=(2, 3)
    )
    truth = data.truth
    liked_item = int(np.flatnonzero(truth.item_class == truth.user_classes[0, 0])[0])
    other_item = int(np.flatnonzero(truth.item_class != truth.user_classes[0, 0])[0])
    got = truth.likes(np.array([0, 0]), np.array([[liked_item, -1], [other_item, liked_item]]))
    assert got.tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"n_users": 0}, "n_users"),
        ({"n_classes": 500}, "n_classes"),
        ({"classes_per_user": 11}, "classes_per_user"),
        ({"interactions_per_user": (5, 401)}, "interactions_per_user"),
        ({"interactions_per_user": (0, 3)}, "interactions_per_user"),
        ({"interactions_per_user": (3, 4, 5)}, "interactions_per_user"),
        ({"noise": 1.5}, "noise"),
        ({"popularity_skew": -1.0}, "popularity_skew"),
        ({"noise": 0.0, "interactions_per_user": (90, 100)}, "noise"),
    ],
)
def test_bad_parameters_are_named(options: dict, named: str) -> None:
    with pytest.raises(DataValidationError, match=named):
        planted_interactions(**options)
