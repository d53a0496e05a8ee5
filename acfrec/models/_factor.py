"""Shared pieces of the inner-product baselines (BPR-MF, FISM, SVD++).

All three score ``s(u, j) = b_j + x_u . q_j`` and differ only in the user vector ``x_u``:
a free embedding (BPR-MF), the normalised sum of the user's history embeddings (FISM), or both
(SVD++). :class:`FactorRecommender` holds the item side, the pairwise/pointwise losses and the L2
term; :class:`UserHistory` pools history embeddings for FISM and SVD++ without a per-user loop.

A user known only by a history (``score_histories``) gets ``x`` from that history: pooled
(:class:`PooledHistoryRecommender`: FISM, SVD++ with ``p_u = 0``) or folded in by regularised
least squares against the item factors (:func:`fold_in`: BPR-MF, ``implicit``'s BPR).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from acfrec.data.idmap import check_indices
from acfrec.models.base import ModelConfig, TorchConfig, TorchRecommender, scoring

LOSSES = ("bpr", "log")
# Fold-in of a new user's history (see fold_in): weight of a consumed item against the weight 1 of
# every other item, and the ridge term relative to the mean eigenvalue of Q^T Q. Picked on ML-100K
# leave-one-out (full-ranking test HR@10 of the training histories folded in, against the learned
# user vectors): BPR-MF 0.123 vs 0.117, implicit's BPR 0.117 vs 0.127; confidence 2-20 or no item
# bias in the score did worse (0.087-0.118).
FOLD_IN_CONFIDENCE = 100.0
FOLD_IN_REGULARIZATION = 0.1


@dataclass
class FactorConfig(TorchConfig):
    """Options of the inner-product baselines on top of :class:`TorchConfig`.

    ``loss``: "bpr" (``-log sigmoid(s_pos - s_neg)``, averaged over negatives) or "log"
    (pointwise, ``-log sigmoid(s_pos) - log(1 - sigmoid(s_neg))``). ``init_std``: standard
    deviation of the normal initialisation of every embedding. The defaults were tuned on
    ML-100K leave-one-out (dim 64, early stopping on validation NDCG@10; ~40-60 epochs run).
    """

    epochs: int = 100
    lr: float = 0.002
    weight_decay: float = 0.001
    patience: int = 10
    item_bias: bool = True
    loss: str = "bpr"
    init_std: float = 0.01


def pair_loss(kind: str, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Mean loss of ``(batch,)`` positive and ``(batch, n_negatives)`` negative scores."""
    if kind == "bpr":
        return F.softplus(negative - positive[:, None]).mean()
    if kind == "log":
        # softplus(-x) = -log sigmoid(x), softplus(x) = -log(1 - sigmoid(x)), both stable
        return F.softplus(-positive).mean() + F.softplus(negative).mean(dim=1).mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def embedding(n: int, dim: int, std: float) -> nn.Embedding:
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=std)
    return table


@dataclass
class Pooled:
    """Pooled histories of a batch of users.

    Attributes:
        full: ``(batch, d)`` ``|R_u|^(-alpha) * sum_{l in R_u} e_l``.
        without: ``(batch, d)`` the same over ``R_u`` minus the excluded item, or None.
        mean_square_norm: ``(batch,)`` mean squared norm of the history rows (the L2 term).
    """

    full: torch.Tensor
    without: torch.Tensor | None
    mean_square_norm: torch.Tensor


