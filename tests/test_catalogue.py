"""Planted multimedia catalogue: determinism, ground truth, real images (digits and MNIST)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from acfrec.datasets.catalogue import (
    PRESETS,
    load_digits_images,
    load_mnist_idx,
    planted_catalogue,
    planted_preset,
)
from acfrec.errors import DataValidationError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_IMAGES = SHARED / "mnist" / "t10k-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def catalogue():
    return planted_catalogue(n_users=300, n_items=150, seed=3)


def _dense(catalogue) -> tuple[np.ndarray, np.ndarray]:
    frame = catalogue.interactions
    return (
        frame["user"].str.slice(1).cast(pl.Int64).to_numpy(),
        frame["item"].str.slice(1).cast(pl.Int64).to_numpy(),
    )


def test_same_seed_same_catalogue_other_seed_differs(catalogue):
    again = planted_catalogue(n_users=300, n_items=150, seed=3)
    other = planted_catalogue(n_users=300, n_items=150, seed=4)
    assert again.interactions.equals(catalogue.interactions)
    np.testing.assert_array_equal(again.frames, catalogue.frames)
    np.testing.assert_array_equal(again.item_offsets, catalogue.item_offsets)
    assert not other.interactions.equals(catalogue.interactions)


def test_frames_are_real_digit_images_of_their_recorded_class(catalogue):
    images, labels = load_digits_images()
    truth = catalogue.truth
    assert catalogue.frames.shape == (catalogue.item_offsets[-1], 8, 8) and catalogue.frames.dtype == np.uint8
    np.testing.assert_array_equal(catalogue.frames, images[truth.frame_image])
    np.testing.assert_array_equal(labels[truth.frame_image], truth.frame_class)
    per_item = np.diff(catalogue.item_offsets)
    assert per_item.min() >= 3 and per_item.max() <= 6
    # Every item shows 2..4 distinct classes (never more than its frames), mixed across frames.
    frame_item = np.repeat(np.arange(catalogue.n_items), per_item)
    shown = np.zeros((catalogue.n_items, 10), dtype=bool)
    shown[frame_item, truth.frame_class] = True
    n_shown = shown.sum(axis=1)
    assert n_shown.min() >= 2 and (n_shown <= np.minimum(4, per_item)).all() and (n_shown == 4).any()
    assert shown[np.arange(catalogue.n_items), truth.item_class].all()
    assert len(np.unique(truth.frame_class)) == 10


def test_interactions_follow_liked_classes_with_popularity_and_time(catalogue):
    truth = catalogue.truth
    users, items = _dense(catalogue)
    frame = catalogue.interactions
    assert frame.columns == ["user", "item", "timestamp"]
    assert frame.select(pl.struct("user", "item").is_unique().all()).item()
    counts = np.bincount(users, minlength=300)
    assert counts.min() >= 10 and counts.max() <= 30
    assert truth.user_classes.sum(axis=1).tolist() == [1] * 300
    # Preference choices show far more liked frames than the catalogue on average, yet liked
    # frames stay a minority of a consumed item's frames (room for component attention).
    chosen = truth.affinity[users, items]
    assert chosen[~truth.noise].mean() > 3 * truth.affinity.mean()
    assert chosen.mean() < 0.4
    # Popularity clicks ignore content (and miss the already chosen, liked items): no lift.
    assert chosen[truth.noise].mean() < 1.2 * truth.affinity.mean()
    assert 0.25 < truth.noise.mean() < 0.35
    clicked = np.bincount(items[truth.noise], minlength=150)
    assert np.corrcoef(clicked, np.bincount(items, minlength=150))[0, 1] > 0.5
    popularity = np.sort(np.bincount(items, minlength=150))[::-1]
    assert popularity[:5].mean() > 3 * np.median(popularity)
    order = np.lexsort((frame["timestamp"].to_numpy(), users))
    np.testing.assert_array_equal(order, np.arange(users.size))  # sorted by user then time
    same_user = users[1:] == users[:-1]
    assert (np.diff(frame["timestamp"].to_numpy())[same_user] > 0).all()


def test_liked_frames_uses_user_classes(catalogue):
    truth = catalogue.truth
    frames = np.array([[0, 1, -1], [2, 3, 4]])
    liked = truth.liked_frames(np.array([5, 7]), frames)
    assert liked.shape == (2, 3) and not liked[0, 2]
    for row, user in enumerate([5, 7]):
        for col in range(3):
            if frames[row, col] >= 0:
                assert liked[row, col] == truth.user_classes[user, truth.frame_class[frames[row, col]]]


def test_store_from_catalogue(tmp_path, catalogue):
    store = catalogue.write_store(tmp_path / "store", dim=16)
    assert store.n_items == 150 and store.dim == 16 and store.meta["encoder"] == "pca_pixels"
    np.testing.assert_array_equal(store.offsets, catalogue.item_offsets)


def test_bad_arguments_are_named():
    with pytest.raises(DataValidationError, match="frames_per_item"):
        planted_catalogue(n_users=10, n_items=20, frames_per_item=(4, 2))
    with pytest.raises(DataValidationError, match="n_classes=12 needs labels 0..11"):
        planted_catalogue(n_users=10, n_items=20, n_classes=12)
    with pytest.raises(DataValidationError, match="classes_per_item"):
        planted_catalogue(n_users=10, n_items=20, classes_per_item=(3, 11))
    with pytest.raises(DataValidationError, match="images must be"):
        planted_catalogue(n_users=10, n_items=20, images=(np.zeros((5, 4)), np.zeros(5)))


def test_load_mnist_idx_rejects_other_files(tmp_path):
    fake = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(fake, "wb") as handle:
        handle.write((1234).to_bytes(4, "big") + bytes(20))
    with pytest.raises(DataValidationError, match="not an IDX file with magic 2051 \\(found 1234\\)"):
        load_mnist_idx(fake)
    with pytest.raises(DataValidationError, match="does not exist"):
        load_mnist_idx(tmp_path / "missing-images-idx3-ubyte.gz")


@pytest.mark.shared_data
@pytest.mark.skipif(not MNIST_IMAGES.is_file(), reason=f"MNIST not found at {MNIST_IMAGES} (../shared/data)")
def test_catalogue_from_mnist():
    images, labels = load_mnist_idx(MNIST_IMAGES)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels).tolist()) == set(range(10))
    catalogue = planted_catalogue(n_users=50, n_items=40, seed=0, images=(images, labels))
    assert catalogue.frames.shape[1:] == (28, 28)
    np.testing.assert_array_equal(labels[catalogue.truth.frame_image], catalogue.truth.frame_class)


def test_uniform_clicks_ignore_popularity():
    uniform = planted_catalogue(n_users=300, n_items=150, seed=3, noise=0.5, click_popularity=0.0)
    users, items = _dense(uniform)
    clicked = np.bincount(items[uniform.truth.noise], minlength=150)
    chosen = np.bincount(items[~uniform.truth.noise], minlength=150)
    # Clicks spread over the whole catalogue (no head), while preference choices keep their skew.
    assert clicked.max() < 3 * clicked.mean() and (clicked > 0).mean() > 0.9
    assert chosen.max() > 4 * chosen.mean()
    with pytest.raises(DataValidationError, match="click_popularity must be >= 0, got -1"):
        planted_catalogue(n_users=10, n_items=40, click_popularity=-1)


def test_preference_by_shown_takes_items_with_a_minority_of_liked_frames(catalogue):
    shown = planted_catalogue(n_users=300, n_items=150, seed=3, preference_by="shown")
    users, items = _dense(shown)
    chosen = shown.truth.affinity[users, items][~shown.truth.noise]
    by_share = catalogue.truth.affinity[_dense(catalogue)][~catalogue.truth.noise]
    # Nearly every preference choice shows a liked class, but its liked share is lower than when
    # the share itself drives the choice.
    assert (chosen > 0).mean() > 0.95 > (by_share > 0).mean() and chosen.mean() < by_share.mean() - 0.04
    with pytest.raises(DataValidationError, match="preference_by must be 'share' or 'shown', got 'all'"):
        planted_catalogue(n_users=10, n_items=40, preference_by="all")


def test_presets_are_catalogue_arguments_with_overrides():
    small = planted_preset("sparse", n_users=40, n_items=120, seed=2)
    same = planted_catalogue(**{**PRESETS["sparse"], "n_users": 40, "n_items": 120, "seed": 2})
    assert small.interactions.equals(same.interactions) and small.n_items == 120
    with pytest.raises(DataValidationError, match="unknown planted catalogue preset 'dense'; known: \\['drifting', 'legible', 'shifting', 'short', 'sparse', 'stray'\\]"):
        planted_preset("dense")


def test_short_preset_needs_a_sharp_taste_inference():
    """On the "short" preset, ranking by the class most shown in a user's training history (true
    frame labels) clearly beats summing the class votes of the history, the additive pooling of
    FISM: what the preset is for. Numpy rankings of the held-out items, no model."""
    from acfrec.data.interactions import Interactions
    from acfrec.data.splitting import leave_one_out

    catalogue = planted_preset("short", seed=0)
    split = leave_one_out(Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp"), seed=0)
    items = np.array([int(item[1:]) for item in split.items.external_ids])
    shows = np.zeros((catalogue.n_items, 10))
    np.add.at(shows, (np.repeat(np.arange(catalogue.n_items), np.diff(catalogue.item_offsets)), catalogue.truth.frame_class), 1)
    shows = (shows[items] > 0).astype(float)
    train = split.train.toarray()
    popularity = np.log1p(train.sum(axis=0))
    votes = train @ shows  # (users, classes): history items showing each class
    test, users = split.test_items, np.arange(split.n_users)

    def hit_rate(scores: np.ndarray) -> float:
        scores = np.where(train > 0, -np.inf, scores)
        rank = (scores > scores[users, test][:, None]).sum(axis=1)
        return float((rank < 10).mean())

    inferred = hit_rate(8.0 * shows[:, votes.argmax(axis=1)].T + popularity)
    additive = hit_rate(votes @ shows.T + popularity)
    assert inferred > additive + 0.05 and inferred > hit_rate(np.tile(popularity, (split.n_users, 1))) + 0.03, (
        inferred, additive,
    )


def test_typical_frames_draw_each_class_from_its_most_typical_images():
    images, labels = load_digits_images()
    catalogue = planted_catalogue(n_users=20, n_items=200, seed=1, typical_frames=3)
    used = catalogue.truth.frame_image
    for digit in range(10):
        drawn = np.unique(used[catalogue.truth.frame_class == digit])
        assert 1 <= drawn.size <= 3 and (labels[drawn] == digit).all()
        # the drawn images are the class's closest to its mean image
        members = np.flatnonzero(labels == digit)
        flat = images[members].reshape(members.size, -1).astype(float)
        distance = ((flat - flat.mean(axis=0)) ** 2).sum(axis=1)
        assert set(drawn) <= set(members[np.argsort(distance)[:3]])
    plain = planted_catalogue(n_users=20, n_items=200, seed=1)
    assert plain.interactions.equals(catalogue.interactions)  # only the frames' images differ
    assert np.unique(plain.truth.frame_image).size > 30
    with pytest.raises(DataValidationError, match="typical_frames must be None or an int >= 1, got 0"):
        planted_catalogue(n_users=5, n_items=40, typical_frames=0)


def _uniform_attention(catalogue, split, width: int = 6) -> tuple[np.ndarray, dict]:
    """Test users' training histories (dense ids, -1 padding) with uniform alpha and beta."""
    users = split.eval_users("test")
    train = split.train.tocsr()[users]
    lengths = np.diff(train.indptr)
    history = np.full((users.size, lengths.max()), -1, dtype=np.int64)
    rows = np.repeat(np.arange(users.size), lengths)
    history[rows, np.arange(train.nnz) - np.repeat(train.indptr[:-1], lengths)] = train.indices
    item = np.array([int(x[1:]) for x in split.items.external_ids])[np.maximum(history, 0)]
    count = np.minimum(np.diff(catalogue.item_offsets)[item], width)
    beta = (np.arange(width) < count[..., None]) / count[..., None] * (history >= 0)[..., None]
    alpha = (history >= 0) / lengths[:, None]
    return users, {"history": history, "alpha": alpha, "beta": beta}


