"""Top-N lists for every user, written in chunks: memory bounded by the chunk, restartable.

Output folder layout::

    part-00000.parquet   users [0, chunk_users): columns user, rank, item, score (external ids,
    part-00000.json      rank 0 = top); the .json sidecar holds the part's row count and sha256
    part-00001.parquet   ...
    manifest.json        written last: every part with its rows and checksum, and the totals

Each part is written to a temporary file and renamed, then its sidecar likewise, so a part
either exists completely with a matching sidecar or is recomputed. A restarted run (after a kill
or a crash) keeps every part whose sidecar matches the job key and whose checksum verifies, and
computes the rest; the result equals an uninterrupted run, with each user in exactly one part.
The job key identifies the inputs (model, split and settings), so parts of another job are never
reused.

Memory per chunk: the scores of ``chunk_users`` users (``(chunk_users, n_items)`` float32 through
the model's ``recommend``; ``(chunk_users, k + seen)`` through the FAISS index) plus the part's
rows, whatever the number of users.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from acfrec.errors import ArtifactError, DataValidationError
from acfrec.utils import atomic_file, atomic_write_text, file_sha256

if TYPE_CHECKING:
    import polars as pl
    import scipy.sparse as sp

    from acfrec.data.idmap import IdMap
    from acfrec.data.split import Split
    from acfrec.models.base import Recommender

MANIFEST = "manifest.json"
FORMAT = "acfrec.topn"
FORMAT_VERSION = 1
COLUMNS = ("user", "rank", "item", "score")
# (part index) after each part is safely on disk: progress hooks, and failure injection in tests.
PartCallback = Callable[[int], None]


@dataclass(frozen=True)
class TopnSettings:
    """What a top-N job computes.

    Attributes:
        k: items per user (capped at the catalogue size); users with fewer unseen items get fewer.
        chunk_users: users per part; bounds the memory of one chunk.
        exclude: "all" leaves out every known interaction (train, valid and test items), the
            usual choice for serving; "train" only the training items.
        retrieval: "recommend" ranks with the model's ``recommend``; "index" with an exact (or
            configured) FAISS inner-product index over ``acfrec.index.model_vectors``; "auto"
            uses the index when the model has user and item vectors.
        index: ``acfrec.index.IndexConfig`` options for the index (default: exact flat).
    """

    k: int = 10
    chunk_users: int = 10_000
    exclude: str = "all"
    retrieval: str = "auto"
    index: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.k < 1 or self.chunk_users < 1:
            raise DataValidationError(f"top-N k and chunk_users must be >= 1, got k={self.k}, chunk_users={self.chunk_users}")
        if self.exclude not in ("all", "train"):
            raise DataValidationError(f"top-N exclude must be 'all' or 'train', got {self.exclude!r}")
        if self.retrieval not in ("auto", "recommend", "index"):
            raise DataValidationError(f"top-N retrieval must be 'auto', 'recommend' or 'index', got {self.retrieval!r}")


def part_ranges(n_users: int, chunk_users: int) -> list[tuple[int, int]]:
    """``[(first_user, stop_user), ...]``: the users of each part, in order."""
    return [(start, min(start + chunk_users, n_users)) for start in range(0, n_users, chunk_users)]


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def write_topn(
    model: Recommender,
    split: Split,
    out: str | Path,
    settings: TopnSettings | None = None,
    *,
    key: str | None = None,
    progress: bool = True,
    on_part: PartCallback | None = None,
) -> dict[str, Any]:
    """Write the top-N of every user of ``split`` to folder ``out``; returns the manifest.

    Resumes a killed run of the same job (same ``key``) from its complete parts. ``key``
    identifies the job's inputs; by default it is derived from the split, the settings, the model
    class and config and a sample of its scores (so a retrained model does not reuse old parts).
    """
    settings = settings or TopnSettings()
    settings.check()
    out = Path(out)
    key = key or default_key(model, split, settings)
    ranges = part_ranges(split.n_users, settings.chunk_users)
    finished = finished_manifest(out, key)
    if finished is not None:
        return finished
    prepare_folder(out, len(ranges))
    write_parts(model, split, out, settings, key, range(len(ranges)), progress=progress, on_part=on_part)
    return write_manifest(out, key, split, settings, retrieval_kind(model, settings))


def default_key(model: Recommender, split: Split, settings: TopnSettings) -> str:
    users = np.arange(min(8, split.n_users), dtype=np.int64)
    sample = model.score_all(users).detach().cpu().numpy().astype(np.float32)
    identity = {
        "model": model.name,
        "config": dataclasses.asdict(model.config),
        "scores": hashlib.sha256(sample.tobytes()).hexdigest(),
        "split": split.fingerprint,
        "settings": dataclasses.asdict(settings),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def prepare_folder(out: Path, n_parts: int) -> None:
    """Drop what a previous run may have left that is not a reusable part.

    Removes the manifest (rewritten last), temporary files of interrupted writes, and parts
    beyond ``n_parts`` (from a job with smaller chunks).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for path in out.iterdir():
        stale_temp = path.name.startswith(".part-") and path.name.endswith(".tmp")
        if stale_temp or (path.name.startswith("part-") and _part_index(path) >= n_parts):
            path.unlink(missing_ok=True)