class UserHistory(nn.Module):
    """The training histories ``R_u`` (CSR buffers) and their pooled embeddings.

    ``pool`` computes ``|R_u|^(-alpha) * sum_{l in R_u} e_l`` for a batch with one
    ``embedding_bag`` over the batch's distinct users, so each history is summed once per batch
    however often its user appears in it (no per-user loop, no dense user-item matrix).
    """

    def __init__(self, train: sp.csr_matrix) -> None:
        super().__init__()
        train = train.tocsr()
        train.sort_indices()
        self.register_buffer("indptr", torch.as_tensor(train.indptr.astype(np.int64)), persistent=False)
        self.register_buffer("indices", torch.as_tensor(train.indices.astype(np.int64)), persistent=False)

    def sums(self, table: torch.Tensor, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_{l in R_u} table[l]`` and ``|R_u|``: ``(batch,)`` -> ``(batch, d)``, ``(batch,)``."""
        distinct, inverse = torch.unique(users, return_inverse=True)
        starts, stops = self.indptr[distinct], self.indptr[distinct + 1]
        counts = stops - starts
        offsets = torch.cumsum(counts, 0) - counts
        # positions of every history entry of the distinct users, laid out bag after bag
        within = torch.arange(int(counts.sum()), device=users.device) - torch.repeat_interleave(offsets, counts)
        flat = self.indices[torch.repeat_interleave(starts, counts) + within]
        pooled = F.embedding_bag(flat, table, offsets, mode="sum")
        return pooled.index_select(0, inverse), counts[inverse]  # index_select: deterministic backward

    def pool(self, table: torch.Tensor, users: torch.Tensor, alpha: float, exclude: torch.Tensor | None = None) -> Pooled:
        """Normalised history vectors of ``users``.

        Args:
            table: ``(n_items, d)`` history embeddings.
            users: ``(batch,)`` user indices.
            exclude: optional ``(batch,)`` items, each in its user's history (the training
                positive): ``Pooled.without`` then pools ``R_u \\ {exclude}`` with normaliser
                ``(|R_u| - 1)^(-alpha)``, zero when that set is empty.
        """
        # the squared norms ride along as one more column: one pass over the histories
        sums, counts = self.sums(torch.cat([table, table.pow(2).sum(dim=1, keepdim=True)], dim=1), users)
        sums, square_norms = sums[:, :-1], sums[:, -1]
        without = None
        if exclude is not None:
            # F.embedding, not table[exclude]: advanced-indexing backward is not deterministic on CPU
            without = _normalise(sums - F.embedding(exclude, table), counts - 1, alpha)
        return Pooled(_normalise(sums, counts, alpha), without, square_norms / counts.clamp(min=1))


def _normalise(sums: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    scale = counts.clamp(min=1).to(sums.dtype).pow(-alpha) * (counts > 0)
    return sums * scale[:, None]


def pool_histories(table: torch.Tensor, histories: sp.csr_matrix, alpha: float) -> torch.Tensor:
    """``|H|^(-alpha) * sum_{l in H} table[l]`` for each row ``H`` of ``histories``.

    Args:
        table: ``(n_items, d)`` history embeddings.
        histories: ``(n, n_items)`` CSR, nonzero on each row's history items.
    Returns:
        ``(n, d)``, zero rows for empty histories.
    """
    indptr = torch.as_tensor(histories.indptr.astype(np.int64), device=table.device)
    indices = torch.as_tensor(histories.indices.astype(np.int64), device=table.device)
    if histories.shape[0] == 0:
        return table.new_zeros((0, table.shape[1]))
    sums = F.embedding_bag(indices, table, indptr[:-1], mode="sum")
    return _normalise(sums, indptr[1:] - indptr[:-1], alpha)


def padded_histories(histories: sp.csr_matrix, pad: int) -> torch.Tensor:
    """``(n, n_items)`` CSR -> ``(n, longest history)`` int64 item indices, ``pad`` after each row's items."""
    counts = np.diff(histories.indptr)
    rows = np.repeat(np.arange(histories.shape[0]), counts)
    columns = np.arange(histories.nnz) - np.repeat(histories.indptr[:-1] - histories.indptr[0], counts)
    padded = np.full((histories.shape[0], int(counts.max(initial=0))), pad, dtype=np.int64)
    padded[rows, columns] = histories.indices[histories.indptr[0] : histories.indptr[-1]]
    return torch.as_tensor(padded)


def fold_in(
    item_factors: torch.Tensor,
    histories: sp.csr_matrix,
    confidence: float = FOLD_IN_CONFIDENCE,
    regularization: float = FOLD_IN_REGULARIZATION,
    relative: bool = True,
    chunk: int = 512,
) -> torch.Tensor:
    """User vectors of new users from their histories, by weighted regularised least squares.

    ``x = argmin_x sum_j c_j (p_j - x . q_j)^2 + lambda |x|^2`` over every item ``j``, with
    ``p_j = 1, c_j = confidence`` on the history and ``p_j = 0, c_j = 1`` elsewhere (the implicit
    ALS objective of Hu, Koren & Volinsky 2008, solved for one side). Closed form:
    ``(Q^T Q + (c - 1) Q_H^T Q_H + lambda I) x = c Q_H^T 1``; with ``relative`` ``lambda`` is
    ``regularization`` times the mean eigenvalue of ``Q^T Q`` (scale-free for factors trained by
    a ranking loss), else ``regularization`` itself (``implicit``'s ALS convention).

    Args:
        item_factors: ``(n_items, d)`` item vectors ``q_j`` (no bias column).
        histories: ``(n, n_items)`` CSR with sorted indices, one row per new user.
    Returns:
        ``(n, d)`` float32 user vectors (zeros for empty histories).
    """
    factors = item_factors.detach().float().cpu()
    dim = factors.shape[1]
    gram = factors.T @ factors
    ridge = regularization * (gram.trace() / dim if relative else 1.0)
    base = gram + ridge * torch.eye(dim)
    padded_factors = torch.cat([factors, factors.new_zeros((1, dim))])  # row n_items = padding
    rhs = confidence * torch.as_tensor(histories @ factors.numpy(), dtype=torch.float32).reshape(-1, dim)
    out = factors.new_zeros((histories.shape[0], dim))
    for start in range(0, histories.shape[0], chunk):
        rows = slice(start, min(start + chunk, histories.shape[0]))
        history = padded_factors[padded_histories(histories[rows], factors.shape[0])]  # (c, L, d)
        system = base + (confidence - 1.0) * history.transpose(1, 2) @ history  # (c, d, d)
        out[rows] = torch.linalg.solve(system, rhs[rows])
    return out


