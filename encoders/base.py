"""The one interface every content encoder has, its registry and its training loop.

An encoder is trained self-supervised on a catalogue's own content, then frozen, and turns each
item into components (one vector per frame, image region or sentence)::

    encoder = get_encoder("pixelcnn")(epochs=2, seed=0)
    encoder.fit(train_corpus, valid=valid_corpus, checkpoint_dir="runs/pixelcnn-ckpt")
    encoder.evaluate(test_corpus)          # {"nll_nats": ..., ...} held-out likelihood figures
    components = encoder.encode(corpus)    # Components(matrix, offsets, item_ids)
    encoder.save("runs/pixelcnn"); Encoder.load("runs/pixelcnn")

A subclass sets ``name``, ``modality`` and ``config_class`` and implements:

* ``_build(corpus) -> nn.Module``: create the network (vocabulary, image shape from ``corpus``);
  whatever must survive save/load besides the state dict goes into ``self.extra`` (JSON-able).
* ``_batches(corpus, rng) -> iterable of batches`` for one training epoch (seeded shuffling).
* ``_loss(batch) -> (loss, {metric: float})`` on a training batch.
  (Neither for an encoder used as it comes, e.g. a pre-trained backbone: it sets
  ``trainable = False`` and :meth:`Encoder.fit` only builds it.)
* ``_encode(corpus) -> Components`` under ``no_grad``.
* ``evaluate(corpus) -> {metric: float}`` held-out figures (NLL in nats, perplexity, KL...).
* ``output_dim``.

``modality`` says what a component is: ``"image"`` (regions of an image), ``"frames"`` (one
vector per image / frame) or ``"text"`` (one vector per sentence). A plain class attribute when it
is fixed; :class:`modality_from_config` when the config decides (an image encoder's
``components = "regions" | "frames"``): then ``Cls.modality`` is the default config's and
``encoder.modality`` its current config's, also after ``fit(corpus, new_config)``.

This package depends on torch (and torchvision for the backbone) only, never on ``acfrec``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from encoders.corpus import Components, Corpus

logger = logging.getLogger(__name__)

ENCODER_FORMAT_VERSION = 1
_REGISTRY: dict[str, type[Encoder]] = {}
E = TypeVar("E", bound=type["Encoder"])
# (epoch, {"loss": ..., "valid_<metric>": ...}) after every epoch: MLflow logging, progress notes.
EpochCallback = Callable[[int, dict[str, float]], None]
# Options that say how far or where a run goes, never what it learns: a checkpoint resumes across them.
_RESUMABLE_ACROSS = frozenset({"epochs", "max_seconds", "device", "num_threads"})


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an encoder available as ``get_encoder(name)``."""

    def decorate(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"encoder name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_encoder(name: str) -> type[Encoder]:
    _import_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_encoders() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def _import_builtin() -> None:
    import encoders  # noqa: F401  (its __init__ imports every built-in encoder module)


@dataclass
class EncoderConfig:
    """Training options every encoder has; subclasses add their architecture's."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0  # intra-op CPU threads while training; 0 keeps torch's default
    max_steps_per_epoch: int = 0  # 0 = the whole corpus each epoch (a budget knob for CPU runs)
    max_seconds: float | None = None  # wall-clock budget of one fit; None = no limit (see Encoder.fit)


class StaleCheckpointError(ValueError):
    """A checkpoint folder's ``last.pt`` was made with other options or on other content."""


class modality_from_config:  # noqa: N801 - used like a class attribute
    """``modality = modality_from_config(rule)``: the modality the config gives, ``rule(config) -> str``.

    On the class it answers for ``config_class()`` (the defaults); on an instance for
    ``instance.config``, so it never disagrees with the config.
    """

    def __init__(self, rule: Callable[[Any], str]) -> None:
        self.rule = rule

    def __get__(self, instance: Encoder | None, owner: type[Encoder]) -> str:
        return self.rule(owner.config_class() if instance is None else instance.config)


class Encoder(ABC):
    """Base class of content encoders (see the module docstring for the contract)."""

    name: ClassVar[str] = "encoder"
    modality: ClassVar[str] = "image"  # "image" (regions), "frames" (one vector per frame), "text"
    config_class: ClassVar[type[EncoderConfig]] = EncoderConfig
    # False for an encoder used as it comes (a pre-trained backbone): fit() builds it and trains
    # nothing, so it needs no _batches / _loss.
    trainable: ClassVar[bool] = True

    def __init__(self, config: EncoderConfig | None = None, **overrides: Any) -> None:
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)}")
        self.config = dataclasses.replace(config, **overrides)
        self.module: nn.Module | None = None
        self.extra: dict[str, Any] = {}
        self.history: list[dict[str, float]] = []
        self.stopped_early: str | None = None  # why the last fit ended before its epochs ("time budget")

    # ---------------------------------------------------------------- subclass hooks
    @property
    @abstractmethod
    def output_dim(self) -> int: ...

    @abstractmethod
    def _build(self, corpus: Corpus) -> nn.Module: ...

    def _batches(self, corpus: Corpus, rng: np.random.Generator) -> Iterable[Any]:
        raise NotImplementedError(f"{self.name} is trainable but implements no _batches")

    def _loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError(f"{self.name} is trainable but implements no _loss")

    @abstractmethod
    def _encode(self, corpus: Corpus) -> Components: ...

    @abstractmethod
    def evaluate(self, corpus: Corpus) -> dict[str, float]: ...

    def _on_epoch_start(self, epoch: int) -> None:  # noqa: B027 (optional hook)
        """Schedules (KL annealing, temperature...) hook; ``epoch`` counts from 1."""

    # ---------------------------------------------------------------- public API
    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    def _require_module(self) -> nn.Module:
        if self.module is None:
            raise RuntimeError(f"{self.name} encoder is not fitted: call fit() or load() first")
        return self.module

    def fit(
        self,
        corpus: Corpus,
        config: EncoderConfig | None = None,
        *,
        valid: Corpus | None = None,
        checkpoint_dir: str | Path | None = None,
        callbacks: Sequence[EpochCallback] = (),
        progress: bool = False,
        restart_stale_checkpoint: bool = False,
    ) -> Encoder:
        """Train on ``corpus``; resumes from ``checkpoint_dir/last.pt`` when it exists.

        A checkpoint made with other options or on other content raises
        :class:`StaleCheckpointError`; with ``restart_stale_checkpoint`` training starts afresh
        instead (and overwrites it).

        ``valid`` adds ``valid_<metric>`` (from :meth:`evaluate`) to every epoch's metrics. A
        frozen encoder (``trainable = False``) is only built (its weights loaded): no epochs, no
        checkpoints, an empty history. With ``config.max_seconds`` training stops after the first
        step past that many wall-clock seconds, checkpoints that (partial, counted as done) epoch
        and sets :attr:`stopped_early` to ``"time budget"``.
        """
        if config is not None:
            self.config = config
        if self.config.max_seconds is not None and not self.config.max_seconds > 0:
            raise ValueError(f"{self.name}: max_seconds must be positive or None, got {self.config.max_seconds}")
        _seed(self.config.seed)
        threads = torch.get_num_threads()
        if self.config.num_threads > 0:
            torch.set_num_threads(self.config.num_threads)
        try:
            self.module = self._build(corpus).to(self.device)
            if self.trainable:
                self._train(corpus, valid, checkpoint_dir, callbacks, progress, restart_stale_checkpoint)
            else:
                logger.info("%s is frozen (trainable=False): built and loaded, nothing to train", self.name)
        finally:
            torch.set_num_threads(threads)
        self.module.eval()
        return self

    def _train(
        self, corpus: Corpus, valid: Corpus | None, checkpoint_dir: str | Path | None,
        callbacks: Sequence[EpochCallback], progress: bool, restart_stale: bool,
    ) -> None:
        """The epochs of :meth:`fit` from the last checkpointed one on, within the time budget."""
        module = self._require_module()
        optimizer = torch.optim.Adam(module.parameters(), lr=self.config.lr)
        start = self._resume(checkpoint_dir, optimizer, restart_stale)
        deadline = None if self.config.max_seconds is None else time.monotonic() + self.config.max_seconds
        for epoch in range(start + 1, self.config.epochs + 1):
            self.stopped_early = None
            record, cut_short = self._epoch(corpus, epoch, optimizer, deadline, progress)
            if valid is not None:
                record.update({f"valid_{k}": v for k, v in self.evaluate(valid).items()})
            record["epoch"] = float(epoch)
            self.history.append(record)
            logger.info("%s epoch %d: %s", self.name, epoch, _fmt(record))
            for callback in callbacks:
                callback(epoch, record)
            if cut_short or (_past(deadline) and epoch < self.config.epochs):
                self.stopped_early = "time budget"
                logger.warning("%s: stopped after epoch %d: the time budget of %gs is spent",
                               self.name, epoch, self.config.max_seconds)
            if checkpoint_dir is not None:
                self._checkpoint(Path(checkpoint_dir), optimizer, epoch)
            if self.stopped_early:
                break

    def _epoch(
        self, corpus: Corpus, epoch: int, optimizer: torch.optim.Optimizer, deadline: float | None, progress: bool
    ) -> tuple[dict[str, float], bool]:
        """One epoch's steps: (mean training metrics plus ``steps``, whether the deadline cut it short)."""
        from tqdm.auto import tqdm

        module = self._require_module()
        rng = np.random.default_rng([self.config.seed, epoch])
        self._on_epoch_start(epoch)
        module.train()
        totals: dict[str, float] = {}
        n_batches, cut_short = 0, False
        for batch in tqdm(self._batches(corpus, rng), desc=f"{self.name} epoch {epoch}", disable=not progress, leave=False):
            loss, metrics = self._loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.grad_clip > 0:
                nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip)
            optimizer.step()
            for key, value in {"loss": float(loss.detach()), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            n_batches += 1
            if self.config.max_steps_per_epoch and n_batches >= self.config.max_steps_per_epoch:
                break
            if _past(deadline):
                cut_short = True
                break
        record = {key: value / max(n_batches, 1) for key, value in totals.items()}
        if not all(math.isfinite(v) for v in record.values()):
            raise FloatingPointError(f"{self.name} epoch {epoch}: non-finite training metrics {record}")
        record["steps"] = float(n_batches)
        return record, cut_short

    def encode(self, corpus: Corpus) -> Components:
        """Components of every item of ``corpus`` (frozen encoder, ``no_grad``)."""
        module = self._require_module()
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                return self._encode(corpus)
        finally:
            module.train(was_training)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Folder ``path`` (atomic): ``meta.json`` (name, version, config, extra), ``state.pt``."""
        module = self._require_module()
        path = Path(path)
        meta = {
            "format_version": ENCODER_FORMAT_VERSION,
            "encoder": self.name,
            "modality": self.modality,
            "output_dim": self.output_dim,
            "config": dataclasses.asdict(self.config),
            "extra": self.extra,
            "history": self.history,
            "stopped_early": self.stopped_early,
            "trainable": self.trainable,
        }
        with _atomic_dir(path) as tmp:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            torch.save({k: v.cpu() for k, v in module.state_dict().items()}, tmp / "state.pt")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Encoder:
        """Load any saved encoder (dispatching on ``meta.json``'s name)."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved encoder: meta.json is missing")
        meta = json.loads(meta_file.read_text())
        if meta.get("format_version") != ENCODER_FORMAT_VERSION:
            raise ValueError(f"{meta_file}: format_version {meta.get('format_version')!r} is not supported")
        encoder_cls = get_encoder(meta["encoder"])
        if cls is not Encoder and not issubclass(encoder_cls, cls):
            raise TypeError(f"{path} holds a {meta['encoder']!r} encoder, not a {cls.__name__}")
        fields = {f.name for f in dataclasses.fields(encoder_cls.config_class)}
        encoder = encoder_cls(encoder_cls.config_class(**{k: v for k, v in meta["config"].items() if k in fields}))
        encoder.extra = meta.get("extra", {})
        encoder.history = meta.get("history", [])
        encoder.stopped_early = meta.get("stopped_early")
        encoder.module = encoder._build_from_extra().to(encoder.device)
        encoder.module.load_state_dict(torch.load(path / "state.pt", weights_only=True))
        encoder.module.eval()
        return encoder

    def _build_from_extra(self) -> nn.Module:
        """Rebuild the network from ``self.config`` and ``self.extra`` alone (used by ``load``).

        Subclasses whose ``_build`` reads the corpus (vocabulary, image shape) store what they
        read in ``self.extra`` there and override this.
        """
        return self._build(None)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self, folder: Path, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "epoch": epoch,
            "module": self._require_module().state_dict(),
            "optimizer": optimizer.state_dict(),
            "extra": self.extra,
            "history": self.history,
            "stopped_early": self.stopped_early,
            "config": dataclasses.asdict(self.config),
            "torch_rng": torch.get_rng_state(),
        }
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".last.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, folder / "last.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _resume(self, folder: str | Path | None, optimizer: torch.optim.Optimizer, restart_stale: bool = False) -> int:
        """Load ``folder/last.pt`` if present; returns the last finished epoch (0 when fresh).

        A checkpoint made with other options (``_RESUMABLE_ACROSS`` aside) or on other content
        is a :class:`StaleCheckpointError`, or with ``restart_stale`` ignored (training starts
        afresh and its first checkpoint replaces it).
        """
        if folder is None or not (Path(folder) / "last.pt").is_file():
            return 0
        state = torch.load(Path(folder) / "last.pt", weights_only=False)
        differences = config_differences(state.get("config", {}), dataclasses.asdict(self.config), _RESUMABLE_ACROSS)
        problem = f"with other options ({describe_differences(differences)})" if differences else ""
        if state["extra"] != self.extra:
            problem = f"on other content (one of {sorted(state['extra'])} differs)"
        if problem and restart_stale:
            logger.warning("%s: %s/last.pt was made %s: training afresh (the next checkpoint replaces it)",
                           self.name, folder, problem)
            return 0
        if problem:
            raise StaleCheckpointError(
                f"checkpoint {folder}/last.pt was made {problem}: use the same options, remove it, "
                "or use another checkpoint_dir"
            )
        self._require_module().load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        self.stopped_early = state.get("stopped_early")
        torch.set_rng_state(state["torch_rng"])
        logger.info("%s: resumed from %s/last.pt after epoch %d", self.name, folder, state["epoch"])
        return int(state["epoch"])


def config_differences(
    saved: Mapping[str, Any], requested: Mapping[str, Any], ignore: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, requested value)}`` for the options both configs have and disagree on.

    Values are compared as JSON (a tuple equals the list it is saved as); keys in ``ignore`` and
    keys only one side has (a field added or removed between versions) are not compared.
    """
    saved, requested = _as_json(saved), _as_json(requested)
    keys = sorted((set(saved) & set(requested)) - set(ignore))
    return {key: (saved[key], requested[key]) for key in keys if saved[key] != requested[key]}


def describe_differences(differences: Mapping[str, tuple[Any, Any]]) -> str:
    """``"lr: saved 0.001, requested 0.003; layers: saved [8], requested [16]"``."""
    return "; ".join(
        f"{key}: saved {json.dumps(old, default=str)}, requested {json.dumps(new, default=str)}"
        for key, (old, new) in differences.items()
    )


def _as_json(values: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(values), default=str))


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _fmt(record: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")


class _atomic_dir:  # noqa: N801 - used as a context manager, like acfrec.utils.atomic_dir
    """Temporary sibling folder renamed onto ``path`` on success (encoders may not import acfrec)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"))
        return self.tmp

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
