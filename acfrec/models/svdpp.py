"""SVD++ (Koren 2008) adapted to implicit feedback and trained with the BPR loss.

``s(u, j) = b_j + q_j . (p_u + |R_u|^(-alpha) * sum_{l in R_u} y_l)`` with ``alpha = 1/2`` as in
the paper. As in FISM, the positive item is left out of the implicit part while training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from acfrec.models._factor import FactorConfig, FactorModule, PooledHistoryRecommender, UserHistory, embedding
from acfrec.models.base import ModelConfig, TrainData, register


@dataclass
class SVDPPConfig(FactorConfig):
    """SVD++ options; ``alpha`` is the exponent of the history normaliser (1/2 in the paper)."""

    alpha: float = 0.5


@register("svdpp")
class SVDPP(PooledHistoryRecommender):
    """Free user factors plus the normalised sum of implicit item factors ``y_l``.

    A new user (``score_histories``) has no free factors: ``p_u = 0``, only the pooled history.
    """

    config_class: ClassVar[type[ModelConfig]] = SVDPPConfig

    def _build(self, data: TrainData) -> FactorModule:
        n_users, n_items = data.train.shape
        module = FactorModule(n_items, self.config)
        module.user = embedding(n_users, self.config.dim, self.config.init_std)
        module.history_item = embedding(n_items, self.config.dim, self.config.init_std)
        module.history = UserHistory(data.train)
        return module

    def _user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        implicit = self.module.history.pool(self.module.history_item.weight, users, self.config.alpha)
        return self.module.user(users) + implicit.full

    def _user_term(self, user: int, target: torch.Tensor) -> float:
        return float(self.module.user.weight[user] @ target)

    def _training_user_vectors(
        self, users: torch.Tensor, positives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = self.module.history.pool(self.module.history_item.weight, users, self.config.alpha, positives)
        free = self.module.user(users)
        norm = free.pow(2).sum(-1) + pooled.mean_square_norm
        return free + pooled.without, free + pooled.full, norm
