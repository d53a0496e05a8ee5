"""The torch baselines (BPR-MF, FISM, SVD++) and ItemPop on a planted data set."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from acfrec.data import IdMap, Split
from acfrec.models import TrainData, get_model

N_USERS, N_ITEMS, N_CLUSTERS = 300, 200, 8
TORCH_MODELS = ("bpr-mf", "fism", "svdpp")
FAST = {"epochs": 10, "dim": 32, "batch_size": 256, "lr": 0.01, "progress": False, "patience": 0, "eval_every": 5}



def planted_split(seed: int = 0) -> Split:
    """Users like 1-2 of 8 item clusters (85% of their draws) plus popularity noise (15%).

    Each history is a draw without replacement (Gumbel top-k) in draw order; the last item is
    the test item, the one before it the validation item.
    """
    rng = np.random.default_rng(seed)
    cluster = rng.permutation(np.arange(N_ITEMS) % N_CLUSTERS)
    popularity = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    liked = np.argsort(rng.random((N_USERS, N_CLUSTERS)), axis=1)
    n_liked = rng.integers(1, 3, size=N_USERS)
    likes = (np.argsort(liked, axis=1) < n_liked[:, None])[:, cluster]  # (n_users, n_items)
    p = 0.85 * likes / likes.sum(1, keepdims=True) + 0.15 * popularity
    order = np.argsort(-(np.log(p) + rng.gumbel(size=p.shape)), axis=1)
    lengths = rng.integers(15, 30, size=N_USERS)
    taken = np.arange(N_ITEMS) < lengths[:, None]  # (n_users, n_items) over draw positions
    users = np.broadcast_to(np.arange(N_USERS)[:, None], order.shape)[taken]
    items = order[taken]
    position = np.broadcast_to(np.arange(N_ITEMS), order.shape)[taken]
    test_mask = position == lengths[users] - 1
    valid_mask = position == lengths[users] - 2
    train_mask = ~(test_mask | valid_mask)
    train = sp.csr_matrix(
        (np.ones(train_mask.sum(), dtype=np.float32), (users[train_mask], items[train_mask])),
        shape=(N_USERS, N_ITEMS),
    )
    held_out = np.full(N_USERS, -1, dtype=np.int64)
    valid_items, test_items = held_out.copy(), held_out.copy()
    valid_items[users[valid_mask]] = items[valid_mask]
    test_items[users[test_mask]] = items[test_mask]
    frame = pl.DataFrame(
        {"user": users[train_mask], "item": items[train_mask], "timestamp": position[train_mask].astype(float)}
    )
    return Split(
        train=train,
        train_frame=frame,
        valid_items=valid_items,
        test_items=test_items,
        negatives=np.full((N_USERS, 1), -1, dtype=np.int64),
        users=IdMap(range(N_USERS), "user"),
        items=IdMap(range(N_ITEMS), "item"),
    )


def full_hit_rate(model, split: Split, k: int = 10) -> float:
    """Full-ranking HR@k on test, train and valid items excluded, ties counted against the model."""
    users = split.eval_users("test")
    scores = model.score_all(users).numpy().astype(np.float64)
    seen = split.seen("test")[users].toarray() > 0
    target = scores[np.arange(users.size), split.test_items[users]]
    scores[seen] = -np.inf
    rank = (scores >= target[:, None]).sum(1) - 1  # minus the target itself
    return float((rank < k).mean())




@pytest.fixture(scope="module")
def split() -> Split:
    return planted_split()


@pytest.fixture(scope="module")
def fitted(split: Split) -> dict:
    models = {"itempop": get_model("itempop")().fit(split)}
    for name in TORCH_MODELS:
        models[name] = get_model(name)(seed=0, **FAST).fit(split)
    return models


def test_planted_split_is_leave_one_out(split: Split) -> None:
    users = split.eval_users("test")
    assert users.size == N_USERS
    train = split.train.toarray() > 0
    assert not train[users, split.test_items[users]].any()
    assert not train[users, split.valid_items[users]].any()
    assert (split.valid_items != split.test_items).all()


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_torch_models_beat_itempop(fitted: dict, split: Split, name: str) -> None:
    pop = full_hit_rate(fitted["itempop"], split)
    hr = full_hit_rate(fitted[name], split)
    assert pop < 0.2  # the planted clusters, not popularity, explain most test items
    print(f"{name}: HR@10 {hr:.3f}, ItemPop {pop:.3f}")
    assert hr > pop + 0.15, f"{name}: HR@10 {hr:.3f} vs ItemPop {pop:.3f}"


def test_itempop_scores_training_popularity(fitted: dict, split: Split) -> None:
    counts = np.asarray(split.train.sum(0)).ravel()
    scores = fitted["itempop"].score_all(np.array([0, 5])).numpy()
    np.testing.assert_array_equal(scores, np.stack([counts, counts]))
    np.testing.assert_array_equal(fitted["itempop"].score([3], [7, 1]), counts[[[7, 1]]])


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_same_seed_same_scores_other_seed_differs(split: Split, name: str) -> None:
    quick = {**FAST, "epochs": 2}
    users = np.arange(20)
    first = get_model(name)(seed=3, **quick).fit(split).score_all(users)
    second = get_model(name)(seed=3, **quick).fit(split).score_all(users)
    other = get_model(name)(seed=4, **quick).fit(split.train).score_all(users)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_score_pairs_match_score_all(fitted: dict, name: str) -> None:
    model = fitted[name]
    users = np.array([0, 7, 42])
    items = np.array([[1, 2, 3], [199, 0, 5], [8, 8, 9]])
    expected = model.score_all(users).numpy()[np.arange(3)[:, None], items]
    np.testing.assert_allclose(model.score(users, items), expected, rtol=1e-5, atol=1e-5)


def _brute_force(model, train: sp.csr_matrix, user: int, target: int, exclude: bool) -> float:
    """FISM's / SVD++'s score from its definition, one user and item at a time."""
    module = model.module
    history = [item for item in train[user].indices if not (exclude and item == target)]
    vector = module.user.weight[user].clone() if hasattr(module, "user") else torch.zeros(module.item.weight.shape[1])
    if history:
        vector += module.history_item.weight[history].sum(0) * len(history) ** -model.config.alpha
    return float(module.item_bias.weight[target, 0] + vector @ module.item.weight[target])


@pytest.mark.parametrize(("name", "alpha"), [("fism", 0.5), ("fism", 1.0), ("svdpp", 0.5)])
def test_training_score_excludes_the_positive(name: str, alpha: float) -> None:
    # user 2 has a single item: without it the neighbourhood is empty (FISM: score = bias)
    train = sp.csr_matrix(
        np.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]], dtype=np.float32)
    )
    model = get_model(name)(alpha=alpha, dim=4, seed=1, init_std=1.0)
    model.seen = train
    model.module = model._build(TrainData(train))
    torch.nn.init.normal_(model.module.item_bias.weight)
    users = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    positives = torch.tensor([0, 3, 2, 4, 4, 5, 0])
    negatives = torch.tensor([[2], [4], [0], [5], [1], [2], [1]])
    for_positive, for_negatives, _ = model._training_user_vectors(users, positives)
    module = model.module
    s_pos = (for_positive * module.item(positives)).sum(-1) + module.bias(positives)
    s_neg = (for_negatives * module.item(negatives[:, 0])).sum(-1) + module.bias(negatives[:, 0])
    triples = zip(users.tolist(), positives.tolist(), negatives[:, 0].tolist(), strict=True)
    with torch.no_grad():
        for k, (user, pos, neg) in enumerate(triples):
            assert s_pos[k].item() == pytest.approx(_brute_force(model, train, user, pos, True), abs=1e-5)
            assert s_neg[k].item() == pytest.approx(_brute_force(model, train, user, neg, True), abs=1e-5)
            full = model.score_all(np.array([user]))[0, pos].item()
            assert full == pytest.approx(_brute_force(model, train, user, pos, False), abs=1e-5)
            assert full != pytest.approx(s_pos[k].item(), abs=1e-4)  # the exclusion changed the score
    if name == "fism":
        assert s_pos[4].item() == pytest.approx(module.item_bias.weight[4, 0].item())


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_log_loss_trains(split: Split, name: str) -> None:
    model = get_model(name)(seed=0, loss="log", **{**FAST, "epochs": 3}).fit(split.train)
    assert model.history[-1]["loss"] < model.history[0]["loss"]


def test_unknown_loss_is_rejected(split: Split) -> None:
    with pytest.raises(ValueError, match="loss must be one of"):
        get_model("fism")(loss="hinge", progress=False).fit(split)


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_similar_items_use_item_factors(fitted: dict, split: Split, name: str) -> None:
    model = fitted[name]
    assert model.item_factors().shape == (N_ITEMS, FAST["dim"])
    items, scores = model.similar_items([0, 1], k=5)
    assert items.shape == (2, 5) and not (items == np.array([[0], [1]])).any()
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("name", ["itempop", *TORCH_MODELS])
def test_save_load_round_trip(fitted: dict, tmp_path, name: str) -> None:
    model = fitted[name]
    loaded = type(model).load(model.save(tmp_path / name))
    users = np.arange(10)
    assert torch.equal(model.score_all(users), loaded.score_all(users))
