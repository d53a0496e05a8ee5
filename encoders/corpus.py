"""Raw content an encoder trains on and encodes: images (or video frames) and texts.

An item owns a ragged run of raw pieces: the frames of a video (or the one image of a picture)
or the sentences of a text. ``offsets`` ``(n_items + 1,)`` says which: item ``k`` owns pieces
``offsets[k]:offsets[k + 1]`` (an item may own none). Encoders turn each item into
*components* (one vector per frame, per image region or per sentence), laid out the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _check_offsets(offsets: np.ndarray, n_pieces: int, what: str) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != n_pieces:
        raise ValueError(
            f"{what}: offsets must be (n_items + 1,) starting at 0 and ending at {n_pieces}, "
            f"got shape {offsets.shape} ending at {offsets[-1] if offsets.size else None}"
        )
    if np.any(np.diff(offsets) < 0):
        bad = int(np.flatnonzero(np.diff(offsets) < 0)[0])
        raise ValueError(f"{what}: offsets decrease at item position {bad}")
    return offsets


@dataclass
class ImageCorpus:
    """Images grouped into items.

    Attributes:
        images: ``(n_images, channels, height, width)`` uint8 pixels 0..255 (a
            ``(n_images, height, width)`` array is taken as one channel).
        offsets: ``(n_items + 1,)`` int64; item ``k`` owns ``images[offsets[k]:offsets[k+1]]``.
        item_ids: ``(n_items,)`` external ids (strings).
    """

    images: np.ndarray
    offsets: np.ndarray
    item_ids: list[str]

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4:
            raise ValueError(f"images must be (n, channels, height, width) or (n, height, width), got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 pixels 0..255, got dtype {images.dtype}")
        self.images = images
        self.offsets = _check_offsets(self.offsets, images.shape[0], "ImageCorpus")
        self.item_ids = [str(item) for item in self.item_ids]
        if len(self.item_ids) != self.offsets.size - 1:
            raise ValueError(f"ImageCorpus: {len(self.item_ids)} item ids for {self.offsets.size - 1} items")

    @classmethod
    def single_images(cls, images: np.ndarray, item_ids: Sequence[str] | None = None) -> ImageCorpus:
        """One image per item."""
        n = int(np.asarray(images).shape[0])
        ids = [str(i) for i in range(n)] if item_ids is None else list(item_ids)
        return cls(images, np.arange(n + 1, dtype=np.int64), ids)

    @property
    def n_items(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, items: np.ndarray) -> ImageCorpus:
        """The corpus of the items at positions ``items`` (e.g. a held-out part)."""
        items = np.asarray(items, dtype=np.int64)
        counts = self.offsets[items + 1] - self.offsets[items]
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in items]) if items.size else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return ImageCorpus(self.images[rows], offsets, [self.item_ids[i] for i in items])


@dataclass
class TextCorpus:
    """Texts as lists of sentences.

    Attributes:
        documents: ``n_items`` lists of sentences (strings); a document may be empty.
        item_ids: ``(n_items,)`` external ids (strings).
    """

    documents: list[list[str]]
    item_ids: list[str]

    def __post_init__(self) -> None:
        self.documents = [[str(s) for s in doc] for doc in self.documents]
        self.item_ids = [str(item) for item in self.item_ids]
        if len(self.item_ids) != len(self.documents):
            raise ValueError(f"TextCorpus: {len(self.item_ids)} item ids for {len(self.documents)} documents")

    @property
    def n_items(self) -> int:
        return len(self.documents)

    @property
    def sentences(self) -> list[str]:
        """Every sentence, item after item."""
        return [s for doc in self.documents for s in doc]

    @property
    def offsets(self) -> np.ndarray:
        """``(n_items + 1,)`` sentence offsets per item."""
        return np.concatenate([[0], np.cumsum([len(d) for d in self.documents])]).astype(np.int64)

    def subset(self, items: np.ndarray) -> TextCorpus:
        items = np.asarray(items, dtype=np.int64)
        return TextCorpus([self.documents[i] for i in items], [self.item_ids[i] for i in items])


Corpus = ImageCorpus | TextCorpus


@dataclass
class Components:
    """What :meth:`encoders.Encoder.encode` returns, ready for acfrec's component store.

    Attributes:
        matrix: ``(n_components_total, output_dim)`` float32.
        offsets: ``(n_items + 1,)`` int64; item ``k`` owns ``matrix[offsets[k]:offsets[k+1]]``.
        item_ids: ``(n_items,)`` external ids.
    """

    matrix: np.ndarray
    offsets: np.ndarray
    item_ids: list[str]

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float32)
        if self.matrix.ndim != 2:
            raise ValueError(f"Components.matrix must be (n_components, dim), got {self.matrix.shape}")
        self.offsets = _check_offsets(self.offsets, self.matrix.shape[0], "Components")
        if len(self.item_ids) != self.offsets.size - 1:
            raise ValueError(f"Components: {len(self.item_ids)} item ids for {self.offsets.size - 1} items")

    def of(self, item: int) -> np.ndarray:
        """``(n_m, dim)`` components of the item at position ``item``."""
        return self.matrix[self.offsets[item] : self.offsets[item + 1]]
