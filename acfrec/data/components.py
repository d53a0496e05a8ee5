"""On-disk store of item components (frames, regions, sentences) and built-in featurisers.

An item is a bag of components; each component is a ``dim``-vector produced by an encoder. The
store keeps them ragged: one ``(n_components_total, dim)`` matrix (``components.npy``, opened
memory-mapped) and ``offsets`` ``(n_items + 1,)`` so item ``k`` owns rows
``offsets[k]:offsets[k + 1]``. Items are named by external id (an :class:`IdMap`), so a store
written once serves any split of the same catalogue; :meth:`ComponentStore.align` maps it onto a
model's dense item indices as a padded tensor plus mask.

Folder layout (written atomically)::

    meta.json        format_version, encoder, encoder_config, dim, dtype, n_items, n_components, created
    components.npy   (n_components_total, dim) float16 | float32
    offsets.npy      (n_items + 1,) int64
    items.json       IdMap of the items, in store order
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from acfrec.data.idmap import IdMap
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.utils import atomic_dir

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
_DTYPES = ("float16", "float32")
_MATRIX, _OFFSETS, _ITEMS, _META = "components.npy", "offsets.npy", "items.json", "meta.json"
# Rows checked for NaN/inf at once: bounds the memory of validating a big memory-mapped matrix.
_CHECK_ROWS = 1 << 16

ComponentsInput = Sequence[np.ndarray] | tuple[np.ndarray, np.ndarray]


@dataclass
class AlignedComponents:
    """Components laid out on a model's dense item indices.

    Attributes:
        features: ``(n_items, max_components, dim)`` float32, zero where masked.
        mask: ``(n_items, max_components)`` bool, True for a real component. An all-False row
            is an item without content.
        n_missing: model items absent from the store (all-False mask).
        n_unknown: store items the model does not know (ignored).
        n_truncated: items that had more than ``max_components`` components (the first
            ``max_components`` are kept, so component ``m`` is the item's ``m``-th component).
    """

    features: torch.Tensor
    mask: torch.Tensor
    n_missing: int = 0
    n_unknown: int = 0
    n_truncated: int = 0

    def __post_init__(self) -> None:
        self.features = torch.as_tensor(self.features, dtype=torch.float32)
        self.mask = torch.as_tensor(self.mask, dtype=torch.bool)
        if self.features.ndim != 3 or self.mask.shape != self.features.shape[:2]:
            raise DataValidationError(
                "aligned components need features (n_items, max_components, dim) and mask "
                f"(n_items, max_components); got {tuple(self.features.shape)} and {tuple(self.mask.shape)}"
            )
        if not torch.isfinite(self.features).all():
            raise DataValidationError("aligned component features contain NaN or inf")

    @property
    def n_items(self) -> int:
        return int(self.features.shape[0])

    @property
    def max_components(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    @property
    def has_content(self) -> torch.Tensor:
        """``(n_items,)`` bool, True where the item has at least one component."""
        return self.mask.any(dim=1)

    def truncate(self, max_components: int) -> AlignedComponents:
        """Keep at most the first ``max_components`` components of every item."""
        if max_components >= self.max_components:
            return self
        dropped = int(self.mask[:, max_components:].any(dim=1).sum())
        return AlignedComponents(
            self.features[:, :max_components].contiguous(),
            self.mask[:, :max_components].contiguous(),
            self.n_missing,
            self.n_unknown,
            self.n_truncated + dropped,
        )


class ComponentStore:
    """A read-only, validated component store; build one with :meth:`write`, read with :meth:`open`."""

    def __init__(self, path: Path, matrix: np.ndarray, offsets: np.ndarray, items: IdMap, meta: dict) -> None:
        self.path = path
        self.matrix = matrix
        self.offsets = offsets
        self.items = items
        self.meta = meta

    def __repr__(self) -> str:
        return (
            f"ComponentStore({str(self.path)!r}, n_items={self.n_items}, "
            f"n_components={self.n_components}, dim={self.dim}, dtype={self.matrix.dtype})"
        )

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_components(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def counts(self) -> np.ndarray:
        """``(n_items,)`` int64 number of components of each store item."""
        return np.diff(self.offsets)

    def item_components(self, item_id: object) -> np.ndarray:
        """``(n_m, dim)`` components of one item, by external id (raises UnknownIdError)."""
        index = int(self.items.to_index(item_id)[0])
        return np.asarray(self.matrix[self.offsets[index] : self.offsets[index + 1]])

    # ---------------------------------------------------------------- writing
    @classmethod
    def write(
        cls,
        path: str | Path,
        item_ids: Sequence[object],
        components: ComponentsInput,
        meta: dict[str, Any] | None = None,
        dtype: str = "float32",
    ) -> ComponentStore:
        """Validate and write a store atomically, then open it.

        Args:
            item_ids: ``(n_items,)`` external ids, distinct.
            components: a list of ``(n_m, dim)`` arrays (one per item, ``n_m`` may be 0), or a
                ``(matrix, offsets)`` pair with matrix ``(n_components_total, dim)`` and offsets
                ``(n_items + 1,)``.
            meta: encoder description; keys ``encoder`` (name) and ``encoder_config`` (dict) are
                recorded, any other key is kept as is.
            dtype: on-disk dtype, "float16" or "float32".
        """
        path = Path(path)
        if dtype not in _DTYPES:
            raise DataValidationError(f"component store {path}: dtype must be one of {_DTYPES}, got {dtype!r}")
        items = IdMap(item_ids, kind="item")
        matrix, offsets = _as_ragged(components, len(items), path)
        _check_offsets(offsets, matrix.shape[0], path / _OFFSETS)
        _check_finite(matrix, offsets, path / _MATRIX)
        with np.errstate(over="ignore"):  # overflow is reported just below, with its row
            stored = matrix.astype(dtype)
        if dtype == "float16":
            _check_finite(stored, offsets, path / _MATRIX, what="after conversion to float16")
        meta = dict(meta or {})
        meta.update(
            format_version=STORE_FORMAT_VERSION,
            encoder=meta.get("encoder", "unknown"),
            encoder_config=meta.get("encoder_config", {}),
            dim=int(matrix.shape[1]),
            dtype=dtype,
            n_items=len(items),
            n_components=int(matrix.shape[0]),
            created=meta.get("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
        )
        with atomic_dir(path) as tmp:
            np.save(tmp / _MATRIX, stored)
            np.save(tmp / _OFFSETS, offsets)
            items.save(tmp / _ITEMS)
            (tmp / _META).write_text(json.dumps(meta, indent=2, default=str))
        return cls.open(path)

    # ---------------------------------------------------------------- reading
    @classmethod
    def open(cls, path: str | Path) -> ComponentStore:
        """Open a store memory-mapped and validate it against its ``meta.json``.

        Raises ArtifactError naming the file at fault: missing files, dim/dtype disagreeing with
        the metadata, offsets not monotone or not ending at the matrix's row count, NaN/inf
        (naming the first bad row and its item).
        """
        path = Path(path)
        for name in (_META, _MATRIX, _OFFSETS, _ITEMS):
            if not (path / name).is_file():
                raise ArtifactError(f"component store {path} is incomplete: {name} is missing")
        try:
            meta = json.loads((path / _META).read_text())
        except json.JSONDecodeError as error:
            raise ArtifactError(f"{path / _META} is not valid JSON: {error}") from error
        version = meta.get("format_version")
        if version != STORE_FORMAT_VERSION:
            raise ArtifactError(
                f"{path / _META}: format_version {version!r} is not supported (expected {STORE_FORMAT_VERSION})"
            )
        try:
            matrix = np.load(path / _MATRIX, mmap_mode="r")
            offsets = np.load(path / _OFFSETS)
        except ValueError as error:
            raise ArtifactError(f"component store {path}: cannot read arrays: {error}") from error
        items = IdMap.load(path / _ITEMS)
        _check_matrix_meta(matrix, meta, path / _MATRIX)
        if offsets.shape != (len(items) + 1,) or offsets.dtype.kind not in "iu":
            raise ArtifactError(
                f"{path / _OFFSETS}: expected integer offsets of shape (n_items + 1,) = ({len(items) + 1},) "
                f"for the {len(items)} items of {_ITEMS}, got {offsets.dtype} {offsets.shape}"
            )
        offsets = offsets.astype(np.int64)
        _check_offsets(offsets, matrix.shape[0], path / _OFFSETS, error=ArtifactError)
        _check_finite(matrix, offsets, path / _MATRIX, error=ArtifactError, items=items)
        return cls(path, matrix, offsets, items, meta)

    # -------------------------------------------------------------- alignment
    def align(self, items: IdMap, max_components: int) -> AlignedComponents:
        """Lay the store out on a model's item indices.

        Args:
            items: the model's item id map (dense index -> external id).
            max_components: components kept per item (the first ones).
        Returns:
            :class:`AlignedComponents` with features ``(len(items), width, dim)``, ``width`` =
            ``min(max_components, most components of any model item)``.
            Model items missing from the store get an all-False mask (logged as a warning with
            the count); store items the model does not know are counted and ignored.
        """
        if max_components < 1:
            raise DataValidationError(f"max_components must be >= 1, got {max_components}")
        store_index = pd.Index(self.items.external_ids).get_indexer(pd.Index(items.external_ids))
        present = store_index >= 0
        n_missing = int((~present).sum())
        n_unknown = self.n_items - int(present.sum())
        if n_missing:
            logger.warning(
                "component store %s has no components for %d of %d model items; they use the no-content path",
                self.path, n_missing, len(items),
            )
        counts = np.where(present, self.counts()[np.maximum(store_index, 0)], 0)
        # Pad only as wide as the widest item needs (at least one slot, so shapes stay 3-d).
        max_components = int(max(1, min(max_components, counts.max(initial=0))))
        kept = np.minimum(counts, max_components)
        rows = np.repeat(np.arange(len(items)), kept)
        # Position of each kept component inside its item: running index minus the item's start.
        starts = np.repeat(np.cumsum(kept) - kept, kept)
        slots = np.arange(rows.size) - starts
        source = self.offsets[store_index[rows]] + slots
        features = np.zeros((len(items), max_components, self.dim), dtype=np.float32)
        mask = np.zeros((len(items), max_components), dtype=bool)
        features[rows, slots] = self.matrix[source]
        mask[rows, slots] = True
        return AlignedComponents(
            torch.from_numpy(features), torch.from_numpy(mask), n_missing, n_unknown, int((counts > kept).sum())
        )


# -------------------------------------------------------------------- checks
def _as_ragged(components: ComponentsInput, n_items: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Either input form -> ``(matrix (n_total, dim) float32, offsets (n_items + 1,) int64)``."""
    if isinstance(components, tuple) and len(components) == 2 and np.ndim(components[1]) == 1:
        matrix = np.asarray(components[0])
        offsets = np.asarray(components[1])
        if offsets.dtype.kind not in "iu":
            raise DataValidationError(f"component store {path}: offsets must be integers, got {offsets.dtype}")
        offsets = offsets.astype(np.int64)
        if offsets.shape != (n_items + 1,):
            raise DataValidationError(
                f"component store {path}: offsets must have shape (n_items + 1,) = ({n_items + 1},), "
                f"got {offsets.shape}"
            )
    else:
        arrays = [np.asarray(c) for c in components]
        if len(arrays) != n_items:
            raise DataValidationError(
                f"component store {path}: {len(arrays)} component arrays for {n_items} item ids"
            )
        dim = next((a.shape[1] for a in arrays if a.ndim == 2), 0)
        bad = next((k for k, a in enumerate(arrays) if a.ndim != 2 or a.shape[1] != dim), None)
        if bad is not None:
            raise DataValidationError(
                f"component store {path}: item {bad} has components of shape {arrays[bad].shape}; "
                f"every item needs (n_m, dim) with the dim of the first item ({dim})"
            )
        offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int64)
        matrix = np.concatenate(arrays, axis=0) if arrays else np.zeros((0, dim))
    if matrix.ndim != 2 or matrix.shape[1] < 1:
        raise DataValidationError(
            f"component store {path}: the component matrix must be (n_components_total, dim>=1), got {matrix.shape}"
        )
    if matrix.dtype.kind not in "fiu":
        raise DataValidationError(f"component store {path}: components must be numeric, got {matrix.dtype}")
    return matrix.astype(np.float32, copy=False), offsets