def write_parts(
    model: Recommender,
    split: Split,
    out: Path,
    settings: TopnSettings,
    key: str,
    parts: Iterable[int],
    *,
    progress: bool = True,
    on_part: PartCallback | None = None,
) -> list[int]:
    """Compute and write the given parts that are not already complete; returns those written."""
    from tqdm.auto import tqdm

    ranges = part_ranges(split.n_users, settings.chunk_users)
    todo = [part for part in parts if part_record(out, part, key, ranges[part]) is None]
    ranker: _Ranker | None = None
    for part in tqdm(todo, desc="top-N parts", unit="part", disable=not progress):
        ranker = ranker or _Ranker(model, split, settings)
        users = np.arange(*ranges[part], dtype=np.int64)
        _write_part(out, part, key, ranges[part], _part_frame(split, ranker.items, users, *ranker.top(users)))
        if on_part is not None:
            on_part(part)
    return todo


def part_record(out: Path, part: int, key: str, users: tuple[int, int]) -> dict[str, Any] | None:
    """The sidecar of a complete part of this job (checksum verified), else None."""
    sidecar, parquet = out / f"part-{part:05d}.json", out / part_name(part)
    if not (sidecar.is_file() and parquet.is_file()):
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("key") != key or [record.get("first_user"), record.get("stop_user")] != list(users):
        return None
    return record if file_sha256(parquet) == record.get("sha256") else None


