"""``Interactions``: a validated interaction frame over dense ids, plus the id maps.

Every source (files read by :func:`acfrec.data.io.read_interactions`, generated data, a user's
own DataFrame) goes through :meth:`Interactions.from_frame`, so one set of checks guards them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from acfrec.data.idmap import IdMap
from acfrec.errors import DataValidationError
from acfrec.utils import fingerprint_arrays

logger = logging.getLogger(__name__)

_ROW = "__row"  # original 0-based data row, kept through every step for messages and order


@dataclass
class Interactions:
    """Validated interactions over dense ids.

    Attributes:
        frame: one row per distinct (user, item) pair, in source-file order, columns ``user``
            (int64, ``0..n_users-1``), ``item`` (int64, ``0..n_items-1``), ``timestamp`` (float64;
            the source row number when the source had no timestamp column, so order is kept) and
            ``weight`` (float32; the rating when there is one and no threshold, else 1.0).
        users, items: external id (str) <-> dense index, dense ids numbered in order of first
            appearance among the kept rows.
        meta: provenance: ``source``, ``format``, ``columns``, ``has_timestamp``, ``rows_read``,
            ``rows_kept``, ``dropped`` (rows per reason), ``rating_threshold``, min counts and
            ``filter_rounds`` (what each round of min-count filtering removed).
    """

    frame: pl.DataFrame
    users: IdMap
    items: IdMap
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def has_timestamp(self) -> bool:
        """False when the source had no timestamp column (``timestamp`` then holds row order)."""
        return bool(self.meta.get("has_timestamp", True))

    def __len__(self) -> int:
        return self.frame.height

    def to_csr(self) -> sp.csr_matrix:
        """``(n_users, n_items)`` CSR float32, 1.0 for every interaction."""
        users = self.frame["user"].to_numpy()
        items = self.frame["item"].to_numpy()
        return sp.csr_matrix(
            (np.ones(users.size, dtype=np.float32), (users, items)), shape=(self.n_users, self.n_items)
        )

    @property
    def fingerprint(self) -> str:
        """Content hash of (user, item, timestamp) rows and the id maps."""
        return fingerprint_arrays(
            self.frame["user"].to_numpy(),
            self.frame["item"].to_numpy(),
            self.frame["timestamp"].to_numpy(),
            np.asarray(self.users.external_ids.tolist(), dtype=str),
            np.asarray(self.items.external_ids.tolist(), dtype=str),
        )

    @classmethod
    def from_frame(
        cls,
        df: Any,
        user_col: str = "user",
        item_col: str = "item",
        timestamp_col: str | None = None,
        rating_col: str | None = None,
        rating_threshold: float | None = None,
        min_user_interactions: int = 1,
        min_item_interactions: int = 1,
        source: str = "<frame>",
    ) -> Interactions:
        """Validate a raw frame and turn it into dense-id ``Interactions``.

        Steps, in order: column and type checks; duplicate (user, item) pairs keep the latest
        row (by timestamp; ties and no timestamp: the last in source order); ratings below
        ``rating_threshold`` dropped (so a re-rating counts, not the first rating); users and
        items under the minimum counts removed round after round until none is left under;
        dense ids assigned in order of first appearance.

        Args:
            df: a polars (or pandas) DataFrame, one row per interaction.
            source: names the data in error messages and ``meta`` (a file path, usually).
        Raises:
            DataValidationError: naming ``source`` and the column / row at fault.
        """
        frame = _as_polars(df, source)
        for name, value in (
            ("min_user_interactions", min_user_interactions),
            ("min_item_interactions", min_item_interactions),
        ):
            if int(value) < 1:
                raise DataValidationError(f"{source}: {name} must be >= 1, got {value}")
        roles = {"user": user_col, "item": item_col, "timestamp": timestamp_col, "rating": rating_col}
        _check_columns(frame, roles, source)
        if rating_threshold is not None and rating_col is None:
            raise DataValidationError(
                f"{source}: rating_threshold={rating_threshold} needs a rating column; "
                f"available columns: {', '.join(frame.columns)}"
            )
        if frame.height == 0:
            raise DataValidationError(f"{source}: no interactions (the input has no rows)")

        rows_read = frame.height
        frame = _typed_columns(frame.with_row_index(_ROW), roles, source)
        dropped: dict[str, int] = {}

        # Latest row per pair wins: sort by time then source row, keep the last of each pair.
        before = frame.height
        frame = (
            frame.sort(["timestamp", _ROW])
            .unique(subset=["user", "item"], keep="last", maintain_order=True)
            .sort(_ROW)
        )
        dropped["duplicates"] = before - frame.height

        if rating_threshold is not None:
            before = frame.height
            frame = frame.filter(pl.col("rating") >= float(rating_threshold))
            dropped["below_threshold"] = before - frame.height
            frame = frame.with_columns(pl.lit(1.0, dtype=pl.Float32).alias("weight"))
        elif rating_col is not None:
            frame = frame.with_columns(pl.col("rating").cast(pl.Float32).alias("weight"))
        else:
            frame = frame.with_columns(pl.lit(1.0, dtype=pl.Float32).alias("weight"))
        if frame.height == 0:
            raise DataValidationError(
                f"{source}: no interactions left: every rating in column {rating_col!r} is below "
                f"rating_threshold={rating_threshold}"
            )

        frame, rounds = _filter_min_counts(
            frame, int(min_user_interactions), int(min_item_interactions), source
        )
        dropped["min_count"] = sum(r["rows_removed"] for r in rounds)

        users, user_index = _dense_ids(frame["user"], "user")
        items, item_index = _dense_ids(frame["item"], "item")
        frame = pl.DataFrame(
            {
                "user": user_index,
                "item": item_index,
                "timestamp": frame["timestamp"].cast(pl.Float64),
                "weight": frame["weight"].cast(pl.Float32),
            }
        )
        meta = {
            "source": str(source),
            "format": "frame",
            "columns": {role: name for role, name in roles.items()},
            "has_timestamp": timestamp_col is not None,
            "rows_read": rows_read,
            "rows_kept": frame.height,
            "dropped": dropped,
            "rating_threshold": None if rating_threshold is None else float(rating_threshold),
            "min_user_interactions": int(min_user_interactions),
            "min_item_interactions": int(min_item_interactions),
            "filter_rounds": rounds,
            "n_users": len(users),
            "n_items": len(items),
        }
        return cls(frame=frame, users=users, items=items, meta=meta)


def _as_polars(df: Any, source: str) -> pl.DataFrame:
    if isinstance(df, pl.DataFrame):
        return df
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(df, pd.DataFrame):
        return pl.from_pandas(df)
    raise DataValidationError(f"{source}: expected a polars or pandas DataFrame, got {type(df).__name__}")


def _check_columns(frame: pl.DataFrame, roles: dict[str, str | None], source: str) -> None:
    for role, name in roles.items():
        if name is not None and name not in frame.columns:
            raise DataValidationError(
                f"{source}: no column {name!r} for the {role}; available columns: {', '.join(frame.columns)}"
            )


def _first_row(mask: pl.Series) -> int:
    """1-based data row (header not counted) of the first True in ``mask``."""
    return int(mask.arg_true()[0]) + 1


def _typed_columns(frame: pl.DataFrame, roles: dict[str, str | None], source: str) -> pl.DataFrame:
    """Columns ``user``/``item`` (str), ``timestamp`` (f64, row number when absent), ``rating`` (f64)."""
    columns = [pl.col(_ROW)]
    for role in ("user", "item"):
        columns.append(_id_column(frame[roles[role]], role, source).alias(role))
    if roles["timestamp"] is None:
        columns.append(pl.col(_ROW).cast(pl.Float64).alias("timestamp"))
    else:
        columns.append(_numeric_column(frame[roles["timestamp"]], "timestamp", source).alias("timestamp"))
    if roles["rating"] is not None:
        columns.append(_numeric_column(frame[roles["rating"]], "rating", source).alias("rating"))
    return frame.select(columns)


def _id_column(column: pl.Series, role: str, source: str) -> pl.Series:
    text = column.cast(pl.String).str.strip_chars()
    missing = text.is_null() | (text == "")
    n_missing = int(missing.sum())
    if n_missing:
        raise DataValidationError(
            f"{source}: column {column.name!r} ({role} id) has {n_missing} null or empty value(s), "
            f"first at data row {_first_row(missing)} (1-based, header not counted)"
        )
    return text


def _numeric_column(column: pl.Series, role: str, source: str) -> pl.Series:
    name = column.name
    missing = column.is_null()
    if column.dtype == pl.String:
        missing = missing | (column.str.strip_chars() == "")
    n_missing = int(missing.sum())
    if n_missing:
        raise DataValidationError(
            f"{source}: column {name!r} ({role}) has {n_missing} missing value(s), first at data row "
            f"{_first_row(missing)} (1-based, header not counted)"
        )
    if column.dtype.is_temporal():
        values = column.cast(pl.Datetime("us")).dt.epoch("us").cast(pl.Float64) / 1e6
    elif column.dtype.is_numeric() or column.dtype == pl.Boolean:
        values = column.cast(pl.Float64)
    elif column.dtype == pl.String:
        values = column.str.strip_chars().cast(pl.Float64, strict=False)
    else:
        raise DataValidationError(
            f"{source}: column {name!r} ({role}) must be numeric, it has type {column.dtype}"
        )
    bad = values.is_null() | ~values.is_finite()
    if bad.any():
        row = _first_row(bad)
        raise DataValidationError(
            f"{source}: column {name!r} ({role}) must hold finite numbers; data row {row} "
            f"(1-based, header not counted) has {column[row - 1]!r} ({int(bad.sum())} bad value(s) in all)"
        )
    return values


def _filter_min_counts(
    frame: pl.DataFrame, min_user: int, min_item: int, source: str
) -> tuple[pl.DataFrame, list[dict]]:
    """Drop users / items under the minimum counts, repeatedly, until the frame is stable.

    Dropping a user lowers its items' counts (and vice versa), so one round is not enough.
    """
    rounds: list[dict] = []
    while min_user > 1 or min_item > 1:
        counted = frame.with_columns(pl.len().over("user").alias("_nu"), pl.len().over("item").alias("_ni"))
        low_user = counted["_nu"] < min_user
        low_item = counted["_ni"] < min_item
        keep = ~(low_user | low_item)
        if keep.all():
            break
        kept = frame.filter(keep)
        rounds.append(
            {
                "round": len(rounds) + 1,
                "users_removed": int(frame.filter(low_user)["user"].n_unique()),
                "items_removed": int(frame.filter(low_item)["item"].n_unique()),
                "rows_removed": frame.height - kept.height,
                "users_left": int(kept["user"].n_unique()),
                "items_left": int(kept["item"].n_unique()),
                "rows_left": kept.height,
            }
        )
        frame = kept
        if frame.height == 0:
            raise DataValidationError(
                f"{source}: no interactions left after min-count filtering "
                f"(min_user_interactions={min_user}, min_item_interactions={min_item}; rounds: {rounds})"
            )
    if rounds:
        logger.warning(
            "%s: min-count filtering (users >= %d, items >= %d) removed %d rows in %d round(s): %s",
            source,
            min_user,
            min_item,
            sum(r["rows_removed"] for r in rounds),
            len(rounds),
            rounds,
        )
    return frame, rounds


def _dense_ids(external: pl.Series, kind: str) -> tuple[IdMap, np.ndarray]:
    """IdMap in order of first appearance, and ``(n,)`` int64 dense ids of ``external``."""
    uniques = external.unique(maintain_order=True)
    lookup = pl.DataFrame({"key": uniques, "index": pl.int_range(uniques.len(), dtype=pl.Int64, eager=True)})
    index = (
        pl.DataFrame({"key": external})
        .join(lookup, on="key", how="left", maintain_order="left")["index"]
        .to_numpy()
    )
    return IdMap(uniques.to_list(), kind=kind), index.astype(np.int64, copy=False)