def _check_offsets(offsets: np.ndarray, n_rows: int, file: Path, error: type[Exception] = DataValidationError) -> None:
    if offsets[0] != 0:
        raise error(f"{file}: offsets must start at 0, got {int(offsets[0])}")
    steps = np.diff(offsets)
    if (steps < 0).any():
        item = int(np.flatnonzero(steps < 0)[0])
        raise error(
            f"{file}: offsets decrease at item {item} ({int(offsets[item])} -> {int(offsets[item + 1])}); "
            "they must be non-decreasing"
        )
    if offsets[-1] != n_rows:
        raise error(f"{file}: offsets end at {int(offsets[-1])} but the component matrix has {n_rows} rows")


def _check_matrix_meta(matrix: np.ndarray, meta: dict, file: Path) -> None:
    if matrix.ndim != 2:
        raise ArtifactError(f"{file}: expected a (n_components_total, dim) matrix, got shape {matrix.shape}")
    if meta.get("dim") != matrix.shape[1]:
        raise ArtifactError(f"{file}: component dim {matrix.shape[1]} disagrees with meta.json dim {meta.get('dim')}")
    if meta.get("dtype") != str(matrix.dtype) or str(matrix.dtype) not in _DTYPES:
        raise ArtifactError(
            f"{file}: dtype {matrix.dtype} disagrees with meta.json dtype {meta.get('dtype')!r} "
            f"(supported: {_DTYPES})"
        )
    if meta.get("n_components", matrix.shape[0]) != matrix.shape[0]:
        raise ArtifactError(
            f"{file}: {matrix.shape[0]} component rows but meta.json says n_components={meta['n_components']}"
        )


