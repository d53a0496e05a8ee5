"""Reading interaction files and the shared validation in ``Interactions.from_frame``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from acfrec.data import Interactions, read_interactions
from acfrec.data.io import InteractionsFileNotFoundError
from acfrec.errors import DataValidationError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ML100K = SHARED_DATA / "ml-100k" / "ml-100k.inter"
needs_ml100k = pytest.mark.skipif(not ML100K.is_file(), reason=f"shared data not found at {ML100K}")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- formats


def test_csv_guesses_columns_and_keeps_id_spelling(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n007,b,4,10\n7,a,5,11\n007,a,3,12\n"
    )
    data = read_interactions(path)
    assert data.meta["format"] == "csv"
    assert data.meta["columns"] == {
        "user": "userId",
        "item": "movieId",
        "timestamp": "timestamp",
        "rating": "rating",
    }
    # "007" and "7" are different external ids; dense ids follow first appearance.
    assert data.users.external_ids.tolist() == ["007", "7"]
    assert data.items.external_ids.tolist() == ["b", "a"]
    assert data.frame["user"].to_list() == [0, 1, 0]
    assert data.frame["item"].to_list() == [0, 1, 1]
    assert data.frame["timestamp"].to_list() == [10.0, 11.0, 12.0]
    assert data.frame["weight"].to_list() == [4.0, 5.0, 3.0]  # no threshold: weight is the rating
    assert data.frame.schema == {
        "user": pl.Int64,
        "item": pl.Int64,
        "timestamp": pl.Float64,
        "weight": pl.Float32,
    }
    assert data.has_timestamp


def test_tsv_with_explicit_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "log.tsv", "who\twhat\twhen\n1\tx\t5\n2\ty\t6\n")
    data = read_interactions(path, user_col="who", item_col="what", timestamp_col="when")
    assert (data.n_users, data.n_items, len(data)) == (2, 2, 2)
    assert data.meta["format"] == "tsv"
    assert data.frame["weight"].to_list() == [1.0, 1.0]


def test_parquet_with_native_types_and_datetimes(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pl.DataFrame(
        {
            "user_id": [3, 1, 3],
            "item_id": [10, 10, 11],
            "time": pl.Series([0, 1_000_000, 2_000_000]).cast(pl.Datetime("us")),
        }
    ).write_parquet(path)
    data = read_interactions(path)
    assert data.users.external_ids.tolist() == ["3", "1"]
    assert data.frame["timestamp"].to_list() == [0.0, 1.0, 2.0]  # epoch seconds


def test_movielens_100k_u_data(tmp_path: Path) -> None:
    path = write(
        tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t5\t881250950\n"
    )
    data = read_interactions(path, rating_threshold=4)
    assert data.meta["format"] == "ml-100k"
    assert data.meta["dropped"]["below_threshold"] == 2
    assert data.users.external_ids.tolist() == ["196"]
    assert data.items.external_ids.tolist() == ["302"]
    assert data.frame["timestamp"].to_list() == [881250950.0]


def test_movielens_1m_ratings_dat(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    )
    data = read_interactions(path)
    assert data.meta["format"] == "ml-1m"
    assert data.users.external_ids.tolist() == ["1", "2"]
    assert data.items.external_ids.tolist() == ["1193", "661"]
    assert data.frame["weight"].to_list() == [5.0, 3.0, 4.0]


def test_recbole_inter_strips_types(tmp_path: Path) -> None:
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ti1\t4.0\t1.5\nu2\ti1\t2.0\t0.5\n"
    data = read_interactions(write(tmp_path / "toy.inter", text))
    assert data.meta["format"] == "recbole"
    assert data.meta["columns"]["user"] == "user_id"
    assert data.frame["timestamp"].to_list() == [1.5, 0.5]


def test_format_and_separator_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "export.txt", "user;item\na;x\nb;y\n")
    data = read_interactions(path, format="csv", sep=";")
    assert data.items.external_ids.tolist() == ["x", "y"]
    multi = write(tmp_path / "multi.txt", "user||item\na||x\n")
    assert read_interactions(multi, format="csv", sep="||").users.external_ids.tolist() == ["a"]


def test_folder_resolves_to_movielens_file(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t2\t3\t4\n")
    assert read_interactions(tmp_path).meta["source"] == str(tmp_path / "u.data")


def test_without_timestamp_uses_file_order(tmp_path: Path) -> None:
    data = read_interactions(write(tmp_path / "a.csv", "user,item\nu,a\nv,a\nu,b\n"))
    assert not data.has_timestamp
    assert data.frame["timestamp"].to_list() == [0.0, 1.0, 2.0]


def test_pandas_frame_goes_through_the_same_validation() -> None:
    frame = pd.DataFrame({"u": ["a", None], "i": ["x", "y"]})
    with pytest.raises(DataValidationError, match=r"<frame>: column 'u' \(user id\) has 1 null"):
        Interactions.from_frame(frame, user_col="u", item_col="i")


@needs_ml100k
def test_real_movielens_100k() -> None:
    data = read_interactions(ML100K)
    assert (len(data), data.n_users, data.n_items) == (100_000, 943, 1682)
    assert data.meta["format"] == "recbole"
    assert data.users.external_ids[0] == "196" and data.items.external_ids[0] == "242"
    matrix = data.to_csr()
    assert matrix.shape == (943, 1682) and matrix.nnz == 100_000 and matrix.dtype == np.float32
    assert set(np.unique(matrix.data)) == {1.0}
    assert data.meta["dropped"] == {"duplicates": 0, "min_count": 0}


# ----------------------------------------------------------------------------- bad input


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(InteractionsFileNotFoundError, match="nope.csv") as info:
        read_interactions(path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataValidationError)


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"empty\.csv: the file is empty"):
        read_interactions(write(tmp_path / "empty.csv", ""))
    with pytest.raises(DataValidationError, match=r"header\.csv: no interactions"):
        read_interactions(write(tmp_path / "header.csv", "user,item\n"))


def test_missing_named_column_lists_available(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item,ts\nu,i,1\n")
    with pytest.raises(DataValidationError) as info:
        read_interactions(path, timestamp_col="when")
    message = str(info.value)
    assert "a.csv" in message and "'when'" in message and "user, item, ts" in message


def test_unguessable_user_column(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "customer,item\nu,i\n")
    with pytest.raises(
        DataValidationError, match=r"a\.csv: no user column found.*available columns: customer, item"
    ):
        read_interactions(path)


def test_non_numeric_timestamp_names_row_and_value(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item,timestamp\nu,i,1\nu,j,yesterday\nv,i,3\n")
    with pytest.raises(DataValidationError) as info:
        read_interactions(path)
    message = str(info.value)
    assert (
        "a.csv" in message
        and "'timestamp'" in message
        and "data row 2" in message
        and "'yesterday'" in message
    )


def test_non_numeric_rating(tmp_path: Path) -> None:
    path = write(tmp_path / "a.tsv", "user\titem\trating\nu\ti\tfive\n")
    with pytest.raises(DataValidationError, match=r"a\.tsv: column 'rating' \(rating\).*data row 1.*'five'"):
        read_interactions(path)


def test_missing_timestamp_value(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item,timestamp\nu,i,1\nu,j,\n")
    with pytest.raises(
        DataValidationError, match=r"a\.csv: column 'timestamp' \(timestamp\) has 1 missing value.*row 2"
    ):
        read_interactions(path)


def test_null_ids_counted_with_first_row(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item\nu,i\nu,\nw,j\nv,\n")
    with pytest.raises(
        DataValidationError, match=r"a\.csv: column 'item' \(item id\) has 2 null or empty.*row 2"
    ):
        read_interactions(path)


def test_null_user_id(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item\nu,i\n,j\n")
    with pytest.raises(
        DataValidationError,
        match=r"a\.csv: column 'user' \(user id\) has 1 null or empty value\(s\), first at data row 2",
    ):
        read_interactions(path)


def test_unknown_suffix_and_format(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", "{}")
    with pytest.raises(DataValidationError, match=r"a\.json: cannot tell the format"):
        read_interactions(path)
    with pytest.raises(DataValidationError, match=r"a\.json: unknown format 'json'"):
        read_interactions(path, format="json")


def test_ragged_movielens_1m_line(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.dat", "1::2::3::4\n1::3::4\n")
    with pytest.raises(DataValidationError, match=r"ratings\.dat: line 2 has 3 fields"):
        read_interactions(path)


def test_wrong_field_count_in_u_data(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\n")
    with pytest.raises(DataValidationError, match=r"u\.data.*expected 4 fields"):
        read_interactions(path)


def test_threshold_without_rating_column(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item\nu,i\n")
    with pytest.raises(DataValidationError, match=r"a\.csv: rating_threshold=4 needs a rating column"):
        read_interactions(path, rating_threshold=4)


def test_everything_filtered_out(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item\nu,i\nv,j\n")
    with pytest.raises(DataValidationError, match=r"a\.csv: no interactions left after min-count filtering"):
        read_interactions(path, min_user_interactions=2)


# ----------------------------------------------------------------------------- cleaning


def test_iterative_min_count_filtering_needs_two_rounds(caplog: pytest.LogCaptureFixture) -> None:
    # u1,u2 x i1,i2 is a stable 2-core. Round 1 removes u4 (1 row) and i4 (1 row); only then
    # do u3 and i3 fall to one interaction each, so round 2 removes (u3, i3).
    frame = pl.DataFrame(
        {
            "user": ["u1", "u1", "u2", "u2", "u3", "u3", "u4"],
            "item": ["i1", "i2", "i1", "i2", "i3", "i4", "i3"],
        }
    )
    with caplog.at_level(logging.WARNING, logger="acfrec.data.interactions"):
        data = Interactions.from_frame(
            frame, min_user_interactions=2, min_item_interactions=2, source="crafted"
        )
    assert data.users.external_ids.tolist() == ["u1", "u2"]
    assert data.items.external_ids.tolist() == ["i1", "i2"]
    assert len(data) == 4
    rounds = data.meta["filter_rounds"]
    assert [(r["users_removed"], r["items_removed"], r["rows_removed"]) for r in rounds] == [
        (1, 1, 2),
        (1, 1, 1),
    ]
    assert [(r["users_left"], r["items_left"], r["rows_left"]) for r in rounds] == [(3, 3, 5), (2, 2, 4)]
    assert data.meta["dropped"]["min_count"] == 3
    assert "crafted: min-count filtering" in caplog.text and "3 rows in 2 round(s)" in caplog.text


def test_duplicates_keep_latest_then_threshold() -> None:
    frame = pl.DataFrame(
        {
            "user": ["a", "a", "a", "b", "b", "b"],
            "item": ["x", "x", "x", "y", "y", "z"],
            "ts": [5, 9, 7, 3, 3, 1],
            "r": [5, 1, 4, 2, 5, 5],
        }
    )
    data = Interactions.from_frame(frame, timestamp_col="ts", rating_col="r")
    assert data.meta["dropped"]["duplicates"] == 3
    kept = data.frame.sort(["user", "item"])
    # (a, x): the ts=9 row wins; (b, y): tied ts=3, the later file row wins.
    assert kept["timestamp"].to_list() == [9.0, 3.0, 1.0]
    assert kept["weight"].to_list() == [1.0, 5.0, 5.0]
    # The latest rating counts for the threshold: a's re-rating of x as 1 drops the pair.
    thresholded = Interactions.from_frame(frame, timestamp_col="ts", rating_col="r", rating_threshold=4)
    assert thresholded.users.external_ids.tolist() == ["b"]
    assert thresholded.meta["dropped"] == {"duplicates": 3, "below_threshold": 1, "min_count": 0}
    assert thresholded.frame["weight"].to_list() == [1.0, 1.0]


def test_duplicates_without_timestamp_keep_last_row() -> None:
    frame = pl.DataFrame({"user": ["a", "a", "b"], "item": ["x", "x", "x"], "rating": [1, 5, 3]})
    data = Interactions.from_frame(frame, rating_col="rating")
    assert data.frame["weight"].to_list() == [5.0, 3.0]
    assert data.frame["timestamp"].to_list() == [1.0, 2.0]  # source rows of the kept pairs


def test_threshold_binarises() -> None:
    frame = pl.DataFrame({"user": ["a"] * 5, "item": list("vwxyz"), "rating": [1, 2, 3, 4, 5]})
    data = Interactions.from_frame(frame, rating_col="rating", rating_threshold=3.5)
    assert data.items.external_ids.tolist() == ["y", "z"]
    assert data.meta["dropped"]["below_threshold"] == 3
    assert data.to_csr().toarray().tolist() == [[1.0, 1.0]]


def test_bad_min_count_argument() -> None:
    frame = pl.DataFrame({"user": ["a"], "item": ["x"]})
    with pytest.raises(DataValidationError, match="min_item_interactions must be >= 1"):
        Interactions.from_frame(frame, min_item_interactions=0)
