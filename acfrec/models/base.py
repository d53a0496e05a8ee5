"""The one ``Recommender`` shape every model has, and the registry by name.

Like ``implicit``'s base class: ``fit / score / recommend / similar_items / save / load``; every
model differs only in a few hooks. Indices are dense int64 (see :mod:`acfrec.data.idmap`).

* Plain models subclass :class:`Recommender` and implement ``_fit``, ``score_all`` and the
  state hooks ``_state`` / ``_set_state``.
* Torch models subclass :class:`TorchRecommender`, implement ``_build``, ``_loss`` and
  ``_score_all``, and are trained by the one shared :class:`acfrec.train.Trainer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from acfrec.data.idmap import IdMap, check_indices
from acfrec.data.split import Split
from acfrec.errors import ArtifactError, DataValidationError, NotFittedError
from acfrec.utils import atomic_dir

FORMAT_VERSION = 1

_REGISTRY: dict[str, type[Recommender]] = {}
R = TypeVar("R", bound="type[Recommender]")


def register(name: str) -> Callable[[R], R]:
    """Class decorator: make a model available as ``get_model(name)`` and to the CLI."""

    def decorate(cls: R) -> R:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_model(name: str) -> type[Recommender]:
    import acfrec.models  # noqa: F401  (imports every model module, filling the registry)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def available_models() -> list[str]:
    import acfrec.models  # noqa: F401

    return sorted(_REGISTRY)


@dataclass
class ModelConfig:
    """Base of every model's config dataclass. ``seed`` makes a CPU run repeatable."""

    seed: int = 0


@dataclass
class TrainData:
    """What ``fit`` sees.

    Attributes:
        train: ``(n_users, n_items)`` CSR float32 of training interactions (1.0 each).
        valid_items: ``(n_users,)`` int64 validation item per user (-1 none) for early stopping.
        train_frame: optional ordered interactions (``user``, ``item``, ``timestamp``) when
            the order of a history matters (most-recent capping).
        split: the Split it came from, when there is one (gives ``seen('valid')``).
    """

    train: sp.csr_matrix
    valid_items: np.ndarray | None = None
    train_frame: pl.DataFrame | None = None
    split: Split | None = None

    @classmethod
    def coerce(cls, train: Split | sp.spmatrix | TrainData, valid: np.ndarray | None = None) -> TrainData:
        if isinstance(train, TrainData):
            return train
        if isinstance(train, Split):
            cls._check_valid(valid, train.n_users)
            return cls(train.train, train.valid_items if valid is None else np.asarray(valid, dtype=np.int64),
                       train.train_frame, train)
        if sp.issparse(train):
            matrix = sp.csr_matrix(train, dtype=np.float32)
            matrix.data[:] = 1.0
            cls._check_valid(valid, matrix.shape[0])
            return cls(matrix, None if valid is None else np.asarray(valid, dtype=np.int64))
        raise DataValidationError(
            f"fit expects a Split or a scipy sparse (n_users, n_items) matrix, got {type(train).__name__}"
        )

    @staticmethod
    def _check_valid(valid: np.ndarray | None, n_users: int) -> None:
        if valid is not None and np.asarray(valid).shape != (n_users,):
            raise DataValidationError(f"valid must have shape (n_users,) = ({n_users},), got {np.asarray(valid).shape}")


