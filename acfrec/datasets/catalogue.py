"""A planted-preference multimedia catalogue whose item components are real images.

Every item is a short "video": a few frames, each a real handwritten-digit image (scikit-learn's
``load_digits`` by default, or MNIST from :func:`load_mnist_idx`). An item has a dominant digit
class and some distractor frames of other classes. Every user likes a few classes and chooses
items by how much of their frames show a liked class (plus popularity and uniform noise), so the
signal a content model can find lives in *some* frames of an item, not all: the setting component
attention is for. The ground truth (class of every frame, classes of every user) is kept, so one
can check where a model's component attention goes.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from acfrec.errors import DataValidationError

if TYPE_CHECKING:
    from acfrec.data.components import ComponentStore

_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049


@dataclass(frozen=True)
class CatalogueTruth:
    """What generated the catalogue. Dense item ``k`` is ``i{k}``, user ``k`` is ``u{k}``.

    Attributes:
        frame_class: ``(n_frames,)`` int64 digit class of every frame.
        frame_image: ``(n_frames,)`` int64 row of the source image set each frame was taken from.
        item_class: ``(n_items,)`` int64 dominant class of every item.
        user_classes: ``(n_users, n_classes)`` bool, True for a liked class.
        affinity: ``(n_users, n_items)`` float64 share of the item's frames in a liked class.
        noise: ``(n_interactions,)`` bool, True for interactions drawn uniformly at random
            (aligned with the rows of :attr:`Catalogue.interactions`).
    """

    frame_class: np.ndarray
    frame_image: np.ndarray
    item_class: np.ndarray
    user_classes: np.ndarray
    affinity: np.ndarray
    noise: np.ndarray

    def liked_frames(self, users: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Whether each frame's class is liked by its user; ``frames`` may hold -1 padding (False).

        Args:
            users: ``(batch,)`` dense user indices.
            frames: ``(batch, ...)`` frame indices.
        Returns:
            bool array shaped like ``frames``.
        """
        users = np.asarray(users, dtype=np.int64)
        frames = np.asarray(frames, dtype=np.int64)
        rows = users.reshape((-1,) + (1,) * (frames.ndim - 1))
        liked = self.user_classes[rows, self.frame_class[np.maximum(frames, 0)]]
        return liked & (frames >= 0)


@dataclass(frozen=True)
class Catalogue:
    """A generated multimedia catalogue.

    Attributes:
        interactions: columns ``user`` (str ``u0``...), ``item`` (str ``i0``...), ``timestamp``
            (int64, increasing along each user's history), sorted by user index then time.
        frames: ``(n_frames, h, w)`` uint8 pixels (0..255).
        item_offsets: ``(n_items + 1,)`` int64; item ``k`` owns frames ``item_offsets[k]:item_offsets[k+1]``.
        item_ids: ``(n_items,)`` external item ids (``i{k}``), in dense order.
        truth: the generating :class:`CatalogueTruth`.
    """

    interactions: pl.DataFrame
    frames: np.ndarray
    item_offsets: np.ndarray
    item_ids: np.ndarray
    truth: CatalogueTruth

    @property
    def n_items(self) -> int:
        return int(self.item_offsets.size - 1)

    def frame_features(self, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-PCA features of every frame: ``(matrix (n_frames, dim), offsets (n_items + 1,))``."""
        from acfrec.data.components import pca_pixels

        return pca_pixels(self.frames, dim=dim, seed=seed), self.item_offsets

    def write_store(self, path: str | Path, dim: int = 32, seed: int = 0) -> ComponentStore:
        """Write the pixel-PCA frame features as a :class:`~acfrec.data.components.ComponentStore`."""
        from acfrec.data.components import ComponentStore

        meta = {"encoder": "pca_pixels", "encoder_config": {"dim": dim, "seed": seed}}
        return ComponentStore.write(path, self.item_ids, self.frame_features(dim, seed), meta=meta)


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package): ``(n, 8, 8)`` uint8, ``(n,)`` labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def load_mnist_idx(images_path: str | Path, labels_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read MNIST in the original IDX format (gzipped or not).

    Args:
        images_path: e.g. ``t10k-images-idx3-ubyte.gz``.
        labels_path: defaults to the sibling file with ``images-idx3`` replaced by ``labels-idx1``.
    Returns:
        ``images (n, 28, 28)`` uint8 and ``labels (n,)`` int64.
    """
    images_path = Path(images_path)
    if labels_path is None:
        labels_path = images_path.with_name(images_path.name.replace("images-idx3", "labels-idx1"))
    labels_path = Path(labels_path)
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1).astype(np.int64)
    if labels.shape[0] != images.shape[0]:
        raise DataValidationError(
            f"{labels_path} has {labels.shape[0]} labels but {images_path} has {images.shape[0]} images"
        )
    return images, labels


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise DataValidationError(f"IDX file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataValidationError(f"cannot read IDX file {path}: {error}") from error
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataValidationError(f"{path}: not an IDX file with magic {magic} (found {found})")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(shape)):
        raise DataValidationError(f"{path}: header says shape {shape} but holds {body.size} values")
    return body.reshape(shape)


