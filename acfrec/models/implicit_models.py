"""The ``implicit`` library's ALS and BPR as acfrec models (``als``, ``implicit-bpr``).

Both are matrix factorisations, so a fitted model is just two factor matrices and the score is
their inner product: ``score(u, i) = user_factors[u] @ item_factors[i]``.

Determinism (measured on ml-100k, 64 factors): ALS gives bit-identical factors for a fixed
``seed`` at any ``num_threads`` (each user/item row is solved on its own). BPR is Hogwild SGD:
with more than one thread the updates race and two runs differ (max score difference ~0.06), so
it is repeatable only with ``num_threads=1``, the default. On two shared cores a second thread
gained nothing measurable for ALS and ~30% for BPR, not worth losing repeatability.

BLAS is limited to one thread during ``fit``, as ``implicit`` recommends: its solvers already run
one small problem per row, and a threaded BLAS underneath them only adds contention.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import implicit.gpu
import numpy as np
import scipy.sparse as sp
import torch
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking
from threadpoolctl import threadpool_limits

from acfrec.data.idmap import check_indices
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.models._factor import fold_in
from acfrec.models.base import ModelConfig, Recommender, TrainData, register


@dataclass
class ALSConfig(ModelConfig):
    """``implicit``'s ALS (Hu, Koren & Volinsky 2008, conjugate-gradient solver).

    ``alpha`` scales the confidence of observed interactions (confidence = alpha * 1.0).
    """

    factors: int = 64
    regularization: float = 0.01
    alpha: float = 1.0
    iterations: int = 15
    use_gpu: bool = False
    num_threads: int = 1
    progress: bool = False


@dataclass
class ImplicitBPRConfig(ModelConfig):
    """``implicit``'s BPR (Rendle et al. 2009), Hogwild SGD over sampled triples."""

    factors: int = 64
    learning_rate: float = 0.01
    regularization: float = 0.01
    iterations: int = 100
    verify_negative_samples: bool = True
    num_threads: int = 1
    progress: bool = False


