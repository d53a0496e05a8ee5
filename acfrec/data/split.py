"""The leave-one-out ``Split``: the one object every model is trained and scored on.

Built by :func:`acfrec.data.splitting.leave_one_out`; saved as parquet + ``meta.json`` so every
model, ours or a peer's (RecBole atomic-file export), is scored on exactly the same split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from acfrec.data.idmap import IdMap
from acfrec.errors import ArtifactError
from acfrec.utils import atomic_dir, atomic_write_text, fingerprint_arrays

Target = Literal["valid", "test"]

FORMAT_VERSION = 1
SPLIT_FILES = ("meta.json", "train.parquet", "heldout.parquet", "negatives.npy", "users.json", "items.json")
RECBOLE_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


@dataclass
class Split:
    """A leave-one-out split over dense user/item indices.

    Attributes:
        train: ``(n_users, n_items)`` CSR float32, 1.0 where the user interacted in training.
        train_frame: training interactions, columns ``user`` (int64), ``item`` (int64),
            ``timestamp`` (float64; file order when the source had none), sorted by user then time
            (stable), so the most recent history of a user is its last rows.
        valid_items: ``(n_users,)`` int64, the held-out validation item, -1 for users without one.
        test_items: ``(n_users,)`` int64, the held-out test item, -1 for users without one.
        negatives: ``(n_users, n_negatives)`` int64 sampled-protocol negatives (items the user
            never interacted with, seeded); rows of users without a test item are -1.
        users, items: id maps from external ids to the dense indices above.
        meta: how it was made (source, tie rule, seed, counts, dropped rows, ...).

    ``leave_one_out`` also sets the plain attribute ``heldout_timestamps`` = (valid, test), two
    ``(n_users,)`` float64 arrays (NaN where none), kept by save/load and used by
    :meth:`export_recbole`; a Split built another way may lack it.
    """

    train: sp.csr_matrix
    train_frame: pl.DataFrame
    valid_items: np.ndarray
    test_items: np.ndarray
    negatives: np.ndarray
    users: IdMap
    items: IdMap
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    def target_items(self, target: Target) -> np.ndarray:
        """``(n_users,)`` held-out item per user for ``target``, -1 where none."""
        if target not in ("valid", "test"):
            raise ValueError(f"target must be 'valid' or 'test', got {target!r}")
        return self.valid_items if target == "valid" else self.test_items

    def eval_users(self, target: Target = "test") -> np.ndarray:
        """``(n_eval,)`` int64 users that have a held-out item for ``target``."""
        return np.flatnonzero(self.target_items(target) >= 0).astype(np.int64)

    def seen(self, target: Target = "test") -> sp.csr_matrix:
        """``(n_users, n_items)`` CSR of items excluded from ranking for ``target``.

        Validation ranks against everything but training items; test also excludes the
        validation item (the user has consumed it by test time), as RecBole does.
        """
        if target == "valid":
            return self.train
        rows = np.flatnonzero(self.valid_items >= 0)
        extra = sp.csr_matrix(
            (np.ones(rows.size, dtype=np.float32), (rows, self.valid_items[rows])),
            shape=self.train.shape,
        )
        seen = (self.train + extra).tocsr()
        seen.data[:] = 1.0
        return seen

    @property
    def fingerprint(self) -> str:
        """Content hash of the split (train pairs, held-out items, negatives, id maps)."""
        coo = self.train.tocoo()
        order = np.lexsort((coo.col, coo.row))
        return fingerprint_arrays(
            coo.row[order].astype(np.int64),
            coo.col[order].astype(np.int64),
            self.valid_items,
            self.test_items,
            self.negatives,
            np.asarray(self.users.external_ids.tolist(), dtype=str),
            np.asarray(self.items.external_ids.tolist(), dtype=str),
        )

    def summary(self) -> dict:
        return {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_train": int(self.train.nnz),
            "n_valid": int((self.valid_items >= 0).sum()),
            "n_test": int((self.test_items >= 0).sum()),
            "fingerprint": self.fingerprint,
        }

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Write the split to folder ``path`` atomically (a failed save leaves ``path`` as it was).

        Files: ``train.parquet`` (user, item, timestamp), ``heldout.parquet`` (user, valid_item,
        test_item[, valid_timestamp, test_timestamp]), ``negatives.npy``, ``users.json``,
        ``items.json`` and ``meta.json`` (format_version, fingerprint, summary, meta).
        """
        path = Path(path)
        frame = self.train_frame.select(
            pl.col("user").cast(pl.Int64), pl.col("item").cast(pl.Int64), pl.col("timestamp").cast(pl.Float64)
        )
        if (_csr_from_frame(frame, self.train.shape) != self.train).nnz:
            raise ValueError(
                "Split.train and Split.train_frame disagree; refusing to save an inconsistent split"
            )
        heldout = {
            "user": np.arange(self.n_users, dtype=np.int64),
            "valid_item": np.asarray(self.valid_items, dtype=np.int64),
            "test_item": np.asarray(self.test_items, dtype=np.int64),
        }
        timestamps = getattr(self, "heldout_timestamps", None)
        if timestamps is not None:
            heldout["valid_timestamp"], heldout["test_timestamp"] = timestamps
        payload = {
            "kind": "acfrec.split",
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "summary": self.summary(),
            "meta": self.meta,
        }
        with atomic_dir(path) as tmp:
            frame.write_parquet(tmp / "train.parquet")
            pl.DataFrame(heldout).write_parquet(tmp / "heldout.parquet")
            np.save(tmp / "negatives.npy", np.asarray(self.negatives, dtype=np.int64))
            self.users.save(tmp / "users.json")
            self.items.save(tmp / "items.json")
            (tmp / "meta.json").write_text(json.dumps(payload, indent=2, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Split:
        """Read a folder written by :meth:`save`; ArtifactError if incomplete, unreadable or altered."""
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"{path} is not a saved split: no such folder")
        missing = [name for name in SPLIT_FILES if not (path / name).is_file()]
        if missing:
            raise ArtifactError(f"{path} is not a complete saved split: missing {', '.join(missing)}")
        payload = _read_artifact(path / "meta.json", lambda p: json.loads(p.read_text()))
        if payload.get("kind") != "acfrec.split" or payload.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path / 'meta.json'}: not an acfrec split of format_version {FORMAT_VERSION} "
                f"(kind={payload.get('kind')!r}, format_version={payload.get('format_version')!r})"
            )
        users = IdMap.load(path / "users.json")
        items = IdMap.load(path / "items.json")
        shape = (len(users), len(items))
        frame = _read_artifact(path / "train.parquet", pl.read_parquet)
        heldout = _read_artifact(path / "heldout.parquet", pl.read_parquet)
        negatives = _read_artifact(path / "negatives.npy", lambda p: np.load(p, allow_pickle=False))
        _check_columns(path / "train.parquet", frame, ("user", "item", "timestamp"))
        _check_columns(path / "heldout.parquet", heldout, ("user", "valid_item", "test_item"))
        if heldout.height != shape[0] or negatives.ndim != 2 or negatives.shape[0] != shape[0]:
            raise ArtifactError(
                f"{path}: users.json has {shape[0]} users but heldout.parquet has {heldout.height} rows "
                f"and negatives.npy has shape {negatives.shape}"
            )
        try:
            train = _csr_from_frame(frame, shape)
        except ValueError as error:
            raise ArtifactError(f"{path / 'train.parquet'}: indices do not fit {shape}: {error}") from error
        split = cls(
            train=train,
            train_frame=frame.select(
                pl.col("user").cast(pl.Int64),
                pl.col("item").cast(pl.Int64),
                pl.col("timestamp").cast(pl.Float64),
            ),
            valid_items=heldout["valid_item"].to_numpy().astype(np.int64),
            test_items=heldout["test_item"].to_numpy().astype(np.int64),
            negatives=negatives.astype(np.int64, copy=False),
            users=users,
            items=items,
            meta=payload.get("meta", {}),
        )
        if {"valid_timestamp", "test_timestamp"} <= set(heldout.columns):
            split.heldout_timestamps = (
                heldout["valid_timestamp"].to_numpy().astype(np.float64),
                heldout["test_timestamp"].to_numpy().astype(np.float64),
            )
        if split.fingerprint != payload.get("fingerprint"):
            raise ArtifactError(
                f"{path}: content fingerprint {split.fingerprint} does not match meta.json's "
                f"{payload.get('fingerprint')!r}; the files were changed after saving"
            )
        return split

    def export_recbole(self, folder: str | Path, name: str) -> dict[str, Path]:
        """Write RecBole atomic files ``name.{train,valid,test}.inter`` into ``folder``.

        RecBole reads them with ``benchmark_filename: [train, valid, test]`` from
        ``data_path/name/``, so pass ``folder = data_path / name``. Ids are the external ids;
        ``valid``/``test`` hold each user's one held-out row, ``train`` the rest; rating is 1.0.
        Held-out timestamps come from ``heldout_timestamps`` when present, else the user's
        latest training timestamp (RecBole's benchmark mode does not reorder by time).

        Returns:
            ``{"train": path, "valid": path, "test": path}``.
        """
        folder = Path(folder)
        users_ext = self.users.external_ids
        items_ext = self.items.external_ids
        frame = self.train_frame
        parts = {
            "train": (frame["user"].to_numpy(), frame["item"].to_numpy(), frame["timestamp"].to_numpy()),
        }
        for target, times in zip(("valid", "test"), self._heldout_times(), strict=True):
            rows = self.eval_users(target)
            parts[target] = (rows, self.target_items(target)[rows], times[rows])
        paths = {}
        for part, (users, items, times) in parts.items():
            table = pl.DataFrame(
                {
                    "user_id": users_ext[users].tolist(),
                    "item_id": items_ext[items].tolist(),
                    "rating": np.ones(len(users)),
                    "timestamp": np.asarray(times, dtype=np.float64),
                },
                schema={
                    "user_id": pl.String,
                    "item_id": pl.String,
                    "rating": pl.Float64,
                    "timestamp": pl.Float64,
                },
            )
            body = table.write_csv(separator="\t", include_header=False, quote_style="never")
            paths[part] = folder / f"{name}.{part}.inter"
            atomic_write_text(paths[part], f"{RECBOLE_HEADER}\n{body}")
        return paths

    def _heldout_times(self) -> tuple[np.ndarray, np.ndarray]:
        timestamps = getattr(self, "heldout_timestamps", None)
        if timestamps is not None:
            return timestamps
        latest = np.zeros(self.n_users, dtype=np.float64)
        if self.train_frame.height:
            by_user = self.train_frame.group_by("user").agg(pl.col("timestamp").max())
            latest[by_user["user"].to_numpy()] = by_user["timestamp"].to_numpy()
        return latest, latest


def _csr_from_frame(frame: pl.DataFrame, shape: tuple[int, int]) -> sp.csr_matrix:
    users = frame["user"].to_numpy()
    items = frame["item"].to_numpy()
    matrix = sp.csr_matrix((np.ones(users.size, dtype=np.float32), (users, items)), shape=shape)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _check_columns(path: Path, frame: pl.DataFrame, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ArtifactError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}"
        )


def _read_artifact(path: Path, reader: Any) -> Any:
    try:
        return reader(path)
    except (OSError, ValueError, pl.exceptions.PolarsError) as error:
        raise ArtifactError(f"{path}: cannot read: {error}") from error


def _json_default(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
