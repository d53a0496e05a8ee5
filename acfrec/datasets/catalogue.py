"""A planted-preference multimedia catalogue whose item components are real images.

Every item is a short "video": a few frames, each a real handwritten-digit image (scikit-learn's
``load_digits`` by default, or MNIST from :func:`load_mnist_idx`). An item shows a few digit
classes over its frames. Every user likes a few classes and consumes items for two reasons:
because the item shows a liked class somewhere among its frames (preference), or because it is
popular (popularity clicks, blind to content). So what explains a user's next choice is the
subset of the history that shows liked classes, and within those items only the liked frames:
the setting ACF's item- and component-level attention is for. The ground truth (class of every
frame, classes of every user, which interactions were popularity clicks) is kept, so one can
check where a model's attention goes.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from acfrec.errors import DataValidationError
from acfrec.utils import is_int_at_least

if TYPE_CHECKING:
    from acfrec.data.components import ComponentStore
    from acfrec.data.split import Split

_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049


@dataclass(frozen=True)
class CatalogueTruth:
    """What generated the catalogue. Dense item ``k`` is ``i{k}``, user ``k`` is ``u{k}``.

    Attributes:
        frame_class: ``(n_frames,)`` int64 digit class of every frame.
        frame_image: ``(n_frames,)`` int64 row of the source image set each frame was taken from.
        item_class: ``(n_items,)`` int64 most frequent class among the item's frames.
        user_classes: ``(n_users, n_classes)`` bool, True for a liked class.
        affinity: ``(n_users, n_items)`` float64 share of the item's frames in a liked class.
        noise: ``(n_interactions,)`` bool, True for popularity clicks (drawn from item
            popularity alone), aligned with the rows of :attr:`Catalogue.interactions`.
        past_classes: ``(n_users, n_classes)`` bool, True for the user's past class (one per
            user, not liked now; all False when the catalogue has no interest drift).
        past: ``(n_interactions,)`` bool, True for preference choices made for the past class,
            aligned like :attr:`noise`.
    """

    frame_class: np.ndarray
    frame_image: np.ndarray
    item_class: np.ndarray
    user_classes: np.ndarray
    affinity: np.ndarray
    noise: np.ndarray
    # Last and with defaults, so that positional constructions without drift keep working.
    past_classes: np.ndarray | None = None
    past: np.ndarray | None = None

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

    # ------------------------------------------------- where attention went
    def liked_frame_ratio(self, split: Split, users: np.ndarray, attention: dict[str, np.ndarray]) -> float:
        """Component attention's mass on the users' liked frames / the share uniform attention gives them.

        Over the history items that show a liked class (the others have no liked frame to find).
        1.0 for uniform component attention; the catalogue caps it (a perfect beta reaches
        ``1 / mean liked share`` of those items: ~2.9 on the ``"sparse"`` preset).

        Args:
            split: the split the model was trained on (its ids are this catalogue's ``u{k}`` / ``i{k}``).
            users: ``(n,)`` dense user indices of ``split``.
            attention: a model's ``attention(users)``: ``history`` ``(n, H)`` dense items (-1 padding)
                and ``beta`` ``(n, H, M)`` weights over each item's first ``M`` frames.
        """
        history, beta = attention["history"], attention["beta"]
        item = generator_index(split.items.external_ids)[np.maximum(history, 0)]
        count = np.minimum(np.diff(self.item_offsets)[item], beta.shape[2])
        slots = np.arange(beta.shape[2])
        frames = np.where(
            (slots < count[..., None]) & (history >= 0)[..., None], self.item_offsets[item][..., None] + slots, -1
        )
        liked = self.truth.liked_frames(generator_index(split.users.external_ids)[users], frames)
        shown = liked.any(axis=-1)
        if not shown.any():
            raise DataValidationError("no history item of these users shows a liked class: no liked frame to weigh")
        uniform = (liked.sum(-1) / np.maximum(count, 1))[shown].mean()
        return float((beta * liked).sum(-1)[shown].mean() / uniform)

    def click_weight_ratio(self, split: Split, users: np.ndarray, attention: dict[str, np.ndarray]) -> float:
        """Item attention's share on content-blind clicks / their share of the history.

        Per user whose history holds both clicks and chosen items (the clicks' share of the
        user's alpha, divided by their share of the history entries), then averaged over those
        users; per user, so it does not depend on how ``alpha`` is normalised, and bounded (a
        user whose attention collapses onto one entry counts once, as 0 or as ``n / n_clicks``).
        1.0 for uniform attention, 0 when the clicks are ignored. Measures whether item attention
        finds the history entries that say nothing about the user's taste.

        Args:
            split, users: as in :meth:`liked_frame_ratio`.
            attention: ``history`` ``(n, H)`` dense items (-1 padding) and ``alpha`` ``(n, H)``.
        """
        history, alpha = attention["history"], attention["alpha"]
        real = history >= 0
        item = generator_index(split.items.external_ids)[np.maximum(history, 0)]
        user = generator_index(split.users.external_ids)[users]
        is_click = real & self.clicks()[user[:, None], item]
        chosen = real & ~is_click
        both = is_click.any(axis=1) & chosen.any(axis=1)
        if not both.any():
            raise DataValidationError("no history of these users holds both content-blind clicks and chosen items")
        total = np.where(real, alpha, 0.0).sum(axis=1)
        alpha_share = np.where(is_click, alpha, 0.0).sum(axis=1) / np.where(total > 0, total, 1.0)
        entry_share = is_click.sum(axis=1) / np.maximum(real.sum(axis=1), 1)
        return float((alpha_share[both] / entry_share[both]).mean())

    def clicks(self) -> np.ndarray:
        """``(n_users, n_items)`` bool over the generator's indices: True for a content-blind click."""
        return self._per_pair(self.truth.noise)

    def past_choices(self) -> np.ndarray:
        """``(n_users, n_items)`` bool over the generator's indices: True for a choice made for the
        user's past class (``past_interest``)."""
        return self._per_pair(self.truth.past)

    def _per_pair(self, flags: np.ndarray | None) -> np.ndarray:
        """A per-interaction flag ``(n_interactions,)`` as a dense ``(n_users, n_items)`` bool matrix."""
        frame = self.interactions
        dense = np.zeros((self.truth.user_classes.shape[0], self.n_items), dtype=bool)
        if flags is not None:  # None: a truth built without drift
            dense[generator_index(frame["user"].to_numpy()), generator_index(frame["item"].to_numpy())] = flags
        return dense


def generator_index(external_ids: np.ndarray) -> np.ndarray:
    """``(n,)`` int64 generator index of the catalogue's ids ``u{k}`` / ``i{k}`` (e.g. a Split's
    ``users.external_ids``)."""
    return np.char.lstrip(np.asarray(external_ids, dtype=str), "ui").astype(np.int64)


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


# Named argument sets of :func:`planted_catalogue` (see :func:`planted_preset`).
PRESETS: dict[str, dict[str, object]] = {
    # Three items per user: most items have a handful of interactions, too few for collaborative
    # filtering to place them, so what an item's frames show matters. A user takes any item that
    # shows a liked class, so the liked frames are often a minority of a liked item's frames:
    # attention that finds them could give them ~2.9x the uniform share (the default catalogue,
    # whose preferred items are mostly liked frames already, allows at most ~2.1x). Few
    # popularity clicks (10%).
    "sparse": {"n_items": 1500, "preference_by": "shown", "noise": 0.1},
    # Short histories over a small, well-sampled catalogue (3,000 users, 300 items, 4-8 items per
    # user, so 2-6 in training; a third of them content-blind uniform clicks): every item has ~40
    # interactions, so collaborative filtering learns the items, but a user's taste has to be
    # inferred from a few items that each show 2-4 classes. Additive pooling cannot do that:
    # summing class votes over the history (true frame labels) ranks below popularity. Measured,
    # seed 0, full-ranking HR@10 / NDCG@10: the generator's own ranking 0.339 / 0.205; the class
    # most shown in the training history (true frame labels), then popularity, 0.264 / 0.159;
    # summed class votes 0.160 / 0.089; popularity 0.189 / 0.105; FISM 0.194 / 0.111, SVD++
    # 0.216 / 0.128, BPR-MF 0.177 / 0.103; ACF with content_in_history, profile_query,
    # frame_agreement=5 and input scaling 0.206 / 0.118 (liked-frame ratio 1.28), item attention
    # off 0.207 / 0.126, component attention off 0.200 / 0.112. A BPR model told each user's true
    # class learns item vectors that reach 0.327 / 0.203: the gap is in inferring the taste.
    "short": {
        "n_users": 3000, "n_items": 300, "interactions_per_user": (4, 8), "noise": 0.3,
        "click_popularity": 0.0, "preference_by": "shown",
    },
    # "short" with 6-12 items per user and frames drawn from each class's 10 most typical images,
    # so pixel features tell the classes apart (16 k-means clusters are pure): the taste can be
    # read from the history's frames. From the truth (bench_planted_headroom.py, seed 0, HR@10):
    # uniform pooling 0.206, sharp component attention 0.237, plus item weights from content
    # consistency 0.290, the generator's ranking 0.329. Measured, seeds 0 / 1, HR@10 / NDCG@10:
    # FISM 0.248 / 0.149 and 0.257 / 0.160, SVD++ 0.258 / 0.149 and 0.252 / 0.157, BPR-MF
    # 0.221 / 0.132 and 0.231 / 0.141; ACF without a user vector (user_embedding=False,
    # history_smoothing=1, no pre-training, lr 0.005, content_in_history, profile_query,
    # frame_agreement=5, input scaling) 0.251 / 0.154 and 0.281 / 0.175, its component attention
    # off 0.248 / 0.148 and 0.260 / 0.156, its item attention off 0.247 / 0.150 and 0.275 / 0.171.
    # Where its attention goes (seed 0 / 1): 2.23 / 2.46x the uniform weight on the liked frames
    # (Catalogue.liked_frame_ratio); the content-blind clicks get 0.78 / 0.79x their uniform share
    # of alpha (Catalogue.click_weight_ratio): item attention finds the clicks, but with clicks
    # uniform over the catalogue, discounting them does not move the ranking (README).
    "legible": {
        "n_users": 3000, "n_items": 300, "interactions_per_user": (6, 12), "noise": 0.3,
        "click_popularity": 0.0, "preference_by": "shown", "typical_frames": 10,
    },
    # "legible" whose content-blind clicks all land outside the user's taste (clicks_outside_taste):
    # accidental clicks that the frames can tell from choices. There both attention levels have
    # work: component attention reads the taste from each history item's frames, and item
    # attention can discount the clicks because their frames miss that taste. Measured over six
    # seeds with ACF's "legible" recipe at ACF's default lr 0.002 (dim 64) and a moving average of
    # its weights (average_half_life=1), pooled NDCG@10 (paired SE): ACF beats item attention off
    # by +0.0054 (0.0010), component attention off by +0.0059 (0.0015), ALS by +0.0085 (0.0016) and
    # SVD++ by +0.0088 (0.0015), each at all six seeds; over two model seeds it beats the two
    # ablations in 11 and 10 of 12 runs. Clicks get 0.67-0.71x their uniform share of alpha, liked
    # frames 2.10-2.22x theirs of beta. The per-seed table and the command are in the README
    # ("stray"); at lr 0.005 (the "legible" test's) seed 2 lost, before the frame clusters moved
    # to k-means++ (ACF 0.233 / 0.145, item attention off 0.252 / 0.150).
    "stray": {
        "n_users": 3000, "n_items": 300, "interactions_per_user": (6, 12), "noise": 0.3,
        "click_popularity": 0.0, "preference_by": "shown", "typical_frames": 10, "clicks_outside_taste": True,
    },
    # "legible" with drifting tastes: 40% of a user's preference choices were made for a past
    # class (one the user no longer likes) and come first in the history, before the current
    # choices; content-blind clicks (20%) sit anywhere. Under leave-one-out by time the held-out
    # item follows the current interest, while a share of the history shows the past one: which
    # history items still speak for the user is what item-level attention is for. Measured (seed
    # 0, HR@10 / NDCG@10): FISM 0.241 / 0.146, SVD++ 0.237 / 0.146, BPR-MF 0.217 / 0.133; ACF
    # with the "legible" recipe 0.225 / 0.134, trained on each positive's earlier history
    # (ACFConfig.training_context="earlier") 0.230 / 0.142, its item attention off 0.233 / 0.142,
    # its component attention off 0.237 / 0.148: no ACF variant wins here yet.
    "drifting": {
        "n_users": 3000, "n_items": 300, "interactions_per_user": (8, 16), "noise": 0.2,
        "click_popularity": 0.0, "preference_by": "shown", "typical_frames": 10, "past_interest": 0.4,
    },
    # Users like two classes and their interest moves from one to the other (taste_shift): the
    # oldest choices show only the old class, the newest only the current one. Measured at seed 0
    # with ACF's "legible" recipe trained on each positive's earlier history
    # (ACFConfig.training_context="earlier"), HR@10 / NDCG@10: 0.194 / 0.112, item attention off
    # 0.207 / 0.118, FISM 0.210 / 0.118. An experiment script whose clicks almost never were the
    # newest entry (they were keyed over the whole timeline's range rather than given uniform
    # slots) had ACF 0.266 / 0.159 / item attention off 0.252 / 0.145 at seed 0 and item
    # attention mattering at two seeds of three (ACFConfig.training_context).
    "shifting": {
        "n_users": 3000, "n_items": 300, "interactions_per_user": (8, 16), "noise": 0.2,
        "click_popularity": 0.0, "preference_by": "shown", "typical_frames": 10, "classes_per_user": 2,
        "taste_shift": True,
    },
}


def planted_preset(name: str, **overrides: object) -> Catalogue:
    """:func:`planted_catalogue` with the arguments of preset ``name`` (:data:`PRESETS`), then ``overrides``."""
    if name not in PRESETS:
        raise DataValidationError(f"unknown planted catalogue preset {name!r}; known: {sorted(PRESETS)}")
    return planted_catalogue(**{**PRESETS[name], **overrides})  # type: ignore[arg-type]


def planted_catalogue(
    n_users: int = 500,
    n_items: int = 300,
    n_classes: int = 10,
    frames_per_item: tuple[int, int] = (3, 6),
    seed: int = 0,
    images: tuple[np.ndarray, np.ndarray] | None = None,
    classes_per_user: int = 1,
    classes_per_item: tuple[int, int] = (2, 4),
    interactions_per_user: tuple[int, int] = (10, 30),
    preference_strength: float = 8.0,
    popularity_skew: float = 0.8,
    noise: float = 0.3,
    click_popularity: float = 1.0,
    preference_by: str = "share",
    typical_frames: int | None = None,
    past_interest: float = 0.0,
    taste_shift: bool = False,
    clicks_outside_taste: bool = False,
) -> Catalogue:
    """Generate a seeded catalogue of digit "videos" and planted-preference interactions.

    Every item shows ``classes_per_item`` distinct digit classes spread over its frames, so a
    frame of a class a user likes usually sits among frames of other classes. A user's
    interactions are of two kinds: *preference* choices (Gumbel top-k on
    ``preference_strength * (share of the item's frames in a liked class) + popularity``) and
    *popularity clicks*
    (a ``noise`` share drawn from item popularity alone, blind to content). With
    ``past_interest`` > 0 tastes drift: some preference choices were made for a past class and
    come first in the user's history. Which history items
    say something about the user's next choice, and which of their frames say why, therefore
    depends on the user and the content.

    Args:
        frames_per_item: inclusive ``(low, high)`` range of frames per item.
        images: ``(images (n, h, w), labels (n,))``; defaults to scikit-learn's digits.
        classes_per_user: liked classes per user.
        classes_per_item: inclusive range of distinct classes an item shows (capped by its
            frame count); each shown class has at least one frame, the others are drawn among
            them, in random frame order.
        interactions_per_user: inclusive range of distinct items per user.
        preference_strength: logit gain per unit of liked-frame share.
        popularity_skew: Zipf exponent of item popularity (0: none).
        noise: share of a user's interactions that are popularity clicks.
        click_popularity: how much those clicks follow item popularity: 1 draws them from the
            same Zipf popularity as the preference choices, 0 uniformly over the catalogue
            (browsing that lands anywhere, so a click is no more likely on a head item and
            collaborative filtering cannot discount clicks by shrinking popular items).
        preference_by: what ``preference_strength`` multiplies: ``"share"``, the share of the
            item's frames in a liked class, or ``"shown"``, 1 when the item shows a liked class
            at all (then a liked item's liked frames are often a minority of its frames).
        typical_frames: draw each class's frames from its ``typical_frames`` images closest to
            the class's mean image (None: from all of them). Typical images make the frames of a
            class look alike, as a good frame encoder would see them: on scikit-learn's 8x8
            digits, 16 k-means clusters of the pixel-PCA features match the classes with purity
            0.85 over all images (``bench_planted_headroom.py``), too blurred a reading of a
            user's taste for attention to show.
        taste_shift: with ``classes_per_user`` >= 2, each user's interest moves over time from
            its last liked class to its first: the preference choices that show only the last one
            come first in the history, then those that show both, then those that show only the
            first (random order within each group; clicks anywhere). Leave-one-out by time then
            holds out the newest interest, while the older half of the history still shows the old
            one. Not with ``past_interest``.
        clicks_outside_taste: the content-blind clicks land only on items that show none of
            the user's liked classes (accidental clicks outside the taste), instead of anywhere.
            Then content can in principle tell every click from a choice; by default ~30% of the
            clicks land on an item showing a liked class and look like choices. Measured on
            "legible", seed 0 (``bench_planted_headroom.py``-style, ACF's "legible" recipe with
            item attention off, NDCG@10): removing the clicks from every history by the truth
            gains +0.025 with this option and +0.017 without it.
        past_interest: interest drift, in [0, 1). Every user also has one past class, drawn
            uniformly among the classes the user does not like, and each preference choice (not
            the clicks) is, with this probability, a past choice: drawn by the same rule
            (``preference_by``, ``preference_strength``, popularity) with the past class as the
            only liked class, among the items not chosen otherwise. The past choices are the
            oldest of the user's choices, then come the current ones (each group in random
            order); the clicks fall anywhere on the timeline. 0 (no drift) gives exactly the
            catalogue generated without this argument.
    Returns:
        :class:`Catalogue`; the same arguments give the same catalogue.
    """
    if images is None:
        images = load_digits_images()
    pixels, labels = _check_catalogue_args(
        images, n_users, n_items, n_classes, frames_per_item, classes_per_user, classes_per_item,
        interactions_per_user, noise, past_interest,
    )
    if click_popularity < 0:
        raise DataValidationError(f"click_popularity must be >= 0, got {click_popularity}")
    if taste_shift and (classes_per_user < 2 or past_interest > 0):
        raise DataValidationError(
            f"taste_shift needs classes_per_user >= 2 and past_interest 0, got {classes_per_user} and {past_interest}"
        )
    if typical_frames is not None and not is_int_at_least(typical_frames, 1):
        raise DataValidationError(f"typical_frames must be None or an int >= 1, got {typical_frames!r}")
    if preference_by not in ("share", "shown"):
        raise DataValidationError(f"preference_by must be 'share' or 'shown', got {preference_by!r}")
    rng = np.random.default_rng(seed)
    n_frames = rng.integers(frames_per_item[0], frames_per_item[1] + 1, size=n_items)
    offsets = np.concatenate([[0], np.cumsum(n_frames)]).astype(np.int64)
    frame_item = np.repeat(np.arange(n_items), n_frames)
    frame_class = _frame_classes(rng, n_frames, classes_per_item, n_classes)
    pool = labels if typical_frames is None else _typical_only(pixels, labels, typical_frames)
    frame_image = _draw_images(rng, pool, frame_class)

    user_classes = np.zeros((n_users, n_classes), dtype=bool)
    liked = np.argsort(rng.random((n_users, n_classes)), axis=1)[:, :classes_per_user]
    np.put_along_axis(user_classes, liked, True, axis=1)
    class_count = np.zeros((n_items, n_classes))
    np.add.at(class_count, (frame_item, frame_class), 1.0)
    affinity = user_classes.astype(np.float64) @ (class_count / n_frames[:, None]).T
    # Ties between equally frequent classes go to the smaller class index.
    item_class = class_count.argmax(axis=1).astype(np.int64)

    counts = rng.integers(interactions_per_user[0], interactions_per_user[1] + 1, size=n_users)
    popularity = -popularity_skew * np.log1p(rng.permutation(n_items))
    liking = affinity if preference_by == "share" else (affinity > 0).astype(np.float64)
    preference = preference_strength * liking + popularity
    past_classes = np.zeros_like(user_classes)
    drift = None
    if past_interest > 0:
        # Its own generator, so that the draws of `rng` (and so the catalogue without drift) stay
        # as they were. Liked classes get key -1: the argmax is uniform over the others.
        drift_rng = np.random.default_rng([seed, 1])
        past_class = np.where(user_classes, -1.0, drift_rng.random((n_users, n_classes))).argmax(axis=1)
        past_classes[np.arange(n_users), past_class] = True
        past_share = (class_count / n_frames[:, None])[:, past_class].T  # (n_users, n_items)
        past_liking = past_share if preference_by == "share" else (past_share > 0).astype(np.float64)
        drift = (drift_rng, preference_strength * past_liking + popularity, past_interest)
    click_logits = click_popularity * popularity
    if clicks_outside_taste:
        click_logits = np.where(liking > 0, -np.inf, click_logits[None, :])
    items, is_noise, is_past = _choose_items(rng, preference, click_logits, counts, noise, drift)
    users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    # Random order along each user's history (past choices before current ones when tastes
    # drift or shift), then strictly increasing timestamps.
    keys = rng.random(users.size)
    age = None  # per row, lower = older: the choices' order when tastes drift or shift
    if drift is not None:
        age = (~is_past).astype(np.int64)
    elif taste_shift:
        shows = class_count > 0
        age = shows[items, liked[users, 0]].astype(np.int64) + ~shows[items, liked[users, -1]]
    order = np.lexsort((keys, users)) if age is None else _drifting_order(users, keys, is_noise, age)
    items, is_noise, is_past = items[order], is_noise[order], is_past[order]
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
    truth = CatalogueTruth(frame_class, frame_image, item_class, user_classes, affinity, is_noise, past_classes, is_past)
    item_ids = np.char.add("i", np.arange(n_items).astype(str)).astype(object)
    return Catalogue(interactions, pixels[frame_image], offsets, item_ids, truth)


def _frame_classes(
    rng: np.random.Generator, n_frames: np.ndarray, classes_per_item: tuple[int, int], n_classes: int
) -> np.ndarray:
    """Class of every frame ``(sum(n_frames),)``: each item's shown classes, each at least once, shuffled."""
    n_items = n_frames.size
    shown = np.minimum(rng.integers(classes_per_item[0], classes_per_item[1] + 1, size=n_items), n_frames)
    palette = np.argsort(rng.random((n_items, n_classes)), axis=1)  # item's classes: first `shown` columns
    frame_item = np.repeat(np.arange(n_items), n_frames)
    position = np.arange(frame_item.size) - np.repeat(np.cumsum(n_frames) - n_frames, n_frames)
    extra = (rng.random(frame_item.size) * shown[frame_item]).astype(np.int64)
    column = np.where(position < shown[frame_item], position, extra)
    classes = palette[frame_item, column]
    order = np.lexsort((rng.random(frame_item.size), frame_item))
    return classes[order].astype(np.int64)


def _check_catalogue_args(
    images: tuple[np.ndarray, np.ndarray],
    n_users: int,
    n_items: int,
    n_classes: int,
    frames_per_item: tuple[int, int],
    classes_per_user: int,
    classes_per_item: tuple[int, int],
    interactions_per_user: tuple[int, int],
    noise: float,
    past_interest: float = 0.0,
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
    low, high = classes_per_item
    if not 1 <= low <= high <= n_classes:
        raise DataValidationError(
            f"classes_per_item must be (low, high) with 1 <= low <= high <= n_classes={n_classes}, got {classes_per_item}"
        )
    if not 0.0 <= noise <= 1.0:
        raise DataValidationError(f"noise must be in [0, 1], got {noise}")
    # A past class is one the user does not like: classes_per_user < n_classes above leaves one.
    if not 0.0 <= past_interest < 1.0:
        raise DataValidationError(f"past_interest must be in [0, 1), got {past_interest}")
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


def _typical_only(pixels: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """``labels`` with -1 (never drawn) on all but each class's ``per_class`` images closest to its mean image."""
    flat = pixels.reshape(pixels.shape[0], -1).astype(np.float64)
    classes = np.unique(labels)
    means = np.stack([flat[labels == c].mean(axis=0) for c in classes])  # a loop over <= 10 classes
    distance = ((flat - means[np.searchsorted(classes, labels)]) ** 2).sum(axis=1)
    # rank within class by distance: sort by (class, distance)
    order = np.lexsort((distance, labels))
    start = np.searchsorted(labels[order], labels[order], side="left")
    keep = np.zeros(labels.size, dtype=bool)
    keep[order[np.arange(labels.size) - start < per_class]] = True
    return np.where(keep, labels, -1)


def _draw_images(rng: np.random.Generator, labels: np.ndarray, frame_class: np.ndarray) -> np.ndarray:
    """For every frame, a uniformly drawn image index of the frame's class (with replacement)."""
    by_class = np.argsort(labels, kind="stable")
    class_start = np.searchsorted(labels[by_class], frame_class, side="left")
    class_size = np.searchsorted(labels[by_class], frame_class, side="right") - class_start
    return by_class[class_start + (rng.random(frame_class.size) * class_size).astype(np.int64)]


def _choose_items(
    rng: np.random.Generator,
    preference: np.ndarray,
    popularity: np.ndarray,
    counts: np.ndarray,
    noise: float,
    drift: tuple[np.random.Generator, np.ndarray, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct items per user: preferred ones by Gumbel top-k, then past choices, then popularity clicks.

    Args:
        preference: ``(n_users, n_items)`` preference logits.
        popularity: ``(n_items,)`` popularity logits of the clicks that ignore content.
        counts: ``(n_users,)`` items per user.
        drift: ``(generator, past-class preference logits (n_users, n_items), past_interest)``,
            or None for no past choices. Only this generator draws them, so ``rng`` draws the
            same numbers with or without drift.
    Returns:
        items ``(sum(counts),)`` grouped by user (user-major), a popularity-click flag and a
        past-choice flag per item.
    """
    n_clicks = rng.binomial(counts, noise)
    n_choices = counts - n_clicks
    n_past = np.zeros_like(counts) if drift is None else drift[0].binomial(n_choices, drift[2])
    chosen = _gumbel_top(rng, preference, n_choices - n_past)
    is_past = np.zeros_like(chosen)
    if drift is not None:
        is_past = _gumbel_top(drift[0], np.where(chosen, -np.inf, drift[1]), n_past)
    # Popularity clicks: Gumbel top-k on popularity alone, over the items not already chosen.
    keys = np.where(chosen | is_past, -np.inf, popularity if popularity.ndim == 2 else popularity[None, :])
    is_click = _gumbel_top(rng, keys, n_clicks)
    rows, items = np.nonzero(chosen | is_past | is_click)
    return items.astype(np.int64), is_click[rows, items], is_past[rows, items]


def _drifting_order(users: np.ndarray, keys: np.ndarray, is_click: np.ndarray, age: np.ndarray) -> np.ndarray:
    """Row order of user-major histories: choices by ``age`` (lowest first), clicks anywhere.

    Sorting by ``(user, key)`` alone would shuffle each history uniformly. Here the clicks keep
    their keys, so they take uniformly random slots in random order; the choices take the
    remaining slots (their own sorted keys) in the order (age, then key). The ranks of iid
    keys are independent of their sorted values, so this is exact: within each group the order
    is uniform, and the clicks' slots do not depend on it.

    Args:
        users: ``(n,)`` user of every row, grouped (user-major).
        keys: ``(n,)`` iid uniform keys.
        is_click: ``(n,)`` bool, the clicks.
        age: ``(n,)`` int64 group of every choice: lower groups come first (e.g. past choices).
    Returns:
        ``(n,)`` int64 permutation of the rows, grouped by user.
    """
    choice = np.flatnonzero(~is_click)
    by_group = choice[np.lexsort((keys[choice], age[choice], users[choice]))]
    by_key = choice[np.lexsort((keys[choice], users[choice]))]
    # Both lists are user-major with the same rows per user, so slot k of one user goes to
    # that user's k-th choice in age order.
    placed = keys.copy()
    placed[by_group] = keys[by_key]
    return np.lexsort((placed, users))


def _gumbel_top(rng: np.random.Generator, logits: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``(n_users, n_items)`` bool: ``k[u]`` items per row, sampled without replacement by ``softmax(logits)``."""
    keys = logits - np.log(-np.log(rng.random(logits.shape)))
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    return rank < k[:, None]


def _cumsum_within(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Running sum of ``values`` restarting at every group of ``counts`` consecutive rows."""
    total = np.cumsum(values)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    before = np.concatenate([[0], total])[starts]
    return total - before