def finished_manifest(out: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a finished run of this job when every part still verifies, else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("key") != key:
        return None
    for entry in manifest.get("parts", []):
        if not (out / entry["file"]).is_file() or file_sha256(out / entry["file"]) != entry["sha256"]:
            return None
    return manifest


def write_manifest(out: Path, key: str, split: Split, settings: TopnSettings, retrieval: str) -> dict[str, Any]:
    """Check that every part is complete, then write ``manifest.json`` (last, atomically)."""
    entries = []
    for part, users in enumerate(part_ranges(split.n_users, settings.chunk_users)):
        record = part_record(out, part, key, users)
        if record is None:
            raise ArtifactError(f"{out / part_name(part)} is missing or does not match its checksum; rerun the top-N job")
        entries.append({"file": part_name(part), **{k: record[k] for k in ("first_user", "stop_user", "rows", "users", "sha256")}})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "n_users": split.n_users,
        "n_items": split.n_items,
        "users_with_rows": sum(e["users"] for e in entries),
        "rows": sum(e["rows"] for e in entries),
        "columns": list(COLUMNS),
        "settings": {**dataclasses.asdict(settings), "retrieval": retrieval},
        "parts": entries,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_topn(out: str | Path) -> pl.DataFrame:
    """Every part listed in the manifest of a finished top-N folder, as one polars frame."""
    import polars as pl

    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise ArtifactError(f"{out} holds no finished top-N output: {MANIFEST} is missing")
    manifest = json.loads((out / MANIFEST).read_text())
    return pl.concat([pl.read_parquet(out / entry["file"]) for entry in manifest["parts"]])


def retrieval_kind(model: Recommender, settings: TopnSettings) -> str:
    """"index" or "recommend": what ``settings.retrieval`` resolves to for ``model``."""
    has_vectors = all(hasattr(model, a) for a in ("user_vectors", "item_vectors")) or all(
        hasattr(model, a) for a in ("user_factors", "item_factors")
    )
    if settings.retrieval == "index" and not has_vectors:
        raise DataValidationError(
            f"top-N retrieval 'index' needs a model with user and item vectors; {model.name} has none "
            "(use retrieval: recommend or auto)"
        )
    return "index" if settings.retrieval == "index" or (settings.retrieval == "auto" and has_vectors) else "recommend"


# --------------------------------------------------------------------------- one part
class _Ranker:
    """Top-k unseen items of a chunk of users, by the model's recommend or by a FAISS index."""

    def __init__(self, model: Recommender, split: Split, settings: TopnSettings) -> None:
        from acfrec.data.cold import widen

        # A model may know more items than the split: items added from content after training.
        self.model, self.k = model, min(settings.k, model.n_items)
        self.excluded = widen(excluded_items(split, settings.exclude), model.n_items)
        self.items = split.items
        if model.n_items > split.n_items:
            self.items = model.items
            known = None if model.items is None else model.items.external_ids[: split.n_items]
            if known is None or list(known) != list(split.items.external_ids):
                raise DataValidationError(
                    f"the model knows {model.n_items} items but its first {split.n_items} are not the split's items: "
                    "top-N needs the model trained on this split (with items added after it)"
                )
        self.index = None
        if retrieval_kind(model, settings) == "index":
            from acfrec.index import IndexConfig, ItemIndex, model_vectors

            _, item_vectors = model_vectors(model, np.zeros(1, dtype=np.int64))
            self.index = ItemIndex.build(item_vectors, params=IndexConfig(**settings.index))

    def top(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(items, scores)``, each ``(len(users), k)``; item -1 pads users with too few unseen items."""
        if self.index is None:
            return self.model.recommend(users, k=self.k, exclude_seen=False, exclude=self.excluded)
        from acfrec.index import model_vectors

        queries, _ = model_vectors(self.model, users)
        return self.index.search(queries, self.k, exclude=self.excluded[users])


def excluded_items(split: Split, exclude: str) -> sp.csr_matrix:
    """``(n_users, n_items)`` CSR of the items never recommended: training (and held-out) items."""
    import scipy.sparse as sp

    if exclude == "train":
        return split.train
    rows = np.flatnonzero(split.test_items >= 0)
    test = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, split.test_items[rows])), shape=split.train.shape
    )
    return (split.seen("test") + test).tocsr()


def _part_frame(split: Split, item_ids: IdMap, users: np.ndarray, items: np.ndarray, scores: np.ndarray) -> pl.DataFrame:
    """Rows ``user, rank, item, score`` (external ids, rank 0 = top) of ``(n, k)`` results."""
    import polars as pl

    keep = items >= 0
    ranks = np.broadcast_to(np.arange(items.shape[1], dtype=np.int64), items.shape)
    return pl.DataFrame(
        {
            "user": split.users.to_external(np.broadcast_to(users[:, None], items.shape)[keep]).tolist(),
            "rank": ranks[keep],
            "item": item_ids.to_external(items[keep]).tolist(),
            "score": np.asarray(scores, dtype=np.float32)[keep],
        },
        schema={"user": pl.String, "rank": pl.Int64, "item": pl.String, "score": pl.Float32},
    )


def _write_part(out: Path, part: int, key: str, users: tuple[int, int], frame: pl.DataFrame) -> None:
    parquet = out / part_name(part)
    with atomic_file(parquet) as tmp:
        frame.write_parquet(tmp)
    record = {
        "key": key,
        "part": part,
        "first_user": users[0],
        "stop_user": users[1],
        "rows": frame.height,
        "users": frame["user"].n_unique(),
        "sha256": file_sha256(parquet),
    }
    atomic_write_text(out / f"part-{part:05d}.json", json.dumps(record, indent=1))


def _part_index(path: Path) -> int:
    digits = path.name[len("part-") :].split(".")[0]
    return int(digits) if digits.isdigit() else -1
