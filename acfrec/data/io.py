"""Reading interaction files into validated :class:`~acfrec.data.interactions.Interactions`.

Formats: ``csv``, ``tsv``, ``parquet``, ``ml-100k`` (MovieLens ``u.data``: tab, no header, user
item rating timestamp), ``ml-1m`` (MovieLens ``ratings.dat``: ``::``, no header) and ``recbole``
(atomic ``.inter``: tab, header ``name:type``). Text formats are read as strings, so ids keep
their exact spelling (``"007"`` stays ``"007"``) and a bad number is reported with its row by the
shared validation in :meth:`Interactions.from_frame`, not as a parser crash.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from acfrec.data.interactions import Interactions
from acfrec.errors import DataValidationError

FORMATS = ("csv", "tsv", "parquet", "ml-100k", "ml-1m", "recbole")

# Column names tried, in order and case-insensitively, when the caller names none.
COLUMN_GUESSES: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id", "userid", "uid", "user-id"),
    "item": ("item", "item_id", "itemid", "iid", "movieid", "movie_id", "item-id"),
    "timestamp": ("timestamp", "time", "ts", "datetime", "date"),
    "rating": ("rating", "weight", "score"),
}
_MOVIELENS_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


class InteractionsFileNotFoundError(DataValidationError, FileNotFoundError):
    """The interactions file does not exist (also a ``FileNotFoundError``)."""


def read_interactions(
    path: str | Path,
    *,
    format: str | None = None,
    user_col: str | None = None,
    item_col: str | None = None,
    timestamp_col: str | None = None,
    rating_col: str | None = None,
    rating_threshold: float | None = None,
    min_user_interactions: int = 1,
    min_item_interactions: int = 1,
    sep: str | None = None,
) -> Interactions:
    """Read an interaction file and validate it.

    Args:
        path: the file; a folder holding ``u.data``, ``ratings.dat`` or ``<folder>.inter`` works too.
        format: one of :data:`FORMATS`; guessed from the file name when None.
        user_col, item_col, timestamp_col, rating_col: column names; guessed from common names
            (:data:`COLUMN_GUESSES`) when None. Timestamp and rating are optional.
        rating_threshold: keep only rows with rating >= threshold (implicit feedback).
        min_user_interactions, min_item_interactions: iterative min-count filter.
        sep: field separator, overriding the format's (may be several characters, like ``::``).
    Raises:
        InteractionsFileNotFoundError: the path does not exist.
        DataValidationError: unreadable file, unknown format, missing column, bad values; the
            message names the file.
    """
    path = _resolve(Path(path))
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise DataValidationError(f"{path}: unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    frame = _read_raw(path, fmt, sep)
    columns = {
        "user": user_col or _guess(frame, "user", path, required=True),
        "item": item_col or _guess(frame, "item", path, required=True),
        "timestamp": timestamp_col or _guess(frame, "timestamp", path, required=False),
        "rating": rating_col or _guess(frame, "rating", path, required=False),
    }
    interactions = Interactions.from_frame(
        frame,
        user_col=columns["user"],
        item_col=columns["item"],
        timestamp_col=columns["timestamp"],
        rating_col=columns["rating"],
        rating_threshold=rating_threshold,
        min_user_interactions=min_user_interactions,
        min_item_interactions=min_item_interactions,
        source=str(path),
    )
    interactions.meta["format"] = fmt
    return interactions


def detect_format(path: Path) -> str:
    """Format name from the file name: ``u.data``/``*.data``, ``ratings.dat``/``*.dat``, suffixes."""
    suffix = path.suffix.lower()
    by_suffix = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".tab": "tsv",
        ".parquet": "parquet",
        ".pq": "parquet",
        ".data": "ml-100k",
        ".dat": "ml-1m",
        ".inter": "recbole",
    }
    if suffix in by_suffix:
        return by_suffix[suffix]
    raise DataValidationError(
        f"{path}: cannot tell the format from the file name; pass format= one of {', '.join(FORMATS)}"
    )


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for candidate in ("u.data", "ratings.dat", f"{path.name}.inter"):
            if (path / candidate).is_file():
                return path / candidate
        raise InteractionsFileNotFoundError(
            f"{path} is a folder without u.data, ratings.dat or {path.name}.inter; pass the file itself"
        )
    if not path.is_file():
        raise InteractionsFileNotFoundError(f"interactions file not found: {path}")
    return path


def _read_raw(path: Path, fmt: str, sep: str | None) -> pl.DataFrame:
    try:
        if fmt == "parquet":
            return pl.read_parquet(path)
        if fmt == "ml-100k":
            return _read_text(path, sep or "\t", header=False, names=_MOVIELENS_COLUMNS)
        if fmt == "ml-1m":
            return _read_text(path, sep or "::", header=False, names=_MOVIELENS_COLUMNS)
        if fmt == "recbole":
            frame = _read_text(path, sep or "\t", header=True)
            # RecBole headers are `name:type` (user_id:token); the type is RecBole's business.
            return frame.rename({c: c.split(":", 1)[0] for c in frame.columns})
        return _read_text(path, sep or ("\t" if fmt == "tsv" else ","), header=True)
    except DataValidationError:
        raise
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as error:
        raise DataValidationError(f"{path}: cannot read as {fmt}: {error}") from error


def _read_text(path: Path, sep: str, header: bool, names: list[str] | None = None) -> pl.DataFrame:
    """All columns as strings; ``sep`` may be several characters (read lines, then split)."""
    if path.stat().st_size == 0:
        raise DataValidationError(f"{path}: the file is empty")
    if len(sep) == 1:
        frame = pl.read_csv(
            path,
            separator=sep,
            has_header=header,
            infer_schema=False,
            quote_char=None if sep == "\t" else '"',
        )
    else:
        frame = _read_multichar(path, sep, header)
    if names is None:
        return frame
    if frame.width != len(names):
        raise DataValidationError(
            f"{path}: expected {len(names)} fields per line ({', '.join(names)}) separated by {sep!r}, "
            f"found {frame.width}"
        )
    return frame.rename(dict(zip(frame.columns, names, strict=True)))


def _read_multichar(path: Path, sep: str, header: bool) -> pl.DataFrame:
    lines = pl.read_csv(
        path,
        separator="\x1f",
        has_header=False,
        infer_schema=False,
        quote_char=None,
        new_columns=["line"],
        truncate_ragged_lines=True,
    )["line"]
    lines = lines.filter(lines.str.strip_chars() != "")
    parts = lines.str.split(sep)
    widths = parts.list.len()
    width = int(widths[0])
    bad = widths != width
    if bad.any():
        row = int(bad.arg_true()[0]) + 1
        raise DataValidationError(
            f"{path}: line {row} has {int(widths[row - 1])} fields separated by {sep!r}, the first line has {width}"
        )
    frame = pl.DataFrame({f"column_{k + 1}": parts.list.get(k) for k in range(width)})
    if header:
        frame = frame.rename(dict(zip(frame.columns, frame.row(0), strict=True)))[1:]
    return frame


def _guess(frame: pl.DataFrame, role: str, path: Path, required: bool) -> str | None:
    lowered = {c.lower(): c for c in frame.columns}
    for candidate in COLUMN_GUESSES[role]:
        if candidate in lowered:
            return lowered[candidate]
    if required:
        raise DataValidationError(
            f"{path}: no {role} column found (looked for {', '.join(COLUMN_GUESSES[role])}); "
            f"available columns: {', '.join(frame.columns)}; pass {role}_col="
        )
    return None