class _ImplicitMF(Recommender):
    """Shared wrapper: fit an ``implicit`` factorisation, keep its factors as numpy arrays.

    Subclasses only build the ``implicit`` estimator in :meth:`_estimator`.
    """

    _user_factors: np.ndarray | None = None
    _item_factors: np.ndarray | None = None

    @abstractmethod
    def _estimator(self) -> Any:
        """A fresh, unfitted ``implicit`` estimator built from ``self.config``."""

    def _fit(self, data: TrainData) -> None:
        self.history = []

        def on_epoch(iteration: int, seconds: float, *extra: Any) -> None:
            # implicit counts iterations from 0; acfrec's trainer numbers epochs from 1.
            metrics = {"seconds": float(seconds)} | self._epoch_metrics(*extra)
            self.history.append({"epoch": iteration + 1} | metrics)
            for callback in self.callbacks:
                callback(iteration + 1, metrics)

        with threadpool_limits(1, "blas"):
            estimator = self._estimator()
            estimator.fit(data.train, show_progress=self.config.progress, callback=on_epoch)
        if hasattr(estimator, "to_cpu") and not isinstance(estimator.user_factors, np.ndarray):
            estimator = estimator.to_cpu()
        self._set_factors(np.asarray(estimator.user_factors), np.asarray(estimator.item_factors))

    @staticmethod
    def _epoch_metrics(*extra: Any) -> dict[str, float]:
        """Metrics from the extra arguments ``implicit`` passes to its per-epoch callback."""
        return {}

    def _set_factors(self, user_factors: np.ndarray, item_factors: np.ndarray) -> None:
        self._user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
        self._item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)

    def score_all(self, users: np.ndarray) -> torch.Tensor:
        """``(batch,)`` user indices -> ``(batch, n_items)`` float32 inner products."""
        self._require_fitted()
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        check_indices(users, self.n_users, "user")
        return torch.from_numpy(self._user_factors[users]) @ torch.from_numpy(self._item_factors).T

    def score_histories(self, histories: sp.spmatrix) -> torch.Tensor:
        """``(n, n_items)`` sparse histories of new users -> ``(n, n_items)`` float32 scores."""
        histories = self._check_histories(histories)
        vectors = np.asarray(self._history_user_factors(histories), dtype=np.float32)
        return torch.from_numpy(vectors) @ torch.from_numpy(self._item_factors).T

    @abstractmethod
    def _history_user_factors(self, histories: sp.csr_matrix) -> np.ndarray:
        """``(n, n_items)`` CSR histories -> ``(n, dim)`` user factors (same columns as ``user_factors()``)."""

    def user_factors(self) -> np.ndarray:
        """``(n_users, dim)`` user vectors: ``score_all(u) == user_factors()[u] @ item_factors().T``."""
        self._require_fitted()
        return self._user_factors

    def item_factors(self) -> np.ndarray:
        """``(n_items, dim)`` item vectors (for BPR ``dim = factors + 1``, see :class:`ImplicitBPR`)."""
        self._require_fitted()
        return self._item_factors

    def _state(self) -> dict[str, Any]:
        return {
            "user_factors": torch.from_numpy(self._user_factors),
            "item_factors": torch.from_numpy(self._item_factors),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        users = np.asarray(state["user_factors"])
        items = np.asarray(state["item_factors"])
        expected = (self.n_users, self.n_items)
        if (users.shape[0], items.shape[0]) != expected or users.shape[1] != items.shape[1]:
            raise ArtifactError(
                f"{self.name} state does not match seen.npz {expected}: user_factors {users.shape}, "
                f"item_factors {items.shape}"
            )
        self._set_factors(users, items)


@register("als")
class ALS(_ImplicitMF):
    """Implicit-feedback ALS from the ``implicit`` library (CPU unless ``use_gpu``).

    Deterministic for a fixed ``seed`` on CPU at any ``num_threads``. ``fit`` ignores
    validation items: ALS runs a fixed number of ``iterations``.
    """

    config_class: ClassVar[type[ModelConfig]] = ALSConfig
    deterministic: ClassVar[bool] = True

    @staticmethod
    def _epoch_metrics(loss: float | None = None, *_: Any) -> dict[str, float]:
        return {} if loss is None else {"loss": float(loss)}

    def _history_user_factors(self, histories: sp.csr_matrix) -> np.ndarray:
        """``implicit``'s own ``recalculate_user``: the ALS user solve against the fitted item factors."""
        estimator = self._cpu_estimator()
        estimator.item_factors = self._item_factors
        with threadpool_limits(1, "blas"):
            return estimator.recalculate_user(np.arange(histories.shape[0]), histories)

    def _options(self) -> dict[str, Any]:
        config = self.config
        return dict(
            factors=config.factors,
            regularization=config.regularization,
            alpha=config.alpha,
            iterations=config.iterations,
            random_state=config.seed,
        )

    def _cpu_estimator(self) -> Any:
        # The CPU class directly: implicit's factory picks the GPU whenever CUDA is present.
        return AlternatingLeastSquares(**self._options(), num_threads=self.config.num_threads)

    def _estimator(self) -> Any:
        if self.config.use_gpu:
            if not implicit.gpu.HAS_CUDA:
                raise DataValidationError("als: use_gpu=True but the installed implicit has no CUDA support")
            from implicit.gpu.als import AlternatingLeastSquares as GpuALS

            return GpuALS(**self._options())
        return self._cpu_estimator()


@register("implicit-bpr")
class ImplicitBPR(_ImplicitMF):
    """BPR matrix factorisation from the ``implicit`` library (CPU).

    ``implicit`` stores an item bias as one extra factor column, with the matching user column
    fixed at 1.0; both columns are kept, so ``item_factors()`` is ``(n_items, factors + 1)`` and
    the inner product includes the bias, exactly like ``implicit``'s own ``recommend``.
    Repeatable only with ``num_threads=1`` (Hogwild SGD races otherwise).
    """

    config_class: ClassVar[type[ModelConfig]] = ImplicitBPRConfig

    @staticmethod
    def _epoch_metrics(correct: int = 0, skipped: int = 0, *_: Any) -> dict[str, float]:
        # implicit counts sampled triples ranked right, and those skipped (negative was liked).
        return {"correct": float(correct), "skipped": float(skipped)}

    @property
    def deterministic(self) -> bool:
        return self.config.num_threads == 1

    def _history_user_factors(self, histories: sp.csr_matrix) -> np.ndarray:
        """``implicit``'s BPR cannot recalculate a user: fold in (:func:`fold_in`) on the factor
        columns, and keep the bias column's user side at 1.0 as ``implicit`` does."""
        vectors = fold_in(torch.from_numpy(self._item_factors[:, :-1]), histories).numpy()
        return np.hstack([vectors, np.ones((vectors.shape[0], 1), dtype=np.float32)])

    def _estimator(self) -> Any:
        config = self.config
        return BayesianPersonalizedRanking(
            factors=config.factors,
            learning_rate=config.learning_rate,
            regularization=config.regularization,
            iterations=config.iterations,
            verify_negative_samples=config.verify_negative_samples,
            num_threads=config.num_threads,
            random_state=config.seed,
        )