def _truth_by_loop(catalogue, split, users, history, width):
    """Per entry: is it a content-blind click, and which of its first ``width`` frames are liked."""
    frame = catalogue.interactions
    clicks = set(zip(frame["user"].filter(pl.Series(catalogue.truth.noise)).to_list(),
                     frame["item"].filter(pl.Series(catalogue.truth.noise)).to_list(), strict=True))
    is_click = np.zeros(history.shape, dtype=bool)
    liked = np.zeros((*history.shape, width), dtype=bool)
    for row, user in enumerate(users):
        external_user = split.users.external_ids[user]
        liked_classes = catalogue.truth.user_classes[int(external_user[1:])]
        for col, dense_item in enumerate(history[row]):
            if dense_item < 0:
                continue
            external_item = split.items.external_ids[dense_item]
            is_click[row, col] = (external_user, external_item) in clicks
            start, end = catalogue.item_offsets[int(external_item[1:])], catalogue.item_offsets[int(external_item[1:]) + 1]
            frame_classes = catalogue.truth.frame_class[start:end][:width]
            liked[row, col, : frame_classes.size] = liked_classes[frame_classes]
    return is_click, liked


def test_attention_ratios_against_the_truth(catalogue):
    from acfrec.data.interactions import Interactions
    from acfrec.data.splitting import leave_one_out

    split = leave_one_out(Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp"), seed=0)
    users, uniform = _uniform_attention(catalogue, split)
    assert catalogue.liked_frame_ratio(split, users, uniform) == pytest.approx(1.0)
    assert catalogue.click_weight_ratio(split, users, uniform) == pytest.approx(1.0)
    is_click, liked = _truth_by_loop(catalogue, split, users, uniform["history"], width=6)
    assert is_click.any() and (liked.any(axis=-1) & ~is_click).any()
    # beta on the liked frames only: 1 / (mean liked share of the items that show a liked class)
    shown = liked.any(axis=-1)
    sharp = {**uniform, "beta": np.where(shown[..., None], liked / np.maximum(liked.sum(-1, keepdims=True), 1), uniform["beta"])}
    share = (liked.sum(-1) / np.maximum((uniform["beta"] > 0).sum(-1), 1))[shown]
    assert catalogue.liked_frame_ratio(split, users, sharp) == pytest.approx(1.0 / share.mean())
    # alpha halved on the clicks: per user (c clicks of n entries) the clicks' share is
    # 0.5 c / (0.5 c + n - c) instead of c / n
    halved = {**uniform, "alpha": uniform["alpha"] * np.where(is_click, 0.5, 1.0)}
    clicks, entries = is_click.sum(axis=1), (uniform["history"] >= 0).sum(axis=1)
    both = (clicks > 0) & (clicks < entries)
    expected = (0.5 * entries / (0.5 * clicks + entries - clicks))[both].mean()
    assert catalogue.click_weight_ratio(split, users, halved) == pytest.approx(expected)
    assert catalogue.click_weight_ratio(split, users, {**uniform, "alpha": uniform["alpha"] * 7.0}) == pytest.approx(1.0)
    ignored = {**uniform, "alpha": uniform["alpha"] * ~is_click}
    assert catalogue.click_weight_ratio(split, users, ignored) == 0.0


def test_attention_ratios_need_something_to_weigh():
    from acfrec.data.interactions import Interactions
    from acfrec.data.splitting import leave_one_out

    clean = planted_catalogue(n_users=60, n_items=150, noise=0.0, seed=1)
    split = leave_one_out(Interactions.from_frame(clean.interactions, timestamp_col="timestamp"), seed=0)
    users, uniform = _uniform_attention(clean, split)
    with pytest.raises(DataValidationError, match="both content-blind clicks and chosen items"):
        clean.click_weight_ratio(split, users, uniform)


def _digest(catalogue) -> str:
    """Hash of the interactions, the frames and the click flags."""
    digest = hashlib.sha256()
    frame = catalogue.interactions
    for column in ("user", "item"):
        digest.update("\n".join(frame[column].to_list()).encode())
    digest.update(frame["timestamp"].to_numpy().astype(np.int64).tobytes())
    digest.update(np.ascontiguousarray(catalogue.frames).tobytes())
    digest.update(catalogue.truth.noise.astype(np.uint8).tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"n_users": 60, "n_items": 80, "seed": 3}, "c3994c6bb612b148"),
        (
            {
                "n_users": 50, "n_items": 100, "seed": 1, "classes_per_user": 2, "noise": 0.4,
                "click_popularity": 0.0, "preference_by": "shown", "typical_frames": 5,
                "interactions_per_user": (4, 9),
            },
            "1c260f5fa0c02102",
        ),
    ],
)
def test_no_drift_gives_the_catalogue_generated_before_drift_existed(arguments, expected):
    """The digests were computed by the generator before ``past_interest`` was added."""
    catalogue = planted_catalogue(**arguments)
    assert _digest(catalogue) == expected
    assert _digest(planted_catalogue(**arguments, clicks_outside_taste=False)) == expected
    assert _digest(planted_catalogue(**arguments, past_interest=0.0)) == expected
    assert not catalogue.truth.past.any() and not catalogue.truth.past_classes.any()
    assert catalogue.truth.past.shape == catalogue.truth.noise.shape