def planted_catalogue(
    n_users: int = 500,
    n_items: int = 300,
    n_classes: int = 10,
    frames_per_item: tuple[int, int] = (3, 6),
    seed: int = 0,
    images: tuple[np.ndarray, np.ndarray] | None = None,
    classes_per_user: int = 2,
    dominant_share: float = 0.5,
    interactions_per_user: tuple[int, int] = (10, 30),
    preference_strength: float = 6.0,
    popularity_skew: float = 0.8,
    noise: float = 0.15,
) -> Catalogue:
    """Generate a seeded catalogue of digit "videos" and planted-preference interactions.

    Args:
        frames_per_item: inclusive ``(low, high)`` range of frames per item.
        images: ``(images (n, h, w), labels (n,))``; defaults to scikit-learn's digits.
        classes_per_user: liked classes per user.
        dominant_share: probability that a frame shows its item's dominant class; the other
            frames show a uniformly drawn other class.
        interactions_per_user: inclusive range of distinct items per user.
        preference_strength: logit gain per unit of liked-frame share.
        popularity_skew: Zipf exponent of item popularity (0: none).
        noise: share of a user's interactions drawn uniformly, ignoring preferences.
    Returns:
        :class:`Catalogue`; the same arguments give the same catalogue.
    """
    if images is None:
        images = load_digits_images()
    pixels, labels = _check_catalogue_args(
        images, n_users, n_items, n_classes, frames_per_item, classes_per_user, dominant_share,
        interactions_per_user, noise,
    )
    rng = np.random.default_rng(seed)
    item_class = rng.permutation(np.arange(n_items, dtype=np.int64) % n_classes)
    n_frames = rng.integers(frames_per_item[0], frames_per_item[1] + 1, size=n_items)
    offsets = np.concatenate([[0], np.cumsum(n_frames)]).astype(np.int64)
    frame_item = np.repeat(np.arange(n_items), n_frames)
    # A distractor is "dominant + a non-zero shift": uniform over the other classes.
    shift = rng.integers(1, n_classes, size=frame_item.size)
    dominant = rng.random(frame_item.size) < dominant_share
    frame_class = np.where(dominant, item_class[frame_item], (item_class[frame_item] + shift) % n_classes)
    frame_image = _draw_images(rng, labels, frame_class)

    user_classes = np.zeros((n_users, n_classes), dtype=bool)
    liked = np.argsort(rng.random((n_users, n_classes)), axis=1)[:, :classes_per_user]
    np.put_along_axis(user_classes, liked, True, axis=1)
    class_share = np.zeros((n_items, n_classes))
    np.add.at(class_share, (frame_item, frame_class), 1.0)
    class_share /= n_frames[:, None]
    affinity = user_classes.astype(np.float64) @ class_share.T

    counts = rng.integers(interactions_per_user[0], interactions_per_user[1] + 1, size=n_users)
    popularity = -popularity_skew * np.log1p(rng.permutation(n_items))
    items, is_noise = _choose_items(rng, preference_strength * affinity + popularity, counts, noise)
    users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    # Random order along each user's history, then strictly increasing timestamps.
    order = np.lexsort((rng.random(users.size), users))
    items, is_noise = items[order], is_noise[order]
    gaps = rng.integers(60, 86_400, size=users.size)
    timestamps = 1_000_000_000 + rng.integers(0, 10**7, size=n_users)[users] + _cumsum_within(gaps, counts)
    interactions = pl.DataFrame(
        {
            "user": np.char.add("u", users.astype(str)),
            "item": np.char.add("i", items.astype(str)),
            "timestamp": timestamps,
        },
        schema={"user": pl.String, "item": pl.String, "timestamp": pl.Int64},
    )
    truth = CatalogueTruth(frame_class, frame_image, item_class, user_classes, affinity, is_noise)
    item_ids = np.char.add("i", np.arange(n_items).astype(str)).astype(object)
    return Catalogue(interactions, pixels[frame_image], offsets, item_ids, truth)


