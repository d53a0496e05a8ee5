"""Chunked top-N writing (pipelines.topn): same lists as the model's recommend, parts, manifest,
and restarts after a crash or a SIGKILL that end with the output of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from acfrec.cli import top_k_frame
from acfrec.data.split import Split
from acfrec.errors import DataValidationError
from acfrec.models import get_model
from acfrec.models.base import Recommender
from pipelines.topn import MANIFEST, TopnSettings, part_name, read_topn, write_topn

CHUNK = 48  # 200 users -> parts of 48, 48, 48, 48, 8


@pytest.fixture(scope="module")
def itempop(small_split: Split) -> Recommender:
    return get_model("itempop")().fit(small_split)


@pytest.fixture(scope="module")
def als(small_split: Split) -> Recommender:
    return get_model("als")(factors=8, iterations=2, seed=0).fit(small_split)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, small_split: Split, als: Recommender) -> pl.DataFrame:
    """An uninterrupted run (index retrieval, the ALS model)."""
    out = tmp_path_factory.mktemp("topn") / "reference"
    write_topn(als, small_split, out, TopnSettings(k=7, chunk_users=CHUNK), progress=False)
    return read_topn(out)


def assert_every_user_once(frame: pl.DataFrame, split: Split, k: int) -> None:
    counts = frame.group_by("user").len()
    assert counts.height == split.n_users  # every user has >= k unseen items here
    assert (counts["len"] == k).all()
    assert frame.select(["user", "rank"]).is_duplicated().sum() == 0
    assert frame.select(["user", "item"]).is_duplicated().sum() == 0


def test_parts_and_manifest_equal_the_models_recommend(tmp_path: Path, small_split: Split, itempop: Recommender):
    settings = TopnSettings(k=10, chunk_users=CHUNK, retrieval="recommend")
    manifest = write_topn(itempop, small_split, tmp_path, settings, progress=False)
    frame = read_topn(tmp_path)
    assert frame.equals(top_k_frame(itempop, small_split, k=10))  # exclude=all: train, valid and test items
    assert_every_user_once(frame, small_split, 10)
    assert [p["file"] for p in manifest["parts"]] == [part_name(i) for i in range(5)]
    assert [p["users"] for p in manifest["parts"]] == [48, 48, 48, 48, 8]
    assert manifest["rows"] == frame.height == sum(pl.read_parquet(tmp_path / p["file"]).height for p in manifest["parts"])
    assert manifest["settings"]["retrieval"] == "recommend"
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest


def test_index_retrieval_ranks_like_recommend(tmp_path: Path, small_split: Split, als: Recommender, reference: pl.DataFrame):
    write_topn(als, small_split, tmp_path, TopnSettings(k=7, chunk_users=CHUNK, retrieval="recommend"), progress=False)
    exact = read_topn(tmp_path)
    assert_every_user_once(reference, small_split, 7)
    np.testing.assert_allclose(reference["score"].to_numpy(), exact["score"].to_numpy(), rtol=1e-4, atol=1e-5)
    assert (reference["item"] == exact["item"]).mean() > 0.99  # only near-ties may swap


def test_exclude_train_only_allows_held_out_items(tmp_path: Path, small_split: Split, itempop: Recommender):
    write_topn(itempop, small_split, tmp_path, TopnSettings(k=10, chunk_users=CHUNK, exclude="train"), progress=False)
    frame = read_topn(tmp_path)
    users = small_split.users.to_index(frame["user"].to_numpy())
    items = small_split.items.to_index(frame["item"].to_numpy())
    assert small_split.train[users, items].sum() == 0
    test_hits = items == small_split.test_items[users]
    assert test_hits.any()  # held-out items come back once only training items are excluded


def test_crash_after_two_parts_resumes_to_the_same_output(
    tmp_path: Path, small_split: Split, als: Recommender, reference: pl.DataFrame
):
    settings = TopnSettings(k=7, chunk_users=CHUNK)

    def crash_after_two(part: int) -> None:
        if part == 1:
            raise RuntimeError("injected failure after part 1")

    with pytest.raises(RuntimeError, match="injected"):
        write_topn(als, small_split, tmp_path, settings, progress=False, on_part=crash_after_two)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [part_name(0), part_name(1)]
    assert not (tmp_path / MANIFEST).exists()
    written: list[int] = []
    write_topn(als, small_split, tmp_path, settings, progress=False, on_part=written.append)
    assert written == [2, 3, 4]  # the complete parts were kept
    assert read_topn(tmp_path).equals(reference)


def test_sigkill_half_way_then_restart(tmp_path: Path, small_split: Split, als: Recommender, reference: pl.DataFrame):
    model_dir, split_dir, out = tmp_path / "model", tmp_path / "split", tmp_path / "topn"
    als.save(model_dir)
    small_split.save(split_dir)
    script = textwrap.dedent(f"""
        import os, signal
        from acfrec.data.split import Split
        from acfrec.models.base import Recommender
        from pipelines.topn import TopnSettings, write_topn

        def kill_after_three(part):
            if part == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        write_topn(Recommender.load({str(model_dir)!r}), Split.load({str(split_dir)!r}), {str(out)!r},
                   TopnSettings(k=7, chunk_users={CHUNK}), progress=False, on_part=kill_after_three)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert len(list(out.glob("part-*.parquet"))) == 3 and not (out / MANIFEST).exists()
    (out / ".part-00003.parquet.abc123.tmp").write_bytes(b"half a parquet file")  # as if killed mid-write
    written: list[int] = []
    manifest = write_topn(Recommender.load(model_dir), Split.load(split_dir), out, TopnSettings(k=7, chunk_users=CHUNK),
                          progress=False, on_part=written.append)
    assert written == [3, 4]
    assert not list(out.glob(".*.tmp"))
    frame = read_topn(out)
    assert frame.equals(reference)
    assert_every_user_once(frame, small_split, 7)
    assert manifest["users_with_rows"] == small_split.n_users


