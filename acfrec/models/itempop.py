"""ItemPop: every user gets the items ranked by training popularity."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from acfrec.models.base import Recommender, TrainData, register


@register("itempop")
class ItemPop(Recommender):
    """Score of item ``j`` = number of training interactions with ``j``, the same for every user."""

    counts: torch.Tensor | None = None

    def _fit(self, data: TrainData) -> None:
        counts = np.asarray(data.train.sum(axis=0), dtype=np.float32).reshape(-1)
        self.counts = torch.as_tensor(counts)

    def _popularity(self) -> torch.Tensor:
        self._require_fitted()
        assert self.counts is not None
        return self.counts

    def score_all(self, users: np.ndarray) -> torch.Tensor:
        """``(batch,)`` -> ``(batch, n_items)`` float32: the popularity row repeated."""
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        return self._popularity().expand(users.size, -1).clone()

    def score_histories(self, histories: sp.spmatrix) -> torch.Tensor:
        """``(n, n_items)`` histories -> ``(n, n_items)``: popularity, whatever the history."""
        histories = self._check_histories(histories)
        return self._popularity().expand(histories.shape[0], -1).clone()

    def _score_pairs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self._popularity().numpy()[items]

    def _state(self) -> dict[str, Any]:
        return {"counts": self._popularity()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.counts = torch.as_tensor(state["counts"], dtype=torch.float32)