class FactorModule(nn.Module):
    """Item side shared by the inner-product models; subclasses' ``_build`` add the user side."""

    def __init__(self, n_items: int, config: FactorConfig) -> None:
        super().__init__()
        if config.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {config.loss!r}")
        self.item = embedding(n_items, config.dim, config.init_std)
        self.item_bias = nn.Embedding(n_items, 1) if config.item_bias else None
        if self.item_bias is not None:
            nn.init.zeros_(self.item_bias.weight)

    def bias(self, items: torch.Tensor) -> torch.Tensor | float:
        """``items`` of any shape -> biases of that shape (0.0 without item bias)."""
        return 0.0 if self.item_bias is None else self.item_bias(items).squeeze(-1)


class FactorRecommender(TorchRecommender):
    """``s(u, j) = b_j + x_u . q_j`` trained on BPR triples.

    Subclasses build a :class:`FactorModule` (with their user-side parameters) and implement
    ``_user_vectors`` (scoring) and ``_training_user_vectors`` (training, where a history-based
    user vector must leave out the positive item it is asked to predict).
    """

    config_class: ClassVar[type[ModelConfig]] = FactorConfig
    module: FactorModule | None

    @abstractmethod
    def _user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """``(batch,)`` -> ``(batch, dim)`` user vectors from the full training history."""

    @abstractmethod
    def _training_user_vectors(
        self, users: torch.Tensor, positives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x for the positive, x for the negatives, squared norm of the user-side parameters)``.

        Shapes ``(batch, dim)``, ``(batch, dim)``, ``(batch,)``.
        """

    def _loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        module = self.module
        assert module is not None
        for_positive, for_negatives, user_norm = self._training_user_vectors(users, positives)
        q_pos, q_neg = module.item(positives), module.item(negatives)
        b_pos, b_neg = module.bias(positives), module.bias(negatives)
        s_pos = (for_positive * q_pos).sum(-1) + b_pos
        s_neg = torch.einsum("bd,bkd->bk", for_negatives, q_neg) + b_neg
        loss = pair_loss(self.config.loss, s_pos, s_neg)
        if self.config.weight_decay:
            norm = user_norm + q_pos.pow(2).sum(-1) + q_neg.pow(2).sum(-1).mean(-1)
            if module.item_bias is not None:
                norm = norm + b_pos.pow(2) + b_neg.pow(2).mean(-1)
            loss = loss + self.config.weight_decay * norm.mean()
        return loss

    def _score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self._score_vectors(self._user_vectors(users))

    def _score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(batch, dim)`` user vectors -> ``(batch, n_items)`` scores ``x . q_j + b_j``."""
        module = self.module
        assert module is not None
        scores = vectors @ module.item.weight.T
        if module.item_bias is not None:
            scores = scores + module.item_bias.weight[:, 0]
        return scores

    @abstractmethod
    def _history_user_vectors(self, histories: sp.csr_matrix) -> torch.Tensor:
        """``(n, n_items)`` CSR histories of new users -> ``(n, dim)`` user vectors."""

    def score_histories(self, histories: sp.spmatrix) -> torch.Tensor:
        """``(n, n_items)`` sparse histories of new users -> ``(n, n_items)`` float32 scores.

        The user vector comes from the history alone (see :meth:`_history_user_vectors` of
        each model); the item side and bias are the fitted ones.
        """
        histories = self._check_histories(histories)
        assert self.module is not None
        with torch.no_grad():
            return self._score_vectors(self._history_user_vectors(histories).to(self.device)).float().cpu()

    def _score_pairs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        module = self.module
        assert module is not None
        users_t = torch.as_tensor(users, device=self.device)
        items_t = torch.as_tensor(items, device=self.device)
        with scoring(module):
            scores = torch.einsum("bd,bmd->bm", self._user_vectors(users_t), module.item(items_t))
            scores = scores + module.bias(items_t)
        return scores.float().cpu().numpy()

    def item_factors(self) -> np.ndarray:
        self._require_fitted()
        assert self.module is not None
        return self.module.item.weight.detach().float().cpu().numpy()

    def user_vectors(self, users: np.ndarray) -> np.ndarray:
        """``(batch,)`` -> ``(batch, dim + 1)`` queries ``[x_u, 1]`` for inner-product retrieval.

        With :meth:`item_vectors`, ``score_all(users) == user_vectors(users) @ item_vectors().T``,
        so a FAISS inner-product index over ``item_vectors()`` serves this model exactly.
        """
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        check_indices(users, self.n_users, "user")
        assert self.module is not None
        with torch.no_grad():
            vectors = self._user_vectors(torch.as_tensor(users, device=self.device)).float().cpu().numpy()
        return np.hstack([vectors, np.ones((users.size, 1), dtype=np.float32)])

    def item_vectors(self) -> np.ndarray:
        """``(n_items, dim + 1)`` item vectors ``[q_j, b_j]`` (``b_j = 0`` without item bias)."""
        factors = self.item_factors()
        assert self.module is not None
        bias = (
            np.zeros((factors.shape[0], 1), dtype=np.float32)
            if self.module.item_bias is None
            else self.module.item_bias.weight.detach().float().cpu().numpy()
        )
        return np.hstack([factors, bias])