def _drifting(**overrides):
    arguments = {
        "n_users": 400, "n_items": 120, "seed": 5, "interactions_per_user": (8, 16), "noise": 0.25,
        "preference_by": "shown", "preference_strength": 12.0, "past_interest": 0.4, **overrides,
    }
    return planted_catalogue(**arguments)


def test_past_choices_come_first_and_show_the_past_class():
    catalogue = _drifting()
    truth = catalogue.truth
    users, items = _dense(catalogue)
    # One past class per user, never a liked one.
    assert truth.past_classes.sum(axis=1).tolist() == [1] * 400
    assert not (truth.past_classes & truth.user_classes).any()
    assert catalogue.interactions.select(pl.struct("user", "item").is_unique().all()).item()
    assert not (truth.past & truth.noise).any()
    # Ignoring the clicks, every user's past choices precede the current ones.
    choice = ~truth.noise
    past, user = truth.past[choice], users[choice]
    later_current = (~past[:-1] & past[1:]) & (user[:-1] == user[1:])
    assert not later_current.any() and past.any() and (~past).any()
    # Clicks fall anywhere: some precede a past choice, some follow every choice.
    first_past = np.full(400, np.iinfo(np.int64).max)
    np.minimum.at(first_past, users[truth.past], np.flatnonzero(truth.past))
    assert (np.flatnonzero(truth.noise) < first_past[users[truth.noise]]).any()
    counts = np.bincount(users, minlength=400)
    assert truth.noise[np.cumsum(counts) - 1].any()
    # Past choices show the past class (and rarely a liked one); current choices a liked class.
    shows = np.zeros((catalogue.n_items, 10), dtype=bool)
    shows[np.repeat(np.arange(catalogue.n_items), np.diff(catalogue.item_offsets)), truth.frame_class] = True
    assert (shows[items] & truth.past_classes[users]).any(axis=1)[truth.past].mean() > 0.98
    current = choice & ~truth.past
    assert (shows[items] & truth.user_classes[users]).any(axis=1)[current].mean() > 0.98
    # The dense views agree with the per-interaction flags, and only the drifted pairs are past.
    assert (catalogue.past_choices()[users, items] == truth.past).all()
    assert (catalogue.clicks()[users, items] == truth.noise).all()
    assert catalogue.past_choices().sum() == truth.past.sum()
    # Timestamps still increase along each history.
    same_user = users[1:] == users[:-1]
    assert (np.diff(catalogue.interactions["timestamp"].to_numpy())[same_user] > 0).all()


