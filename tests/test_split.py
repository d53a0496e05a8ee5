"""Leave-one-out splitting, sampled negatives, Split save/load and the RecBole export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from acfrec.data import Interactions, Split, leave_one_out, read_interactions
from acfrec.data.splitting import sample_distinct_negatives
from acfrec.errors import ArtifactError, DataValidationError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ML100K = SHARED_DATA / "ml-100k" / "ml-100k.inter"
needs_ml100k = pytest.mark.skipif(not ML100K.is_file(), reason=f"shared data not found at {ML100K}")


@pytest.fixture(scope="module")
def ml100k() -> Interactions:
    if not ML100K.is_file():
        pytest.skip(f"shared data not found at {ML100K}")
    return read_interactions(ML100K)


@pytest.fixture(scope="module")
def ml100k_split(ml100k: Interactions) -> Split:
    return leave_one_out(ml100k, seed=0)


def toy() -> Interactions:
    """Three users: a (5 rows, file order shuffled), b (2 rows), c (3 rows, tie at the latest time)."""
    frame = pl.DataFrame(
        {
            "user": ["a", "a", "b", "a", "c", "c", "a", "c", "b", "a"],
            "item": ["3", "1", "1", "5", "9", "2", "4", "1", "2", "2"],
            "ts": [30, 10, 1, 50, 7, 8, 40, 8, 2, 20],
        }
    )
    return Interactions.from_frame(frame, timestamp_col="ts", source="toy")


def external(split: Split, items: np.ndarray) -> list[str]:
    return [split.items.external_ids[i] if i >= 0 else None for i in items]


# ----------------------------------------------------------------------------- leave-one-out


def test_toy_split_holds_out_latest_and_second_latest() -> None:
    split = leave_one_out(toy(), n_negatives=1)
    assert split.users.external_ids.tolist() == ["a", "b", "c"]
    # c: "2" and "1" tie at ts 8 and "1" is later in the file, so "1" is the test item.
    assert external(split, split.test_items) == ["5", None, "1"]
    assert external(split, split.valid_items) == ["4", None, "2"]
    # a keeps 3 training rows, b all 2 (fewer than min_interactions=3), c one.
    assert split.train.nnz == 6 and split.train.dtype == np.float32
    rows = split.train_frame
    assert rows["user"].to_list() == [0, 0, 0, 1, 1, 2]
    assert rows["timestamp"].to_list() == [10.0, 20.0, 30.0, 1.0, 2.0, 7.0]
    assert (split.negatives[1] == -1).all()
    assert split.meta["counts"]["n_train_only_users"] == 1
    assert split.meta["counts"]["n_users_tied_at_latest"] == 1
    assert split.heldout_timestamps[1].tolist()[0] == 50.0


def test_tie_rules_on_toy() -> None:
    data = toy()
    by_id = leave_one_out(data, tie_rule="item_id", n_negatives=0)
    assert by_id.items.external_ids[by_id.test_items[2]] == "2"  # larger id among "1" and "2" at ts 8
    assert by_id.items.external_ids[by_id.valid_items[2]] == "1"
    assert by_id.meta["tie_rule"] == "item_id"


def test_item_id_rule_compares_integers_numerically() -> None:
    frame = pl.DataFrame({"user": ["u"] * 4, "item": ["9", "10", "8", "7"], "ts": [1, 1, 0, 0]})
    split = leave_one_out(
        Interactions.from_frame(frame, timestamp_col="ts"), tie_rule="item_id", n_negatives=0
    )
    assert split.items.external_ids[split.test_items[0]] == "10"  # as strings "9" > "10"
    assert split.items.external_ids[split.valid_items[0]] == "9"


def test_min_interactions_and_argument_checks() -> None:
    data = toy()
    split = leave_one_out(data, min_interactions=2, n_negatives=0)
    assert (split.test_items >= 0).all() and split.train.getrow(1).nnz == 0
    assert (leave_one_out(data, min_interactions=6, n_negatives=0).test_items == -1).all()
    with pytest.raises(ValueError, match="unknown tie_rule 'latest'"):
        leave_one_out(data, tie_rule="latest")
    with pytest.raises(ValueError, match="min_interactions must be >= 2"):
        leave_one_out(data, min_interactions=1)


def test_too_many_negatives_names_the_user() -> None:
    with pytest.raises(
        DataValidationError, match=r"toy: user 'a' has interacted with 5 of 6 items, leaving 1"
    ):
        leave_one_out(toy(), n_negatives=3)


def test_without_timestamps_order_is_seeded_random() -> None:
    frame = pl.DataFrame({"user": ["u"] * 30 + ["v"] * 30, "item": [str(i) for i in range(30)] * 2})
    data = Interactions.from_frame(frame)
    splits = [leave_one_out(data, seed=seed, n_negatives=0) for seed in (0, 0, 1)]
    assert splits[0].meta["order"] == "random (no timestamps)"
    assert np.array_equal(splits[0].test_items, splits[1].test_items)
    assert not np.array_equal(splits[0].test_items, splits[2].test_items)
    # Training history stays in source order (the row-number timestamps ascend per user).
    times = splits[0].train_frame["timestamp"].to_numpy()
    assert (np.diff(times[:28]) > 0).all() and (np.diff(times[28:]) > 0).all()


@needs_ml100k
def test_ml100k_heldout_is_latest_and_disjoint(ml100k: Interactions, ml100k_split: Split) -> None:
    split = ml100k_split
    assert split.summary()["n_train"] == 100_000 - 2 * 943
    assert (split.test_items >= 0).all() and (split.valid_items >= 0).all()
    assert split.meta["counts"]["n_users_tied_at_latest"] == 415
    times = ml100k.to_csr().astype(np.float64)
    frame = ml100k.frame
    times = sp.csr_matrix(
        (frame["timestamp"].to_numpy(), (frame["user"].to_numpy(), frame["item"].to_numpy())),
        shape=times.shape,
    )
    users = np.arange(split.n_users)
    test_time = np.asarray(times[users, split.test_items]).ravel()
    valid_time = np.asarray(times[users, split.valid_items]).ravel()
    latest_train = np.asarray(times.multiply(split.train).max(axis=1).todense()).ravel()
    assert (test_time >= valid_time).all() and (valid_time >= latest_train).all()
    assert (
        test_time
        == frame.group_by("user").agg(pl.col("timestamp").max()).sort("user")["timestamp"].to_numpy()
    ).all()
    # Held-out pairs are not in training, and train + held-out is everything.
    assert (
        split.train[users, split.test_items].sum() == 0 and split.train[users, split.valid_items].sum() == 0
    )
    assert (split.test_items != split.valid_items).all()
    seen = split.seen("test")
    assert seen.nnz + 943 == 100_000


@needs_ml100k
def test_file_order_picks_last_file_row_among_ties(ml100k: Interactions, ml100k_split: Split) -> None:
    frame = ml100k.frame.with_row_index("row")
    latest = frame.filter(pl.col("timestamp") == pl.col("timestamp").max().over("user"))
    expected = (
        latest.group_by("user").agg(pl.col("item").sort_by("row").last()).sort("user")["item"].to_numpy()
    )
    assert np.array_equal(ml100k_split.test_items, expected)
    by_id = leave_one_out(ml100k, tie_rule="item_id", n_negatives=0)
    ids = latest.with_columns(
        ext=pl.col("item").map_elements(lambda i: int(ml100k.items.external_ids[i]), return_dtype=pl.Int64)
    )
    expected_id = (
        ids.group_by("user").agg(pl.col("item").sort_by("ext").last()).sort("user")["item"].to_numpy()
    )
    assert np.array_equal(by_id.test_items, expected_id)
    changed = int((by_id.test_items != ml100k_split.test_items).sum())
    assert 0 < changed <= 415  # only tied users can change
    rand = [leave_one_out(ml100k, tie_rule="random", seed=s, n_negatives=0).test_items for s in (0, 0, 1)]
    assert np.array_equal(rand[0], rand[1]) and not np.array_equal(rand[0], rand[2])


@needs_ml100k
def test_ml100k_negatives(ml100k: Interactions, ml100k_split: Split) -> None:
    negatives = ml100k_split.negatives
    assert negatives.shape == (943, 99) and negatives.dtype == np.int64
    assert ((negatives >= 0) & (negatives < 1682)).all()
    assert (np.diff(np.sort(negatives, axis=1), axis=1) > 0).all()  # distinct within a user
    history = ml100k.to_csr()
    assert history[np.repeat(np.arange(943), 99), negatives.ravel()].sum() == 0  # never interacted
    again = leave_one_out(ml100k, seed=0)
    other = leave_one_out(ml100k, seed=1)
    assert np.array_equal(again.negatives, negatives) and again.fingerprint == ml100k_split.fingerprint
    assert (other.negatives != negatives).any(axis=1).mean() > 0.99
    # The seed does not move file_order held-outs.
    assert np.array_equal(other.test_items, ml100k_split.test_items)


def test_distinct_negatives_uniform_and_fallback_path() -> None:
    n_items = 10
    history = sp.csr_matrix((np.ones(2), ([0, 0], [0, 1])), shape=(4000, n_items))
    rng = np.random.default_rng(0)
    users = np.arange(4000)
    picked = sample_distinct_negatives(rng, users, history, 3)
    assert (np.diff(np.sort(picked, axis=1), axis=1) > 0).all()
    assert not np.isin(picked[0], [0, 1]).any()
    counts = np.bincount(picked[1:].ravel(), minlength=n_items)
    assert counts[0] > 1000 and abs(counts / counts.sum() - 0.1).max() < 0.01  # uniform over the 10 items
    # rounds=0 goes straight to ranking the complement; a user with exactly 3 free items gets them all.
    dense = sp.csr_matrix(np.array([[1] * 7 + [0] * 3] * 2, dtype=np.float32))
    for rounds in (0, 4):
        out = sample_distinct_negatives(np.random.default_rng(1), np.arange(2), dense, 3, rounds=rounds)
        assert np.sort(out, axis=1).tolist() == [[7, 8, 9], [7, 8, 9]]


# ----------------------------------------------------------------------------- persistence


def assert_same_split(a: Split, b: Split) -> None:
    assert (a.train != b.train).nnz == 0 and a.train.shape == b.train.shape
    assert a.train_frame.equals(b.train_frame)
    for name in ("valid_items", "test_items", "negatives"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.users == b.users and a.items == b.items
    assert a.fingerprint == b.fingerprint


def test_save_load_round_trip(tmp_path: Path) -> None:
    split = leave_one_out(toy(), n_negatives=1)
    path = split.save(tmp_path / "split")
    assert sorted(os.listdir(path)) == sorted(
        ["meta.json", "train.parquet", "heldout.parquet", "negatives.npy", "users.json", "items.json"]
    )
    loaded = Split.load(path)
    assert_same_split(split, loaded)
    assert loaded.meta == json.loads(json.dumps(split.meta))
    assert np.array_equal(loaded.heldout_timestamps[1], split.heldout_timestamps[1], equal_nan=True)
    saved = json.loads((path / "meta.json").read_text())
    assert saved["fingerprint"] == split.fingerprint and saved["format_version"] == 1


@needs_ml100k
def test_ml100k_round_trip(tmp_path: Path, ml100k_split: Split) -> None:
    assert_same_split(ml100k_split, Split.load(ml100k_split.save(tmp_path / "ml")))


def test_load_rejects_tampered_and_incomplete_folders(tmp_path: Path) -> None:
    split = leave_one_out(toy(), n_negatives=1)
    path = split.save(tmp_path / "split")
    np.save(path / "negatives.npy", split.negatives[:, ::-1] * 0 + 4)
    with pytest.raises(ArtifactError, match="fingerprint .* does not match meta.json"):
        Split.load(path)
    split.save(path)
    (path / "heldout.parquet").unlink()
    with pytest.raises(ArtifactError, match=r"missing heldout\.parquet"):
        Split.load(path)
    split.save(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"meta\.json: cannot read"):
        Split.load(path)
    split.save(path)
    pl.DataFrame({"user": [0], "item": [99], "timestamp": [0.0]}).write_parquet(path / "train.parquet")
    with pytest.raises(ArtifactError, match=r"train\.parquet: indices do not fit"):
        Split.load(path)
    with pytest.raises(ArtifactError, match="no such folder"):
        Split.load(tmp_path / "absent")


def test_failed_save_leaves_old_folder_and_no_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = leave_one_out(toy(), n_negatives=1, seed=0)
    path = old.save(tmp_path / "split")
    new = leave_one_out(toy(), n_negatives=1, tie_rule="item_id")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "fresh")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["split"]
    assert Split.load(path).fingerprint == old.fingerprint


# ----------------------------------------------------------------------------- RecBole export


def test_export_recbole_files(tmp_path: Path) -> None:
    split = leave_one_out(toy(), n_negatives=0)
    paths = split.export_recbole(tmp_path / "toy", "toy")
    assert {k: p.name for k, p in paths.items()} == {
        "train": "toy.train.inter",
        "valid": "toy.valid.inter",
        "test": "toy.test.inter",
    }
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    assert paths["test"].read_text().splitlines() == [header, "a\t5\t1.0\t50.0", "c\t1\t1.0\t8.0"]
    assert paths["valid"].read_text().splitlines() == [header, "a\t4\t1.0\t40.0", "c\t2\t1.0\t8.0"]
    assert paths["train"].read_text().splitlines() == [
        header,
        "a\t1\t1.0\t10.0",
        "a\t2\t1.0\t20.0",
        "a\t3\t1.0\t30.0",
        "b\t1\t1.0\t1.0",
        "b\t2\t1.0\t2.0",
        "c\t9\t1.0\t7.0",
    ]


def test_export_without_heldout_timestamps_uses_latest_train_time(tmp_path: Path) -> None:
    split = Split.load(leave_one_out(toy(), n_negatives=0).save(tmp_path / "s"))
    del split.heldout_timestamps
    lines = split.export_recbole(tmp_path / "out", "toy")["test"].read_text().splitlines()
    assert lines[1:] == ["a\t5\t1.0\t30.0", "c\t1\t1.0\t7.0"]


@needs_ml100k
def test_export_recbole_ml100k_covers_every_interaction(tmp_path: Path, ml100k_split: Split) -> None:
    paths = ml100k_split.export_recbole(tmp_path, "ml-100k")
    parts = {
        k: pl.read_csv(p, separator="\t", infer_schema=False).rename(lambda c: c.split(":")[0])
        for k, p in paths.items()
    }
    assert [parts[k].height for k in ("train", "valid", "test")] == [98_114, 943, 943]
    everything = pl.concat(parts.values()).select("user_id", "item_id")
    original = pl.read_csv(ML100K, separator="\t", infer_schema=False).rename(lambda c: c.split(":")[0])
    assert everything.sort(["user_id", "item_id"]).equals(
        original.select("user_id", "item_id").sort(["user_id", "item_id"])
    )
    # Each test row is that user's latest timestamp in the original file.
    latest = original.group_by("user_id").agg(pl.col("timestamp").cast(pl.Float64).max())
    joined = parts["test"].with_columns(pl.col("timestamp").cast(pl.Float64)).join(latest, on="user_id")
    assert (joined["timestamp"] == joined["timestamp_right"]).all()
