"""BPR-MF (Rendle et al. 2009): matrix factorisation trained with the pairwise BPR loss.

``s(u, j) = b_j + p_u . q_j``. A new user known only by a history (``score_histories``) gets
``p`` folded in by regularised least squares against the item factors (:func:`fold_in`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import scipy.sparse as sp
import torch

from acfrec.models._factor import FactorConfig, FactorModule, FactorRecommender, embedding, fold_in
from acfrec.models.base import ModelConfig, TrainData, register


@dataclass
class BPRMFConfig(FactorConfig):
    """BPR-MF options; the shared defaults of :class:`FactorConfig` are tuned for it too."""


@register("bpr-mf")
class BPRMF(FactorRecommender):
    """Matrix factorisation with BPR loss; ``item_factors`` are the item embeddings ``q_j``."""

    config_class: ClassVar[type[ModelConfig]] = BPRMFConfig

    def _build(self, data: TrainData) -> FactorModule:
        n_users, n_items = data.train.shape
        module = FactorModule(n_items, self.config)
        module.user = embedding(n_users, self.config.dim, self.config.init_std)
        return module

    def _user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return self.module.user(users)

    def _history_user_vectors(self, histories: sp.csr_matrix) -> torch.Tensor:
        return fold_in(self.module.item.weight, histories)

    def _training_user_vectors(
        self, users: torch.Tensor, positives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vectors = self.module.user(users)
        return vectors, vectors, vectors.pow(2).sum(-1)