class Recommender(ABC):
    """Base class of every acfrec model.

    Subclasses set ``config_class`` and implement ``_fit``, ``score_all``, ``_state`` and
    ``_set_state``. After ``fit`` (or ``load``), ``n_users``, ``n_items`` and ``seen`` (the
    training matrix, excluded by ``recommend``) are set. ``users`` / ``items`` are the external
    id maps when the model was fitted on a Split (saved with it), else None.
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ModelConfig | None = None, **overrides: Any) -> None:
        config = config or self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown config option(s) {unknown}; known: {sorted(known)}")
        self.config = dataclasses.replace(config, **overrides)
        self.seen: sp.csr_matrix | None = None
        self.users: IdMap | None = None
        self.items: IdMap | None = None
        self.history: list[dict] = []
        # Called as callback(epoch, metrics) after each training epoch (tracking hooks in here;
        # models themselves never log).
        self.callbacks: list[Callable[[int, dict], None]] = []

    # ----------------------------------------------------------------- fitting
    def fit(self, train: Split | sp.spmatrix | TrainData, valid: np.ndarray | None = None) -> Recommender:
        """Train on ``train`` (a Split or a ``(n_users, n_items)`` sparse matrix); returns self.

        ``valid`` is a ``(n_users,)`` array of validation items (-1 for none) for early stopping;
        taken from the Split when one is given.
        """
        data = TrainData.coerce(train, valid)
        if data.train.nnz == 0:
            raise DataValidationError("cannot fit on an empty training matrix (no interactions)")
        # Set before _fit because training evaluates through score_all; undone on failure so a
        # half-trained model never looks fitted.
        self.seen = data.train
        split = data.split
        self.users, self.items = (split.users, split.items) if split is not None else (None, None)
        try:
            self._fit(data)
        except BaseException:
            self.seen = self.users = self.items = None
            raise
        return self

    @abstractmethod
    def _fit(self, data: TrainData) -> None: ...

    @property
    def n_users(self) -> int:
        return self._require_fitted().shape[0]

    @property
    def n_items(self) -> int:
        return self._require_fitted().shape[1]

    def _require_fitted(self) -> sp.csr_matrix:
        if self.seen is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or load() first")
        return self.seen

    # ----------------------------------------------------------------- scoring
    @abstractmethod
    def score_all(self, users: np.ndarray) -> torch.Tensor:
        """Scores of every item for ``users``: ``(batch,)`` int64 -> ``(batch, n_items)`` float32 tensor."""

    def score(self, users: np.ndarray | list[int], items: np.ndarray | list[int]) -> np.ndarray:
        """Candidate scores, higher is better.

        Args:
            users: ``(batch,)`` user indices.
            items: ``(n_candidates,)`` shared by every user, or ``(batch, n_candidates)``.
        Returns:
            ``(batch, n_candidates)`` float32.
        """
        users, items = self._check_score_input(users, items)
        return self._score_pairs(users, items)

    def _score_pairs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Default: gather from ``score_all``; models with a cheaper pair score override this."""
        scores = self.score_all(users)
        return torch.gather(scores, 1, torch.as_tensor(items)).cpu().numpy().astype(np.float32)

    def _check_score_input(self, users: Any, items: Any) -> tuple[np.ndarray, np.ndarray]:
        self._require_fitted()
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        items = np.asarray(items, dtype=np.int64)
        if items.ndim == 1:
            items = np.repeat(items[None, :], users.size, axis=0)
        if items.ndim != 2 or items.shape[0] != users.size:
            raise DataValidationError(
                f"items must have shape (n_candidates,) or (n_users, n_candidates) = ({users.size}, m), got {items.shape}"
            )
        if items.shape[1] == 0:
            raise DataValidationError("empty candidate list: give at least one item to score")
        check_indices(users, self.n_users, "user")
        check_indices(items, self.n_items, "item")
        return users, np.ascontiguousarray(items)

    def recommend(
        self,
        users: np.ndarray | list[int],
        k: int = 10,
        exclude_seen: bool = True,
        exclude: sp.csr_matrix | None = None,
        batch_size: int = 2048,
        allow: np.ndarray | list[int] | None = None,
        deny: np.ndarray | list[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per user.

        Args:
            users: ``(batch,)`` user indices.
            exclude_seen: drop the user's training items.
            exclude: optional extra ``(n_users, n_items)`` CSR of items to drop.
            allow: optional ``(m,)`` item indices; only these may be recommended.
            deny: optional ``(m,)`` item indices never recommended.
        Returns:
            ``(items, scores)``, each ``(batch, k)``; item -1 / score -inf pad rows of users with
            fewer than ``k`` unseen items.
        """
        seen = self._require_fitted()
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        check_indices(users, self.n_users, "user")
        self._check_k(k)
        masks = [m for m in (seen if exclude_seen else None, exclude) if m is not None]
        blocked = self.blocked_items(allow, deny)
        out_items = np.empty((users.size, k), dtype=np.int64)
        out_scores = np.empty((users.size, k), dtype=np.float32)
        for start in range(0, users.size, batch_size):
            chunk = users[start : start + batch_size]
            rows = slice(start, start + chunk.size)
            out_items[rows], out_scores[rows] = masked_top_k(
                self.score_all(chunk), k, [mask[chunk] for mask in masks], blocked
            )
        return out_items, out_scores

    def _check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 < k <= self.n_items:
            raise DataValidationError(f"k must be an integer in 1..n_items={self.n_items}, got {k!r}")

    def blocked_items(
        self, allow: np.ndarray | list[int] | None = None, deny: np.ndarray | list[int] | None = None
    ) -> np.ndarray | None:
        """``(n_items,)`` bool, True for items an allow list leaves out or a deny list names; None without lists."""
        if allow is None and deny is None:
            return None
        blocked = np.zeros(self.n_items, dtype=bool)
        if allow is not None:
            allowed = np.asarray(allow, dtype=np.int64).reshape(-1)
            check_indices(allowed, self.n_items, "item")
            blocked[:] = True
            blocked[allowed] = False
        if deny is not None:
            denied = np.asarray(deny, dtype=np.int64).reshape(-1)
            check_indices(denied, self.n_items, "item")
            blocked[denied] = True
        return blocked

    def score_histories(self, histories: sp.spmatrix) -> torch.Tensor:
        """Scores of every item for users known only by their histories (no fitted user row).

        Args:
            histories: ``(n, n_items)`` sparse matrix, nonzero where the new user consumed an item.
        Returns:
            ``(n, n_items)`` float32 tensor, higher is better (history items are not removed).
        Models without a history-based user representation raise NotImplementedError.
        """
        raise NotImplementedError(
            f"{type(self).__name__} ({self.name!r}) cannot score a new user from a history: it has no "
            "score_histories (models that do: itempop, bpr-mf, fism, svdpp, als, implicit-bpr, acf)"
        )

    def _check_histories(self, histories: Any) -> sp.csr_matrix:
        """``histories`` as a ``(n, n_items)`` CSR of 1.0 with sorted indices; DataValidationError otherwise."""
        self._require_fitted()
        if not sp.issparse(histories):
            raise DataValidationError(
                f"histories must be a scipy sparse (n, n_items={self.n_items}) matrix, got {type(histories).__name__}"
            )
        if histories.ndim != 2 or histories.shape[1] != self.n_items:
            raise DataValidationError(f"histories must have shape (n, n_items={self.n_items}), got {histories.shape}")
        matrix = sp.csr_matrix(histories, dtype=np.float32, copy=True)
        matrix.eliminate_zeros()
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        return matrix

    def item_factors(self) -> np.ndarray | None:
        """``(n_items, dim)`` item vectors when the score is an inner product with them, else None."""
        return None

    def similar_items(self, items: np.ndarray | list[int], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` most similar items (cosine of ``item_factors``), the item itself excluded.

        Returns ``(items, scores)``, each ``(batch, k)``.
        """
        self._require_fitted()
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        check_indices(items, self.n_items, "item")
        if not 0 < k < self.n_items:
            raise DataValidationError(f"k must be in 1..n_items-1={self.n_items - 1}, got {k}")
        factors = self.item_factors()
        if factors is None:
            raise NotImplementedError(f"{type(self).__name__} has no item vectors for similar_items")
        vectors = torch.nn.functional.normalize(torch.as_tensor(factors, dtype=torch.float32), dim=1)
        similarity = vectors[torch.as_tensor(items)] @ vectors.T
        similarity[torch.arange(items.size), torch.as_tensor(items)] = -torch.inf
        top_scores, top_items = torch.topk(similarity, k, dim=1)
        return top_items.numpy(), top_scores.numpy()

    # ------------------------------------------------------------ persistence
    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """Arrays/tensors that, with the config and ``seen``, restore the fitted model."""

    @abstractmethod
    def _set_state(self, state: dict[str, Any]) -> None: ...

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to folder ``path`` atomically: ``meta.json``, ``seen.npz``, ``state.pt``."""
        seen = self._require_fitted()
        path = Path(path)
        with atomic_dir(path) as tmp:
            meta = {
                "format_version": FORMAT_VERSION,
                "model": self.name,
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "config": dataclasses.asdict(self.config),
                "n_users": int(seen.shape[0]),
                "n_items": int(seen.shape[1]),
                "history": self.history,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            sp.save_npz(tmp / "seen.npz", seen)
            torch.save(self._state(), tmp / "state.pt")
            for id_map, name in ((self.users, "users.json"), (self.items, "items.json")):
                if id_map is not None:
                    id_map.save(tmp / name)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recommender:
        """Load any saved model (dispatching on ``meta.json``'s model name)."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise ArtifactError(f"{path} is not a saved acfrec model: {meta_path.name} is missing")
        meta = json.loads(meta_path.read_text())
        model_cls = get_model(meta["model"])
        if cls is not Recommender and not issubclass(model_cls, cls):
            raise ArtifactError(f"{path} holds a {meta['model']!r} model, not a {cls.__name__}")
        config_fields = {f.name for f in dataclasses.fields(model_cls.config_class)}
        config = model_cls.config_class(**{k: v for k, v in meta["config"].items() if k in config_fields})
        model = model_cls(config)
        for name in ("seen.npz", "state.pt"):
            if not (path / name).is_file():
                raise ArtifactError(f"saved model {path} is incomplete: {name} is missing")
        model.seen = sp.load_npz(path / "seen.npz").tocsr()
        model.history = meta.get("history", [])
        model.users, model.items = _load_id_maps(path, model.seen.shape)
        model._set_state(torch.load(path / "state.pt", weights_only=False))
        return model


def _load_id_maps(path: Path, shape: tuple[int, int]) -> tuple[IdMap | None, IdMap | None]:
    """The saved ``users.json`` / ``items.json`` (None for folders saved without them), checked against ``shape``."""
    maps = []
    for name, expected in (("users.json", shape[0]), ("items.json", shape[1])):
        id_map = IdMap.load(path / name) if (path / name).is_file() else None
        if id_map is not None and len(id_map) != expected:
            raise ArtifactError(f"{path / name} has {len(id_map)} ids but seen.npz has {expected} rows/columns for them")
        maps.append(id_map)
    return maps[0], maps[1]


def masked_top_k(
    scores: torch.Tensor, k: int, exclude: Sequence[sp.csr_matrix] = (), blocked: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``(batch, n_items)`` scores with per-row and per-column exclusions.

    Args:
        exclude: ``(batch, n_items)`` CSR matrices; their nonzeros are dropped.
        blocked: ``(n_items,)`` bool columns dropped for every row.
    Returns:
        ``(items, scores)``, ``(batch, k)`` int64 / float32, best first; item -1 and score -inf
        where fewer than ``k`` items remain.
    """
    scores = scores.float().clone()
    for mask in exclude:
        rows, cols = mask.nonzero()
        scores[torch.as_tensor(rows), torch.as_tensor(cols)] = -torch.inf
    if blocked is not None:
        scores[:, torch.as_tensor(blocked)] = -torch.inf
    top_scores, top_items = torch.topk(scores, k, dim=1)
    top_items[torch.isinf(top_scores) & (top_scores < 0)] = -1
    return top_items.cpu().numpy(), top_scores.cpu().numpy()


@dataclass
class TorchConfig(ModelConfig):
    """Training options shared by every torch model (read by :class:`acfrec.train.Trainer`)."""

    dim: int = 64
    epochs: int = 30
    batch_size: int = 1024
    lr: float = 0.005
    optimizer: str = "adam"  # adam | adagrad
    weight_decay: float = 0.0  # L2 on the parameters touched by a batch, see each model's _loss
    n_negatives: int = 1
    patience: int = 5  # epochs without validation NDCG@eval_k improvement before stopping
    # Early stopping cannot fire before this many epochs (0: from the first). A validation curve
    # that dips after its first epochs for longer than the patience (FISM on the "stray" preset,
    # benchmarks/FINDINGS.md, "min_epochs") would otherwise stop there; the best epoch is still
    # the one kept.
    min_epochs: int = 0
    eval_every: int = 1
    eval_k: int = 10
    # Half-life, in epochs, of an exponential moving average of the weights (0: off). When on,
    # validation, early stopping and the fitted model use the average, not the last step's
    # weights: it smooths the sampling noise of the last steps, which otherwise moves a single
    # run's ranking by about as much as the effects the planted benchmarks measure
    # (benchmarks/FINDINGS.md, "Weight averaging").
    average_half_life: float = 0.0
    checkpoint_dir: str | None = None  # resume an interrupted run from here when set
    device: str = "cpu"
    progress: bool = True
    # Intra-op CPU threads while training. Embedding-sized ops gain little from more threads and
    # lose badly when cores are shared (measured on ML-100K, 2 cores under load: BPR-MF epoch
    # 0.64 s with 1 thread vs 5.9-8.3 s with 2). 0 keeps torch's default.
    num_threads: int = 1


@contextlib.contextmanager
def scoring(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the module's previous mode is restored after it."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def training_threads(num_threads: int) -> Iterator[None]:
    """``num_threads`` intra-op threads for the block (0: unchanged); the previous count after it."""
    threads = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TorchRecommender(Recommender):
    """A model trained by the shared trainer on BPR triples.

    Subclasses implement:
      * ``_build(data) -> torch.nn.Module``: create parameters (and buffers from ``data.train``).
      * ``_loss(users, positives, negatives) -> scalar tensor``: ``(batch,)``, ``(batch,)``,
        ``(batch, n_negatives)`` int64 tensors on ``self.device``.
      * ``_score_all(users) -> (batch, n_items)`` tensor, under no_grad.
    The module's state dict is the saved state; ``_build`` is re-run on load from ``seen``.
    """

    config_class: ClassVar[type[ModelConfig]] = TorchConfig
    module: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    def _fit(self, data: TrainData) -> None:
        from acfrec.train import Trainer

        torch.manual_seed(self.config.seed)
        self.module = self._build(data).to(self.device)
        with training_threads(self.config.num_threads):
            self.history = Trainer(self.config, callbacks=self.callbacks, validator=self._validator()).fit(self, data)

    @property
    def starts_trained(self) -> bool:
        """True when ``_build`` returns an already trained module (pre-training): the Trainer then
        validates it before the first epoch and keeps it if training does not beat it."""
        return False

    def _validator(self) -> Callable[[TorchRecommender, TrainData], float] | None:
        """The early-stopping score ``validator(model, data)`` (higher is better); None: the
        Trainer's default, validation NDCG@``eval_k``."""
        return None

    @abstractmethod
    def _build(self, data: TrainData) -> torch.nn.Module: ...

    @abstractmethod
    def _loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _score_all(self, users: torch.Tensor) -> torch.Tensor: ...

    def score_all(self, users: np.ndarray) -> torch.Tensor:
        self._require_fitted()
        assert self.module is not None
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        check_indices(users, self.n_users, "user")
        users_t = torch.as_tensor(users, device=self.device)
        with scoring(self.module):
            return self._score_all(users_t).float().cpu()

    def _state(self) -> dict[str, Any]:
        assert self.module is not None
        return {"module": {k: v.cpu() for k, v in self.module.state_dict().items()}}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.module = self._build(TrainData(self._require_fitted())).to(self.device)
        self.module.load_state_dict(state["module"])