class PooledHistoryRecommender(FactorRecommender):
    """FISM and SVD++: ``x_u = p_u + |R_u|^(-alpha) * sum_{l in R_u} y_l`` (``p_u = 0`` for FISM).

    The module has ``history_item`` (the ``y_l`` table) and ``config.alpha``. A new user's vector
    is the pooled history alone (``p_u = 0``), and a score splits exactly into bias, user term and
    one contribution per history item, which :meth:`explain` reports.
    """

    def _history_user_vectors(self, histories: sp.csr_matrix) -> torch.Tensor:
        return pool_histories(self.module.history_item.weight, histories, self.config.alpha)

    def _user_term(self, user: int, target: torch.Tensor) -> float:
        """``p_u . q_j`` of the free user vector, 0.0 for models without one."""
        return 0.0

    def explain(self, user: int, item: int, top_items: int = 5, top_components: int = 3) -> dict[str, Any]:
        """Why ``item`` scores what it does for ``user``: the history items behind the score.

        ``score = bias + user_term + sum of every history item's contribution``, where item ``l``
        contributes ``alpha * y_l . q_item`` and ``alpha = |R_u|^(-config.alpha)`` (the same for
        every history item). Returns the same shape as ``ACF.explain``: ``{"user", "item",
        "score", "bias", "user_term", "history": [{"item", "alpha", "contribution", "components":
        []}, ...]}``, the ``top_items`` largest contributions first. ``top_components`` is
        accepted for that symmetry (these models see no components).
        """
        users = np.asarray([user], dtype=np.int64)
        check_indices(users, self.n_users, "user")
        check_indices(np.asarray([item], dtype=np.int64), self.n_items, "item")
        module = self.module
        assert module is not None
        history = self._require_fitted()[user].indices.astype(np.int64)
        weight = float(max(history.size, 1) ** -self.config.alpha) if history.size else 0.0
        with torch.no_grad():
            target = module.item.weight[item]
            contributions = (weight * (module.history_item(torch.as_tensor(history)) @ target)).cpu().numpy()
            bias = float(module.bias(torch.as_tensor([item]))[0]) if module.item_bias is not None else 0.0
            user_term = self._user_term(user, target)
        order = np.argsort(-contributions, kind="stable")[:top_items]
        entries = [
            {"item": int(history[i]), "alpha": weight, "contribution": float(contributions[i]), "components": []}
            for i in order.tolist()  # a handful of entries for a person to read
        ]
        score = float(self.score(users, [item])[0, 0])
        return {
            "user": int(user), "item": int(item), "score": score, "bias": bias, "user_term": user_term,
            "history": entries,
        }
