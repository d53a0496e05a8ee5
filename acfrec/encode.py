"""Raw content -> component store: read content, train (or load) an encoder, hold out, encode, write.

Content formats (:func:`read_content`):

* images, ``.npz``: ``images`` ``(n, [channels,] height, width)`` uint8, ``offsets``
  ``(n_items + 1,)`` (item ``k`` owns ``images[offsets[k]:offsets[k+1]]``; default one image per
  item) and ``item_ids`` ``(n_items,)`` (default ``"0".."n_items-1"``);
* images, a folder: one image file (PNG, JPEG, ...) per item, named ``<item_id>.<ext>``, or one
  sub-folder per item holding its frames (in file-name order). Grey images stay one channel,
  anything else becomes RGB; every image must have the same size;
* images, MNIST IDX (``*-idx3-ubyte[.gz]``): one image per item, ids ``"0".."n-1"``;
* text, CSV / TSV / Parquet: columns ``item_id`` and ``text`` (one row per item, the text split
  into sentences) or ``item_id`` and ``sentence`` (one row per sentence, in order).

:func:`encode_to_store` is the library entry point (``acfrec encode`` and the pipelines call it);
besides every registered encoder of :mod:`encoders` it runs the built-in featurisers of
:mod:`acfrec.data.components` by name: ``pca-pixels`` (images) and ``hashed-bow`` (text).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from acfrec.config import ConfigError, apply_overrides, build_config
from acfrec.errors import DataValidationError

if TYPE_CHECKING:
    from encoders import Encoder, ImageCorpus, TextCorpus

log = logging.getLogger("acfrec")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


# ============================================================================ content readers
def read_content(path: str | Path) -> ImageCorpus | TextCorpus:
    """Read images or texts (see the module docstring for the formats) into an encoder corpus."""
    path = Path(path)
    if not path.exists():
        raise DataValidationError(f"content {path} does not exist")
    name = path.name.lower()
    if path.is_dir():
        return read_image_folder(path)
    if name.endswith(".npz"):
        return read_image_npz(path)
    if "idx3" in name or name.endswith(("-ubyte", "-ubyte.gz")):
        return read_idx_images(path)
    if path.suffix.lower() in TEXT_SEPARATORS or name.endswith((".parquet", ".pq")):
        return read_text_table(path)
    raise DataValidationError(
        f"content {path}: unknown format; expected an image folder, .npz, an MNIST IDX file, "
        f"or a text table ({', '.join([*TEXT_SEPARATORS, '.parquet'])})"
    )


def read_image_npz(path: str | Path) -> ImageCorpus:
    """``images`` (+ optional ``offsets``, ``item_ids``) from an ``.npz`` file."""
    from encoders import ImageCorpus

    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataValidationError(f"content {path}: cannot read the .npz file: {error}") from error
    with data:
        if "images" not in data.files:
            raise DataValidationError(f"content {path}: no 'images' array (found: {', '.join(data.files) or 'none'})")
        images = data["images"]
        offsets = data["offsets"] if "offsets" in data.files else np.arange(images.shape[0] + 1)
        n_items = int(np.asarray(offsets).size - 1)
        item_ids = data["item_ids"].astype(str).tolist() if "item_ids" in data.files else [str(i) for i in range(n_items)]
    if images.dtype != np.uint8:
        raise DataValidationError(f"content {path}: 'images' must be uint8 pixels 0..255, got {images.dtype}")
    try:
        return ImageCorpus(images, offsets, item_ids)
    except ValueError as error:
        raise DataValidationError(f"content {path}: {error}") from error


def read_idx_images(path: str | Path) -> ImageCorpus:
    """MNIST IDX images, one per item."""
    from acfrec.datasets.catalogue import _IDX_IMAGES_MAGIC, _read_idx
    from encoders import ImageCorpus

    return ImageCorpus.single_images(_read_idx(Path(path), _IDX_IMAGES_MAGIC, 3))


def read_image_folder(path: str | Path) -> ImageCorpus:
    """One image file per item, or one sub-folder of frames per item (ids = file stems / folder names)."""
    from encoders import ImageCorpus

    path = Path(path)
    files = _image_files(path)
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if files and folders:
        raise DataValidationError(
            f"content {path}: holds both image files ({files[0].name}) and sub-folders ({folders[0].name}); "
            "use one file per item or one folder of frames per item"
        )
    if folders:
        frames = [_image_files(folder) for folder in folders]
        item_ids = [folder.name for folder in folders]
        files = [file for item_frames in frames for file in item_frames]
        counts = [len(item_frames) for item_frames in frames]
    else:
        item_ids = [file.stem for file in files]
        counts = [1] * len(files)
    if not files:
        raise DataValidationError(f"content {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    images = _read_images(files)
    return ImageCorpus(images, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), item_ids)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_images(files: list[Path]) -> np.ndarray:
    """``(n, channels, height, width)`` uint8; grey if the first image is grey, else RGB."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    mode = None
    for file in files:  # file decoding is per file by nature
        try:
            with Image.open(file) as image:
                mode = mode or ("L" if image.mode in _GREY_MODES else "RGB")
                array = np.asarray(image.convert(mode), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as error:
            raise DataValidationError(f"content {file}: cannot read the image: {error}") from error
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if arrays and array.shape != arrays[0].shape:
            raise DataValidationError(
                f"content {file}: image of shape {array.shape} (channels, height, width) differs from "
                f"{files[0].name}'s {arrays[0].shape}; resize the images to one size"
            )
        arrays.append(array)
    return np.stack(arrays)


def read_text_table(path: str | Path) -> TextCorpus:
    """``item_id`` + ``text`` (split into sentences) or ``item_id`` + ``sentence`` rows, items in file order."""
    import pandas as pd

    from acfrec.datasets.movielens import split_sentences
    from encoders import TextCorpus

    path = Path(path)
    try:
        if path.suffix.lower() in TEXT_SEPARATORS:
            frame = pd.read_csv(path, sep=TEXT_SEPARATORS[path.suffix.lower()], dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise DataValidationError(f"content {path}: cannot read the table: {error}") from error
    columns = [str(c) for c in frame.columns]
    text_column = next((c for c in ("text", "sentence") if c in columns), None)
    if "item_id" not in columns or text_column is None:
        missing = "item_id" if "item_id" not in columns else "text (or sentence)"
        raise DataValidationError(
            f"content {path}: column {missing!r} is missing; need item_id and text (one row per item) "
            f"or item_id and sentence (one row per sentence); found columns {columns}"
        )
    ids = frame["item_id"].astype("string").str.strip()
    empty = ids.isna() | (ids == "")
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataValidationError(f"content {path}: empty item_id in data row {row + 1}")
    texts = frame[text_column].astype("string").fillna("").tolist()
    if text_column == "text":
        duplicated = ids[ids.duplicated()]
        if len(duplicated):
            raise DataValidationError(
                f"content {path}: item_id {duplicated.iloc[0]!r} has several rows; the 'text' column needs one "
                "row per item (use a 'sentence' column for one row per sentence)"
            )
        return TextCorpus([split_sentences(text) for text in texts], ids.tolist())
    codes, unique = pd.factorize(ids)
    documents: list[list[str]] = [[] for _ in unique]
    for code, sentence in zip(codes.tolist(), texts, strict=True):
        if sentence.strip():
            documents[code].append(sentence.strip())
    return TextCorpus(documents, [str(u) for u in unique])


# ============================================================================ encode to a store
@dataclass
class PcaPixelsConfig:
    """``pca-pixels``: principal components of the pixels, one component per image/frame."""

    dim: int = 32
    seed: int = 0


@dataclass
class HashedBowConfig:
    """``hashed-bow``: hashed bag of words, one component per sentence."""

    dim: int = 256
    seed: int = 0


FEATURISERS: dict[str, tuple[type, str]] = {"pca-pixels": (PcaPixelsConfig, "image"), "hashed-bow": (HashedBowConfig, "text")}


def available_encoders() -> list[str]:
    """Every name :func:`encode_to_store` accepts: registered encoders and built-in featurisers."""
    from encoders import available_encoders as registered

    return sorted([*registered(), *FEATURISERS])


def encode_to_store(
    encoder: str,
    content: str | Path | ImageCorpus | TextCorpus,
    out: str | Path,
    *,
    config: dict | None = None,
    encoder_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    tracker: Any = None,
    progress: bool = True,
    holdout: float = 0.1,
    retrain: bool = False,
) -> Path:
    """Train (or load) ``encoder`` on ``content`` and write the component store of every item.

    Args:
        encoder: a registered encoder (``encoders.available_encoders()``), or ``pca-pixels`` /
            ``hashed-bow``.
        content: a path :func:`read_content` reads, or a corpus.
        out: the component store folder (written atomically).
        config: encoder options (fields of its config dataclass), checked by name and type.
        encoder_dir: where the trained encoder is saved; if it already holds one of this name
            trained with the same config (``device`` and ``num_threads`` aside), that one is
            loaded and not trained again; one of another name or config is an error naming the
            differing options (see ``retrain``). Default: ``<out>.encoder``.
        checkpoint_dir: per-epoch checkpoints; a run started again with it resumes (a checkpoint
            made with other options, ``epochs`` and ``max_seconds`` aside, is an error, or with
            ``retrain`` replaced by a fresh run's).
        tracker: an :class:`acfrec.tracking.Tracker`: one MLflow run with the encoder config, the
            per-epoch training curve (``train.*``, step = epoch) and the held-out figures
            (``heldout.*``).
        holdout: share of items (seeded by the encoder's ``seed``) kept out of training; the
            encoder's held-out likelihood on them goes to the store's meta and to MLflow.
        retrain: train afresh even when ``encoder_dir`` holds a saved encoder; the new one
            replaces it atomically once training ends (the old one stays if training fails).
    Returns:
        ``out`` as a Path; open it with :meth:`acfrec.data.components.ComponentStore.open`.
    """
    from acfrec.cli import _NullTracker

    out = Path(out)
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
    corpus = content if not isinstance(content, (str, Path)) else read_content(content)
    source = str(content) if isinstance(content, (str, Path)) else type(content).__name__
    tracker = tracker if tracker is not None else _NullTracker()
    with tracker.run(f"encode {encoder}", tags={"acfrec.command": "encode", "acfrec.encoder": encoder}) as run:
        run.log_params({"content": source, "n_items": corpus.n_items, "out": str(out.resolve())})
        if encoder in FEATURISERS:
            return _featurise(encoder, corpus, source, out, config or {}, run)
        return _train_and_encode(encoder, corpus, source, out, config, encoder_dir, checkpoint_dir, run, progress,
                                 holdout, retrain)


def _train_and_encode(
    name: str, corpus: Any, source: str, out: Path, config: dict | None, encoder_dir: str | Path | None,
    checkpoint_dir: str | Path | None, run: Any, progress: bool, holdout: float, retrain: bool,
) -> Path:
    from acfrec.data.components import ComponentStore

    encoder_dir = Path(encoder_dir) if encoder_dir is not None else out.with_name(f"{out.name}.encoder")
    encoder, figures, held_items = trained_encoder(
        name, corpus, source, config, encoder_dir, checkpoint_dir, run, progress, holdout, retrain
    )
    components = encoder.encode(corpus)
    meta = store_meta(name, encoder, encoder_dir, source, figures, held_items, holdout)
    store = ComponentStore.write(out, components.item_ids, (components.matrix, components.offsets), meta=meta)
    run.log_metrics({"n_components": store.matrix.shape[0], "dim": store.dim})
    # debug: `acfrec encode` prints this line (with the held-out figures) itself
    log.debug("%s: %d items, %d components of dim %d -> %s", name, store.n_items, store.matrix.shape[0], store.dim, out)
    return out


def store_meta(
    name: str, encoder: Encoder, encoder_dir: Path, source: str, figures: dict[str, float], held_items: np.ndarray,
    holdout: float,
) -> dict[str, Any]:
    """The component store's metadata of an encoder's run (both backends write it)."""
    return {
        "encoder": name,
        "encoder_config": dataclasses.asdict(encoder.config),
        "encoder_dir": str(encoder_dir.resolve()),
        "content": source,
        "heldout": figures,
        "n_heldout_items": int(held_items.size),
        "holdout": holdout,
        "encoder_stopped_early": encoder.stopped_early,
    }


def trained_encoder(
    name: str, corpus: Any, source: str, config: dict | None, encoder_dir: Path, checkpoint_dir: str | Path | None,
    run: Any, progress: bool, holdout: float, retrain: bool,
) -> tuple[Encoder, dict[str, float], np.ndarray]:
    """The encoder saved in ``encoder_dir`` with these options, or a new one trained on all but the
    held-out items and saved there; also its held-out figures and the held-out item indices.

    Shared by the local and the Ray backends (which then only differ in who encodes the items).
    """
    encoder = _saved_encoder(encoder_dir, name, config, retrain=retrain) or _new_encoder(name, config)
    _check_modality(name, encoder.modality, corpus, source)
    train_items, held_items = holdout_items(corpus.n_items, holdout, encoder.config.seed)
    run.log_params({"holdout": holdout, "n_heldout_items": int(held_items.size)})
    run.log_config({"name": name, "trainable": encoder.trainable, **dataclasses.asdict(encoder.config)}, prefix="encoder")
    if encoder.module is None:
        _fit(encoder, corpus.subset(train_items), corpus.n_items, checkpoint_dir, run, progress, retrain)
        encoder.save(encoder_dir)
    else:
        log.info("loaded the trained %s encoder from %s", name, encoder_dir)
        _CurveLogger(run).log_missing(encoder.history)
    if encoder.stopped_early:
        run.log_params({"encoder.stopped_early": encoder.stopped_early})
    figures = encoder.evaluate(corpus.subset(held_items)) if held_items.size else {}
    run.log_metrics(figures, prefix="heldout")
    return encoder, figures, held_items


def _fit(
    encoder: Encoder, train: Any, n_items: int, checkpoint_dir: str | Path | None, run: Any, progress: bool, retrain: bool
) -> None:
    """Train ``encoder`` on ``train`` logging the curve; a frozen one (``trainable=False``) is only built.

    ``retrain``: a checkpoint made with other options is not an error; training starts afresh.
    """
    from encoders.base import StaleCheckpointError

    if not encoder.trainable:
        log.info("%s is frozen (trainable=False): loading it, nothing to train", encoder.name)
        encoder.fit(train)
        return
    log.info("training %s on %d of %d items ...", encoder.name, train.n_items, n_items)
    curve = _CurveLogger(run)
    try:
        encoder.fit(train, checkpoint_dir=checkpoint_dir, callbacks=[curve], progress=progress,
                    restart_stale_checkpoint=retrain)
    except StaleCheckpointError as error:
        raise ConfigError(f"{error}; or --retrain (retrain=True) to train afresh") from error
    curve.log_missing(encoder.history)  # epochs finished before a resume
    if encoder.stopped_early:
        log.warning("%s stopped early (%s) after epoch %d of %d", encoder.name, encoder.stopped_early,
                    int(encoder.history[-1]["epoch"]), encoder.config.epochs)


class _CurveLogger:
    """Epoch callback logging ``train.*`` with ``step=epoch``; remembers which epochs it logged."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.logged: set[int] = set()

    def __call__(self, epoch: int, record: Mapping[str, float]) -> None:
        self.run.log_metrics({k: v for k, v in record.items() if k != "epoch"}, prefix="train", step=int(epoch))
        self.logged.add(int(epoch))

    def log_missing(self, history: list[dict[str, float]]) -> None:
        for record in history:
            if int(record["epoch"]) not in self.logged:
                self(int(record["epoch"]), record)


def holdout_items(n_items: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of item positions: ``(train (sorted), held out (sorted))``.

    ``round(holdout * n_items)`` items are held out, at least one when ``holdout > 0`` and at
    least one item is always left to train on.
    """
    n_held = int(round(holdout * n_items))
    if holdout > 0 and n_items >= 2:
        n_held = min(max(n_held, 1), n_items - 1)
    order = np.random.default_rng(seed).permutation(n_items)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _new_encoder(name: str, config: dict | None) -> Encoder:
    from encoders import available_encoders as registered
    from encoders import get_encoder

    if name not in registered():
        raise ConfigError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    cls = get_encoder(name)
    return cls(build_config(cls.config_class, config or {}, source="encoder config", where=name))


# Options that change where training runs, never what it learns: a saved encoder is reused across them.
_RUNTIME_OPTIONS = ("device", "num_threads")


def _saved_encoder(folder: Path, name: str, config: dict | None, retrain: bool = False) -> Encoder | None:
    """The encoder saved in ``folder`` when it is ``name`` trained with ``config``; None when there is
    none or ``retrain`` asks for a fresh one.

    Raises:
        ConfigError: the saved encoder has another name or config: names the folder, each
            differing option with both values, and the ways out.
    """
    import json

    from encoders import Encoder
    from encoders.base import config_differences, describe_differences

    if not (folder / "meta.json").is_file():
        return None
    if retrain:
        log.info("%s: retraining; the encoder saved in %s is replaced when training ends", name, folder)
        return None
    fix = "pass the options it was trained with to reuse it, --retrain (retrain=True) to train afresh and replace it, or another --encoder-dir"
    saved_name = json.loads((folder / "meta.json").read_text()).get("encoder")
    if saved_name != name:
        raise ConfigError(f"encoder dir {folder} holds a {saved_name!r} encoder, not {name!r}: {fix}")
    requested = _new_encoder(name, config)
    saved = Encoder.load(folder)
    differences = config_differences(
        dataclasses.asdict(saved.config), dataclasses.asdict(requested.config), ignore=_RUNTIME_OPTIONS
    )
    if differences:
        raise ConfigError(
            f"encoder dir {folder} holds a {name!r} encoder trained with other options "
            f"({describe_differences(differences)}): {fix}"
        )
    return saved


def _check_modality(name: str, modality: str, corpus: Any, source: str) -> None:
    from encoders import TextCorpus

    wants_text = modality == "text"
    if wants_text != isinstance(corpus, TextCorpus):
        kind = "text" if isinstance(corpus, TextCorpus) else "images"
        raise DataValidationError(
            f"encoder {name!r} encodes {'text' if wants_text else 'images'}, but content {source} holds {kind}"
        )


def _featurise(name: str, corpus: Any, source: str, out: Path, options: Mapping[str, Any], run: Any) -> Path:
    """The built-in featurisers of :mod:`acfrec.data.components`, written like an encoder's store."""
    from acfrec.data.components import ComponentStore, hashed_bow_sentences, pca_pixels

    config_class, modality = FEATURISERS[name]
    config = build_config(config_class, options, source="encoder config", where=name)
    _check_modality(name, modality, corpus, source)
    run.log_config({"name": name, **dataclasses.asdict(config)}, prefix="encoder")
    if name == "pca-pixels":
        frames = corpus.images.reshape(corpus.images.shape[0], -1)
        matrix, offsets = pca_pixels(frames, dim=config.dim, seed=config.seed), corpus.offsets
    else:
        matrix, offsets = hashed_bow_sentences(corpus.documents, dim=config.dim, seed=config.seed)
    meta = {"encoder": name, "encoder_config": dataclasses.asdict(config), "content": source}
    store = ComponentStore.write(out, corpus.item_ids, (matrix, offsets), meta=meta)
    run.log_metrics({"n_components": store.matrix.shape[0], "dim": store.dim})
    return out


# ============================================================================ the command
def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``acfrec encode``."""
    parser.add_argument("--encoder", required=True, metavar="NAME",
                        help="a registered encoder (darn, neural-statistician, pixelcnn, ...) or pca-pixels / hashed-bow")
    parser.add_argument("--content", required=True, metavar="PATH",
                        help="images (.npz, a folder of images or of per-item frame folders, MNIST IDX) or "
                             "text (CSV/TSV/Parquet with item_id and text, or item_id and sentence)")
    parser.add_argument("--out", required=True, metavar="STORE", help="component store folder to write")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="encoder option (YAML-typed): epochs=5 layers=[200] features=codes; "
                             "tracking.* sets MLflow")
    parser.add_argument("--encoder-dir", metavar="DIR",
                        help="save the trained encoder here; reuse it if it already holds one trained with the same "
                             "options (default: STORE.encoder)")
    parser.add_argument("--retrain", action="store_true",
                        help="train afresh even if --encoder-dir holds a trained encoder, and replace it")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="per-epoch checkpoints; rerun with it to resume")
    parser.add_argument("--holdout", type=float, default=0.1,
                        help="share of items held out for the likelihood figures (default: 0.1)")


def cmd_encode(args: argparse.Namespace) -> int:
    """``acfrec encode``: :func:`encode_to_store` with ``--set`` options and MLflow tracking."""
    from acfrec.cli import _report_tracking, _setup, _show_progress, _tracker

    setup = _setup(args, model_names=[args.encoder])
    overrides = [*setup.model_overrides.get("*", []), *setup.model_overrides.get(args.encoder, [])]
    tracker = _tracker(setup.config)
    out = encode_to_store(
        args.encoder, args.content, args.out, config=apply_overrides({}, overrides),
        encoder_dir=args.encoder_dir, checkpoint_dir=args.checkpoint_dir, tracker=tracker,
        progress=_show_progress(args), holdout=args.holdout, retrain=args.retrain,
    )
    print(_summary(out))
    _report_tracking(tracker)
    return 0


def _summary(out: Path) -> str:
    from acfrec.data.components import ComponentStore

    store = ComponentStore.open(out)
    lines = [f"{store.meta['encoder']}: {store.n_items} items, {store.matrix.shape[0]} components of dim {store.dim} "
             f"-> {out}"]
    lines += [f"  held-out {key}: {value:.4f}" for key, value in store.meta.get("heldout", {}).items()]
    if store.meta.get("encoder_stopped_early"):
        lines.append(f"  training stopped early: {store.meta['encoder_stopped_early']} (max_seconds)")
    return "\n".join(lines)

