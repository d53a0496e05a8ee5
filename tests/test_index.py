"""FAISS retrieval: exactness, exclusions, allow/deny lists, ANN recall, persistence, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from acfrec.data import IdMap, Split
from acfrec.errors import ArtifactError, DataValidationError, UnknownIdError
from acfrec.index import IndexConfig, ItemIndex, clustered_vectors, gpu_count, model_vectors
from acfrec.models import get_model

K = 100


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray]:
    """3,000 x 16 items and 40 queries: exact tests."""
    return clustered_vectors(3000, 40, 16, n_clusters=30, seed=1)


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray]:
    """10,000 x 32 clustered items and 200 queries: approximate-index tests."""
    return clustered_vectors(10_000, 200, 32, n_clusters=100, seed=0)


@pytest.fixture(scope="module")
def approximate(catalogue: tuple[np.ndarray, np.ndarray]) -> dict[str, ItemIndex]:
    """IVF and HNSW indexes of ``catalogue`` with the default options (built once)."""
    items, _ = catalogue
    return {kind: ItemIndex.build(items, kind=kind) for kind in ("ivf", "hnsw")}


def brute_force(queries: np.ndarray, items: np.ndarray, k: int, banned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Numpy top-k by inner product; ``banned`` ``(n_queries, n_items)`` bool marks items left out."""
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)
    if banned is not None:
        scores[banned] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, 1)


def assert_same_topk(got: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]) -> None:
    """Same scores; same items except where neighbouring true scores are within float32 noise."""
    got_items, got_scores = got
    true_items, true_scores = expected
    noise = 1e-5 * max(1.0, float(np.abs(true_scores[np.isfinite(true_scores)]).max()))
    np.testing.assert_allclose(got_scores, true_scores, rtol=0, atol=noise)
    gaps = np.abs(np.diff(true_scores, axis=1))
    tie = np.zeros_like(true_items, dtype=bool)
    tie[:, 1:] |= gaps < noise
    tie[:, :-1] |= gaps < noise
    assert tie.mean() < 0.05  # the comparison below must mean something
    np.testing.assert_array_equal(got_items[~tie], true_items[~tie])


def recall(got: np.ndarray, true: np.ndarray) -> float:
    hits = (got[:, :, None] == true[:, None, :]).any(axis=2) & (got >= 0)
    return float(hits.sum() / true.size)