def test_corrupt_stale_and_foreign_parts_are_recomputed(
    tmp_path: Path, small_split: Split, als: Recommender, reference: pl.DataFrame
):
    settings = TopnSettings(k=7, chunk_users=CHUNK)
    write_topn(als, small_split, tmp_path, settings, progress=False)
    with open(tmp_path / part_name(1), "ab") as handle:
        handle.write(b"garbage")  # checksum no longer matches
    (tmp_path / part_name(99)).write_bytes(b"left over from a run with smaller chunks")
    written: list[int] = []
    write_topn(als, small_split, tmp_path, settings, progress=False, on_part=written.append)
    assert written == [1]
    assert not (tmp_path / part_name(99)).exists()
    assert read_topn(tmp_path).equals(reference)
    written.clear()
    write_topn(als, small_split, tmp_path, TopnSettings(k=3, chunk_users=CHUNK), progress=False, on_part=written.append)
    assert written == [0, 1, 2, 3, 4]  # another job (k) never reuses these parts
    assert read_topn(tmp_path).group_by("user").len()["len"].max() == 3


def test_bad_settings_are_named(tmp_path: Path, small_split: Split, itempop: Recommender):
    with pytest.raises(DataValidationError, match="chunk_users"):
        write_topn(itempop, small_split, tmp_path, TopnSettings(chunk_users=0))
    with pytest.raises(DataValidationError, match="retrieval 'index' needs a model with user and item vectors; itempop"):
        write_topn(itempop, small_split, tmp_path, TopnSettings(retrieval="index"), progress=False)
    with pytest.raises(Exception, match="manifest.json is missing"):
        read_topn(tmp_path / "nothing")


def test_key_changes_with_the_model(small_split: Split, als: Recommender):
    from pipelines.topn import default_key

    other = get_model("als")(factors=8, iterations=2, seed=1).fit(small_split)
    settings = TopnSettings()
    assert default_key(als, small_split, settings) != default_key(other, small_split, settings)
    assert default_key(als, small_split, settings) == default_key(als, small_split, settings)


def test_scores_at_most_one_chunk_of_users_at_a_time(tmp_path: Path, small_split: Split):
    batches: list[int] = []

    class RecordingItemPop(get_model("itempop")):  # the real model, noting each scoring batch
        def score_all(self, users):
            batches.append(len(users))
            return super().score_all(users)

    model = RecordingItemPop().fit(small_split)
    batches.clear()
    write_topn(model, small_split, tmp_path, TopnSettings(k=5, chunk_users=CHUNK, retrieval="recommend"), progress=False)
    assert sum(batches[1:]) == small_split.n_users  # batches[0]: the 8-user sample of the job key
    assert max(batches[1:]) <= CHUNK