def _check_catalogue_args(
    images: tuple[np.ndarray, np.ndarray],
    n_users: int,
    n_items: int,
    n_classes: int,
    frames_per_item: tuple[int, int],
    classes_per_user: int,
    dominant_share: float,
    interactions_per_user: tuple[int, int],
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = (np.asarray(a) for a in images)
    if pixels.ndim != 3 or labels.shape != (pixels.shape[0],):
        raise DataValidationError(
            f"images must be (pixels (n, h, w), labels (n,)); got {pixels.shape} and {labels.shape}"
        )
    available = np.unique(labels)
    if n_classes < 2 or not np.isin(np.arange(n_classes), available).all():
        raise DataValidationError(
            f"n_classes={n_classes} needs labels 0..{n_classes - 1} in the images; found {available.tolist()}"
        )
    low, high = frames_per_item
    if not 1 <= low <= high:
        raise DataValidationError(f"frames_per_item must be (low, high) with 1 <= low <= high, got {frames_per_item}")
    if not 1 <= classes_per_user < n_classes:
        raise DataValidationError(f"classes_per_user must be in 1..{n_classes - 1}, got {classes_per_user}")
    if not 0.0 <= dominant_share <= 1.0 or not 0.0 <= noise <= 1.0:
        raise DataValidationError(f"dominant_share and noise must be in [0, 1], got {dominant_share}, {noise}")
    low, high = interactions_per_user
    if n_users < 1 or not 1 <= low <= high <= n_items:
        raise DataValidationError(
            f"need n_users >= 1 and 1 <= interactions_per_user low <= high <= n_items={n_items}; "
            f"got n_users={n_users}, interactions_per_user={interactions_per_user}"
        )
    if pixels.dtype != np.uint8:
        top = float(pixels.max()) if pixels.size else 0.0
        pixels = np.rint(pixels * (255.0 / top if top > 0 else 1.0)).clip(0, 255).astype(np.uint8)
    return pixels, labels.astype(np.int64)


def _draw_images(rng: np.random.Generator, labels: np.ndarray, frame_class: np.ndarray) -> np.ndarray:
    """For every frame, a uniformly drawn image index of the frame's class (with replacement)."""
    by_class = np.argsort(labels, kind="stable")
    class_start = np.searchsorted(labels[by_class], frame_class, side="left")
    class_size = np.searchsorted(labels[by_class], frame_class, side="right") - class_start
    return by_class[class_start + (rng.random(frame_class.size) * class_size).astype(np.int64)]


def _choose_items(
    rng: np.random.Generator, logits: np.ndarray, counts: np.ndarray, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct items per user: preferred ones by Gumbel top-k on ``logits``, the rest uniformly.

    Args:
        logits: ``(n_users, n_items)`` preference logits.
        counts: ``(n_users,)`` items per user.
    Returns:
        items ``(sum(counts),)`` grouped by user (user-major) and a noise flag per item.
    """
    n_users, n_items = logits.shape
    n_noise = rng.binomial(counts, noise)
    n_pref = counts - n_noise
    gumbel = logits - np.log(-np.log(rng.random(logits.shape)))
    pref_rank = np.argsort(np.argsort(-gumbel, axis=1), axis=1)
    chosen = pref_rank < n_pref[:, None]
    # Noise: uniform keys over the items not already chosen by preference.
    noise_keys = np.where(chosen, np.inf, rng.random(logits.shape))
    noise_rank = np.argsort(np.argsort(noise_keys, axis=1), axis=1)
    is_noise = noise_rank < n_noise[:, None]
    selected = chosen | is_noise
    rows, items = np.nonzero(selected)
    return items.astype(np.int64), is_noise[rows, items]


def _cumsum_within(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Running sum of ``values`` restarting at every group of ``counts`` consecutive rows."""
    total = np.cumsum(values)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    before = np.concatenate([[0], total])[starts]
    return total - before