# ------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_flat_equals_numpy_brute_force(small: tuple[np.ndarray, np.ndarray], metric: str) -> None:
    items, queries = small
    index = ItemIndex.build(items, metric=metric)
    if metric == "cosine":
        items = items / np.linalg.norm(items, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    got = index.search(queries, 50)
    assert got[0].dtype == np.int64 and got[1].dtype == np.float32 and got[0].shape == (40, 50)
    assert_same_topk(got, brute_force(queries, items, 50))


def users_who_saw_their_top(queries: np.ndarray, items: np.ndarray, seen_of_top: int) -> list[np.ndarray]:
    """Per query: ``seen_of_top`` of its true top-K (every other one first, then the rest) + 5 random items."""
    true, _ = brute_force(queries, items, K)
    rng = np.random.default_rng(0)
    picked = np.concatenate([true[:, ::2], true[:, 1::2]], axis=1)[:, :seen_of_top]
    extra = rng.integers(0, len(items), (len(queries), 5))
    return [np.unique(row) for row in np.concatenate([picked, extra], axis=1)]


@pytest.mark.parametrize("form", ["csr", "list"])
def test_exclusion_drops_seen_items_and_still_returns_k(small: tuple[np.ndarray, np.ndarray], form: str) -> None:
    items, queries = small
    seen = users_who_saw_their_top(queries, items, seen_of_top=90)
    seen[3] = np.zeros(0, dtype=np.int64)  # one user without history in the same chunk
    banned = np.zeros((len(queries), len(items)), dtype=bool)
    for row, cols in enumerate(seen):
        banned[row, cols] = True
    exclude = sp.csr_matrix(banned.astype(np.float32)) if form == "csr" else seen
    # chunks of 7 queries, searched in order of exclusion count, must land back on their rows
    got = ItemIndex.build(items, params=IndexConfig(query_chunk=7)).search(queries, K, exclude=exclude)
    assert not banned[np.arange(len(queries))[:, None], got[0]].any()
    assert (got[0] >= 0).all() and np.isfinite(got[1]).all()
    assert_same_topk(got, brute_force(queries, items, K, banned))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_exclusion_keeps_k_results(
    catalogue: tuple[np.ndarray, np.ndarray], approximate: dict[str, ItemIndex], kind: str
) -> None:
    items, queries = catalogue
    seen = users_who_saw_their_top(queries, items, seen_of_top=90)
    got, scores = approximate[kind].search(queries, K, exclude=seen)
    assert (got >= 0).all() and np.isfinite(scores).all()
    assert not any(np.isin(row, banned).any() for row, banned in zip(got, seen, strict=True))
    assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_exclusion_pads_when_too_few_items_remain(small: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = small
    index = ItemIndex.build(items[:12])
    everything_but_two = [np.arange(10), np.arange(12)]
    got, scores = index.search(queries[:2], 5, exclude=everything_but_two)
    assert set(got[0, :2]) == {10, 11} and (got[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()
    assert (got[1] == -1).all() and np.isneginf(scores[1]).all()


@pytest.mark.parametrize("exact_allow_max", [4096, 0], ids=["exact-subset", "id-selector"])
def test_allow_and_deny_lists(small: tuple[np.ndarray, np.ndarray], exact_allow_max: int) -> None:
    items, queries = small
    index = ItemIndex.build(items, params=IndexConfig(exact_allow_max=exact_allow_max))
    allow = np.arange(0, 3000, 3)
    deny = np.arange(0, 3000, 2)
    seen = users_who_saw_their_top(queries, items, seen_of_top=20)
    for kwargs, allowed in (
        ({"allow": allow}, np.isin(np.arange(3000), allow)),
        ({"deny": deny}, ~np.isin(np.arange(3000), deny)),
        ({"allow": allow, "deny": deny}, np.isin(np.arange(3000), np.setdiff1d(allow, deny))),
    ):
        banned = np.repeat(~allowed[None, :], len(queries), axis=0)
        assert_same_topk(index.search(queries, 30, **kwargs), brute_force(queries, items, 30, banned))
        for row, cols in enumerate(seen):
            banned[row, cols] = True
        assert_same_topk(index.search(queries, 30, exclude=seen, **kwargs), brute_force(queries, items, 30, banned))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_allow_and_deny(catalogue: tuple[np.ndarray, np.ndarray], approximate: dict[str, ItemIndex], kind: str) -> None:
    items, queries = catalogue
    index = approximate[kind]
    small_allow = np.arange(50, 250)  # exact subset scoring: the true top 10 among them
    got, _ = index.search(queries, 10, allow=small_allow)
    true, _ = brute_force(queries, items[small_allow], 10)
    np.testing.assert_array_equal(got, small_allow[true])
    deny = brute_force(queries, items, 1)[0][:, 0]
    got, _ = index.search(queries, 10, deny=deny)
    assert not np.isin(got, deny).any() and (got >= 0).all()


def test_allow_list_shorter_than_k_pads(small: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = small
    got, scores = ItemIndex.build(items).search(queries, 5, allow=[7, 8, 9], exclude=[[8]] * len(queries))
    assert (np.sort(got[:, :2], axis=1) == [7, 9]).all() and (got[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all()


# ------------------------------------------------------------------------ approximate
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_default_recall_at_100(catalogue: tuple[np.ndarray, np.ndarray], approximate: dict[str, ItemIndex], kind: str) -> None:
    items, queries = catalogue
    true, _ = brute_force(queries, items, K)
    got, scores = approximate[kind].search(queries, K)
    assert recall(got, true) >= 0.95
    exact = np.einsum("nd,nkd->nk", queries, items[got])
    np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-4)  # HNSW rescored: true inner products


def test_hnsw_inner_product_space_on_small_clusters() -> None:
    """20 items per cluster: the top 100 spans clusters, where the inner-product graph does well."""
    items, queries = clustered_vectors(5000, 100, 32, n_clusters=250, seed=2)
    true, _ = brute_force(queries, items, K)
    index = ItemIndex.build(items, kind="hnsw", params=IndexConfig(hnsw_space="ip"))
    got, scores = index.search(queries, K)
    assert recall(got, true) >= 0.95
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", queries, items[got]), rtol=1e-4, atol=1e-4)


def test_ivf_is_repeatable_and_seeded(catalogue: tuple[np.ndarray, np.ndarray], approximate: dict[str, ItemIndex]) -> None:
    items, queries = catalogue
    again = ItemIndex.build(items, kind="ivf")
    np.testing.assert_array_equal(again.search(queries, 20)[0], approximate["ivf"].search(queries, 20)[0])
    assert IndexConfig().resolved_nlist(200_000) == 1024 and IndexConfig().resolved_nlist(1000) == 25


# ------------------------------------------------------------------------ persistence
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(
    tmp_path: Path, catalogue: tuple[np.ndarray, np.ndarray], approximate: dict[str, ItemIndex], kind: str
) -> None:
    items, queries = catalogue
    ids = IdMap([f"item-{j}" for j in range(len(items))], kind="item")
    index = approximate.get(kind) or ItemIndex.build(items, kind=kind)
    index.items = ids
    try:
        index.save(tmp_path / "index")
        loaded = ItemIndex.load(tmp_path / "index", vectors=items, items=ids)
    finally:
        index.items = None
    assert loaded.config == index.config and loaded.items == ids
    seen = users_who_saw_their_top(queries, items, seen_of_top=10)
    for kwargs in ({}, {"exclude": seen, "deny": np.arange(100)}, {"allow": np.arange(0, len(items), 7)}):
        before, after = index.search(queries, 50, **kwargs), loaded.search(queries, 50, **kwargs)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
    assert loaded.to_external(after[0][:1, :3]).tolist() == [[f"item-{j}" for j in after[0][0, :3]]]


def test_load_rejects_mismatched_artefacts(tmp_path: Path, small: tuple[np.ndarray, np.ndarray]) -> None:
    items, _ = small
    ids = IdMap([str(j) for j in range(len(items))], kind="item")
    saved = ItemIndex.build(items, items=ids).save(tmp_path / "a")
    ItemIndex.build(items[::-1].copy(), items=ids).save(tmp_path / "b")

    with pytest.raises(ArtifactError, match="different item vectors"):
        ItemIndex.load(saved, vectors=items[::-1])
    with pytest.raises(ArtifactError, match="different items id map"):
        ItemIndex.load(saved, items=IdMap([f"x{j}" for j in range(len(items))]))

    tampered = json.loads((saved / "items.json").read_text())
    tampered["ids"][0], tampered["ids"][1] = tampered["ids"][1], tampered["ids"][0]
    (saved / "items.json").write_text(json.dumps(tampered))
    with pytest.raises(ArtifactError, match="id map was modified"):
        ItemIndex.load(saved)
    (saved / "items.json").write_text(json.dumps({"kind": "item", "ids": ["only-one"]}))
    with pytest.raises(ArtifactError, match="1 ids but the index holds 3000"):
        ItemIndex.load(saved)

    shutil.copy(tmp_path / "b" / "index.faiss", tmp_path / "a" / "index.faiss")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        ItemIndex.load(saved)
    (saved / "index.faiss").unlink()
    with pytest.raises(ArtifactError, match="index.faiss is missing"):
        ItemIndex.load(saved)
    with pytest.raises(ArtifactError, match="meta.json is missing"):
        ItemIndex.load(tmp_path / "nowhere")


# ------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors(small: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = small
    index = ItemIndex.build(items)
    with pytest.raises(DataValidationError, match=r"\(n_queries, 16\).*\(40, 8\)"):
        index.search(queries[:, :8], 5)
    with pytest.raises(DataValidationError, match="shape"):
        index.search(queries[0], 5)
    with pytest.raises(DataValidationError, match="NaN or infinite value in row 2"):
        index.search(np.where(np.arange(40)[:, None] == 2, np.nan, queries), 5)
    for k in (0, 3001, 2.5):
        with pytest.raises(DataValidationError, match="k must be"):
            index.search(queries, k)
    with pytest.raises(DataValidationError, match=r"exclude must have shape .*\(40, 3000\)"):
        index.search(queries, 5, exclude=sp.csr_matrix((41, 3000)))
    with pytest.raises(DataValidationError, match="one item array per query"):
        index.search(queries, 5, exclude=[[1]])
    with pytest.raises(UnknownIdError, match="item index 3000"):
        index.search(queries, 5, deny=[3000])
    with pytest.raises(DataValidationError, match="allow must be a 1-D array"):
        index.search(queries, 5, allow=[[1, 2]])
    with pytest.raises(DataValidationError, match="3000 rows"):
        ItemIndex.build(items, items=IdMap(["a", "b"]))
    with pytest.raises(DataValidationError, match="got \\(3000,\\)"):
        ItemIndex.build(items[:, 0])
    with pytest.raises(DataValidationError, match="index kind"):
        ItemIndex.build(items, kind="lsh")
    assert index.search(queries[:0], 5)[0].shape == (0, 5)


@pytest.mark.skipif(gpu_count() > 0, reason="checks the CPU fallback; this machine has a GPU")
def test_gpu_auto_falls_back_to_cpu_and_true_raises(small: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = small
    assert ItemIndex.build(items, kind="ivf", params=IndexConfig(use_gpu="auto")).device == "cpu"
    with pytest.raises(DataValidationError, match="use_gpu=True but faiss sees no GPU"):
        ItemIndex.build(items, params=IndexConfig(use_gpu=True))
    with pytest.raises(DataValidationError, match="use_gpu must be"):
        ItemIndex.build(items, params=IndexConfig(use_gpu="yes"))


# ----------------------------------------------------------------- trained models
@pytest.mark.parametrize("name", ["bpr-mf", "implicit-bpr"])
def test_index_top_k_equals_model_recommend(small_split: Split, name: str) -> None:
    if name == "bpr-mf":
        model = get_model(name)(
            seed=0, epochs=3, dim=16, lr=0.05, init_std=0.1, batch_size=256, progress=False, patience=0, eval_every=100
        ).fit(small_split)
    else:
        model = get_model(name)(factors=16, iterations=20, num_threads=1, progress=False).fit(small_split)
    users = np.arange(model.n_users)
    queries, items = model_vectors(model, users)
    np.testing.assert_allclose(queries @ items.T, model.score_all(users).numpy(), rtol=1e-5, atol=1e-5)
    index = ItemIndex.build(items, items=small_split.items)
    assert_same_topk(index.search(queries, 10, exclude=model.seen), model.recommend(users, k=10))