def _check_finite(
    matrix: np.ndarray,
    offsets: np.ndarray,
    file: Path,
    error: type[Exception] = DataValidationError,
    items: IdMap | None = None,
    what: str = "",
) -> None:
    """Scan in chunks of rows so a memory-mapped matrix is never loaded whole."""
    for start in range(0, matrix.shape[0], _CHECK_ROWS):
        block = np.asarray(matrix[start : start + _CHECK_ROWS])
        bad_rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if bad_rows.size:
            row = start + int(bad_rows[0])
            item = int(np.searchsorted(offsets, row, side="right") - 1)
            name = f" (id {items.external_ids[item]!r})" if items is not None else ""
            suffix = f" {what}" if what else ""
            raise error(f"{file}: NaN or inf in component row {row}, item {item}{name}{suffix}")


# --------------------------------------------------------------- featurisers
_TOKEN = re.compile(r"\w+")


def hashed_bow_sentences(
    texts_per_item: Sequence[Sequence[str]], dim: int = 256, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Hashed bag of words per sentence: one component per sentence.

    Tokens are lower-cased ``\\w+`` runs, hashed with a seeded crc32 into ``dim`` buckets with a
    hashed sign (so collisions cancel on average rather than pile up); each sentence vector is
    l2-normalised (an empty sentence stays zero).

    Args:
        texts_per_item: ``n_items`` lists of sentences.
    Returns:
        ``(matrix (n_sentences, dim) float32, offsets (n_items + 1,) int64)``, ready for
        :meth:`ComponentStore.write`.
    """
    if dim < 1:
        raise DataValidationError(f"dim must be >= 1, got {dim}")
    counts = np.array([len(sentences) for sentences in texts_per_item], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tokens = [_TOKEN.findall(s.lower()) for sentences in texts_per_item for s in sentences]
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    flat = [token for sentence in tokens for token in sentence]
    vocabulary, token_ids = np.unique(np.asarray(flat, dtype=object).astype(str), return_inverse=True)
    hashes = np.array([zlib.crc32(f"{seed}\x00{word}".encode()) for word in vocabulary.tolist()], dtype=np.int64)
    bucket = (hashes % dim)[token_ids]
    sign = np.where((hashes >> 31) & 1, -1.0, 1.0)[token_ids]
    matrix = np.zeros((len(tokens), dim), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(len(tokens)), lengths), bucket), sign)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    return matrix.astype(np.float32), offsets


def pca_pixels(frames: np.ndarray, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Principal-component features of image frames.

    Centred pixels projected on the top ``dim`` principal axes (exact, from the pixel Gram
    matrix, up to 4096 pixels; seeded ``torch.pca_lowrank`` beyond), each axis' sign fixed so its largest loading is
    positive (repeatable), and scaled by one global factor so the features have unit average
    variance per dimension (relative variances are kept).

    Args:
        frames: ``(n, h * w)`` or ``(n, h, w)`` pixels.
    Returns:
        ``(n, dim)`` float32.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames.reshape(frames.shape[0], -1)
    if frames.ndim != 2 or not 1 <= dim <= min(frames.shape):
        raise DataValidationError(
            f"pca_pixels needs frames (n, h*w) or (n, h, w) and 1 <= dim <= min(n, h*w); "
            f"got frames {frames.shape} and dim={dim}"
        )
    x = frames.astype(np.float64)
    x -= x.mean(axis=0)
    if x.shape[1] <= 4096:
        # Right singular vectors of x = eigenvectors of the (pixels, pixels) Gram matrix: cheap
        # when there are many more frames than pixels.
        _, vectors = np.linalg.eigh(x.T @ x)
        axes = vectors[:, ::-1][:, :dim]
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            _, _, v = torch.pca_lowrank(torch.from_numpy(x), q=min(dim + 10, min(x.shape)), center=False)
        axes = v[:, :dim].numpy()
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(dim)])
    projected = x @ (axes * np.where(signs == 0, 1.0, signs))
    scale = np.sqrt((projected**2).mean())
    return (projected / (scale if scale > 0 else 1.0)).astype(np.float32)
