"""Stable maps between external ids (strings) and dense int64 indices.

Inside the library users and items are dense indices ``0..n-1``; external ids exist only at the
edge (api, cli, pipelines). External ids are always stored as strings, so ``196`` read from a
file and ``"196"`` typed by a user are the same id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from acfrec.errors import ArtifactError, DataValidationError, UnknownIdError
from acfrec.utils import atomic_write_text


class IdMap:
    """Bijection external id (str) <-> dense index (int64).

    ``kind`` ("user" or "item") only serves error messages.
    """

    def __init__(self, external_ids: Iterable[object], kind: str = "id") -> None:
        ids = np.asarray([str(x) for x in external_ids], dtype=object)
        self.kind = kind
        self._external = ids
        self._index = {x: i for i, x in enumerate(ids.tolist())}
        if len(self._index) != len(ids):
            seen: set[str] = set()
            duplicate = next(x for x in ids.tolist() if x in seen or seen.add(x))
            raise DataValidationError(f"{kind} id map: duplicate external id {duplicate!r}")

    def __len__(self) -> int:
        return len(self._external)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and np.array_equal(self._external, other._external)

    def __contains__(self, external_id: object) -> bool:
        return str(external_id) in self._index

    def __repr__(self) -> str:
        return f"IdMap(kind={self.kind!r}, n={len(self)})"

    @property
    def external_ids(self) -> np.ndarray:
        """External ids in index order, ``(n,)`` object array of str."""
        return self._external

    def to_index(self, external_ids: Sequence[object] | object) -> np.ndarray:
        """External ids -> ``(n,)`` int64 indices; raises UnknownIdError naming the first unknown id."""
        single = isinstance(external_ids, (str, int, np.integer))
        values = [external_ids] if single else list(external_ids)  # type: ignore[arg-type]
        out = np.empty(len(values), dtype=np.int64)
        for position, value in enumerate(values):
            index = self._index.get(str(value))
            if index is None:
                raise UnknownIdError(
                    f"unknown {self.kind} id {str(value)!r} (position {position}); "
                    f"the model knows {len(self)} {self.kind}s"
                )
            out[position] = index
        return out

    def to_external(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Dense indices -> ``(n,)`` object array of external ids; raises UnknownIdError when out of range."""
        indices = np.asarray(indices, dtype=np.int64)
        check_indices(indices, len(self), self.kind)
        return self._external[indices]

    def save(self, path: str | Path) -> None:
        """Write as JSON ``{"kind": ..., "ids": [...]}``, atomically."""
        atomic_write_text(Path(path), json.dumps({"kind": self.kind, "ids": self._external.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> IdMap:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
            return cls(payload["ids"], kind=payload.get("kind", "id"))
        except FileNotFoundError as error:
            raise ArtifactError(f"id map file {path} is missing") from error
        except (KeyError, json.JSONDecodeError) as error:
            raise ArtifactError(f"id map file {path} is not a valid acfrec id map: {error}") from error


def check_indices(indices: np.ndarray, n: int, kind: str) -> None:
    """Raise UnknownIdError if any dense index is outside ``[0, n)``."""
    if indices.size == 0:
        return
    bad = np.flatnonzero((indices < 0) | (indices >= n))
    if bad.size:
        raise UnknownIdError(
            f"{kind} index {int(indices.flat[bad[0]])} (position {int(bad[0])}) is out of range: "
            f"there are {n} {kind}s (0..{n - 1})"
        )