def test_share_of_past_choices_follows_past_interest():
    for past_interest in (0.2, 0.6):
        truth = _drifting(n_users=1000, past_interest=past_interest, preference_strength=8.0).truth
        assert truth.past[~truth.noise].mean() == pytest.approx(past_interest, abs=0.02)
        assert truth.noise.mean() == pytest.approx(0.25, abs=0.02)


def test_drift_leaves_items_frames_and_users_as_they_were():
    plain, drifting = _drifting(past_interest=0.0), _drifting()
    np.testing.assert_array_equal(plain.frames, drifting.frames)
    np.testing.assert_array_equal(plain.truth.user_classes, drifting.truth.user_classes)
    np.testing.assert_array_equal(_dense(plain)[0], _dense(drifting)[0])  # same history lengths


def test_drifting_preset_holds_out_a_current_choice():
    catalogue = planted_preset("drifting", seed=0)
    truth = catalogue.truth
    users, _ = _dense(catalogue)
    counts = np.bincount(users)
    assert counts.min() >= 8 and counts.max() <= 16 and counts.size == 3000
    assert truth.past[~truth.noise].mean() == pytest.approx(0.4, abs=0.02)
    # The newest interaction (held out under leave-one-out by time) is never a past choice.
    assert not truth.past[np.cumsum(counts) - 1].any()


def test_bad_past_interest_is_named():
    for value in (-0.1, 1.0, float("nan")):
        with pytest.raises(DataValidationError, match="past_interest must be in \\[0, 1\\), got"):
            planted_catalogue(n_users=10, n_items=40, past_interest=value)


def test_taste_shift_orders_each_history_from_the_old_class_to_the_new():
    catalogue = planted_catalogue(
        n_users=200, n_items=120, seed=2, classes_per_user=2, interactions_per_user=(8, 16), noise=0.2,
        preference_by="shown", preference_strength=12.0, taste_shift=True,
    )
    truth = catalogue.truth
    users, items = _dense(catalogue)
    shows = np.zeros((catalogue.n_items, 10), dtype=bool)
    shows[np.repeat(np.arange(catalogue.n_items), np.diff(catalogue.item_offsets)), truth.frame_class] = True
    choice = ~truth.noise
    shifted = 0
    for user in range(200):
        rows = np.flatnonzero((users == user) & choice)  # oldest first
        first, second = np.flatnonzero(truth.user_classes[user])
        # the order of some assignment (old, new) of the two liked classes: only old, both, only new
        ages = [shows[items[rows], new].astype(int) + ~shows[items[rows], old] for old, new in ((first, second), (second, first))]
        assert any((np.diff(age) >= 0).all() for age in ages), user
        shifted += any(age[0] < age[-1] for age in ages)
    assert shifted > 150
    plain = planted_catalogue(n_users=200, n_items=120, seed=2, classes_per_user=2, interactions_per_user=(8, 16),
                              noise=0.2, preference_by="shown", preference_strength=12.0)
    assert plain.interactions.sort(["user", "item"]).equals(catalogue.interactions.sort(["user", "item"]).with_columns(
        plain.interactions.sort(["user", "item"])["timestamp"]))  # the same choices, only their order moved
    with pytest.raises(DataValidationError, match="taste_shift needs classes_per_user >= 2"):
        planted_catalogue(n_users=20, n_items=40, taste_shift=True)
    assert planted_preset("shifting", n_users=50).truth.user_classes.sum(axis=1).tolist() == [2] * 50


def test_clicks_outside_taste_avoid_the_liked_classes():
    arguments = {"n_users": 300, "n_items": 120, "interactions_per_user": (6, 12), "noise": 0.3, "seed": 3,
                 "preference_by": "shown", "click_popularity": 0.0}
    anywhere, outside = planted_catalogue(**arguments), planted_catalogue(**arguments, clicks_outside_taste=True)
    for catalogue in (anywhere, outside):
        users, items = _dense(catalogue)
        liked = catalogue.truth.affinity[users, items] > 0
        clicks = catalogue.truth.noise
        if catalogue is outside:
            assert clicks.any() and not liked[clicks].any()
        else:
            assert liked[clicks].mean() > 0.1  # uniform clicks often land in the taste
        assert liked[~clicks].mean() > 0.95  # choices show a liked class either way (nearly always)
    # The same users, items and click counts: only where the clicks land changes.
    assert np.array_equal(anywhere.truth.noise.sum(), outside.truth.noise.sum())
    assert anywhere.interactions.height == outside.interactions.height
