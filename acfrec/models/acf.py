"""Attentive Collaborative Filtering (Chen, Zhang, He, Nie, Liu and Chua, SIGIR 2017).

Score of user ``i`` for item ``j``::

    r(i, j) = (u_i + sum_{l in R(i)} alpha(i, l) p_l) . v_j  [+ b_j]

The item bias ``b_j`` is an extension of the paper (``item_bias=True`` by default), the same one
the BPR-MF / FISM / SVD++ baselines have, so popularity need not be carried by the factors.

Two attention levels, both conditioned on the user:

* component level: ``beta(i, l, m) = softmax_m(w2 . relu(W2u u_i + W2x x_lm + b2))`` over the
  components ``x_lm`` of history item ``l`` (frames, regions, sentences; projected to ``dim``
  by a linear layer), giving ``xbar_l = sum_m beta(i, l, m) x_lm``;
* item level: ``a(i, l) = w1 . relu(W1u u_i + W1v v_l + W1p p_l + W1x xbar_l + b1)`` and
  ``alpha(i, l) = exp(a(i, l)) / (sum_{l'} exp(a(i, l')))^smoothing`` over the history
  (NAIS's smoothed softmax; ``history_smoothing=1`` is the plain softmax).

Items without content get one learned "no content" component, so they still train and score.
Training groups a batch's rows by user: each user's attention is computed once and the positive
item is removed from its own history exactly, by subtracting its term from the softmax sums.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from acfrec.data.components import AlignedComponents, ComponentStore
from acfrec.data.idmap import check_indices
from acfrec.errors import DataValidationError, NotFittedError
from acfrec.models.base import ModelConfig, TorchConfig, TorchRecommender, TrainData, register

logger = logging.getLogger(__name__)

# Users scored at once by _score_all: bounds the (users, history, components, attention) tensor.
_SCORE_CHUNK = 256


@dataclass
class ACFConfig(TorchConfig):
    """ACF options on top of :class:`TorchConfig`.

    Attributes:
        attention_dim: hidden size of both attention networks.
        component_attention: False replaces component attention by the mean of the components.
        item_attention: False gives every history item the same logit, i.e. the FISM-like
            ``|R(i)|^-smoothing`` weight.
        use_content: False drops the component level (ACF without content).
        history_smoothing: exponent on the item-level softmax denominator (NAIS beta; 1.0 is
            the plain softmax of the paper, 0.5 damps long histories).
        max_history: history items per user kept (most recent by timestamp when the training
            data is ordered, else a seeded sample).
        max_components: components per item kept (the item's first ones).
        components_path: a ComponentStore folder, aligned on the training Split's item ids.
        init_std: standard deviation of the embeddings' normal initialisation (0.03 measured
            better than 0.1 and 0.05 on the planted catalogue; 0.01 stalls the first epochs
            long enough for early stopping to fire).
        item_bias: add a learned item bias ``b_j`` to the score (an extension of the paper, as
            in the FISM / SVD++ / BPR-MF baselines: popularity then need not crowd the factors).
    """

    attention_dim: int = 32
    component_attention: bool = True
    item_attention: bool = True
    use_content: bool = True
    history_smoothing: float = 0.5
    max_history: int = 100
    max_components: int = 10
    components_path: str | None = None
    init_std: float = 0.03
    item_bias: bool = True


@dataclass
class _Pooled:
    """Per-user attention sums, shifted by the user's largest item logit ``c``.

    ``top`` is the position of that largest logit; its weight ``exp(a_top - c)`` is exactly 1,
    and ``numerator_rest`` / ``denominator_rest`` exclude it, so removing any item from a
    history never subtracts a number from one of similar size (no cancellation).
    """

    users: torch.Tensor  # (n,) user index of each row
    user: torch.Tensor  # (n, dim)
    mask: torch.Tensor  # (n, history) real history entries
    weights: torch.Tensor  # (n, history) exp(a - c), 0 where padded
    shift: torch.Tensor  # (n,) c
    top: torch.Tensor  # (n,) position of the largest logit
    numerator_rest: torch.Tensor  # (n, dim)
    denominator_rest: torch.Tensor  # (n,)
    count: torch.Tensor  # (n,) history length


class _ACFNetwork(nn.Module):
    """Parameters and forward pieces; the histories and components are buffers (saved with it)."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        config: ACFConfig,
        features: torch.Tensor | None = None,
        feature_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        dim, att = config.dim, config.attention_dim
        self.config = config
        self.user = _embedding(n_users, dim, config.init_std)
        self.history_item = _embedding(n_items, dim, config.init_std)  # p_l
        self.target_item = _embedding(n_items, dim, config.init_std)  # v_j
        self.bias = nn.Parameter(torch.zeros(n_items)) if config.item_bias else None  # b_j
        self.register_buffer("history", history)
        self.register_buffer("history_mask", history_mask)
        self.att_user = nn.Linear(dim, att, bias=False)
        self.att_target = nn.Linear(dim, att, bias=False)
        self.att_history = nn.Linear(dim, att, bias=True)  # carries b1
        self.att_out = nn.Linear(att, 1, bias=False)
        self.has_content = features is not None
        if self.has_content:
            assert feature_mask is not None
            self.register_buffer("features", features)
            self.register_buffer("feature_mask", feature_mask)
            self.project = nn.Linear(features.shape[2], dim)
            self.no_content = nn.Parameter(torch.randn(dim) * config.init_std)
            self.att_content = nn.Linear(dim, att, bias=False)
            self.comp_user = nn.Linear(dim, att, bias=False)
            self.comp_component = nn.Linear(dim, att, bias=True)  # carries b2
            self.comp_out = nn.Linear(att, 1, bias=False)
        # Both attentions start uniform (FISM-like pooling, mean of components) and learn from there.
        for layer in (self.att_out, getattr(self, "comp_out", None)):
            if layer is not None:
                nn.init.zeros_(layer.weight)

    def item_bias(self, items: torch.Tensor) -> torch.Tensor:
        """``b_j`` shaped like ``items`` (zeros without item bias)."""
        if self.bias is None:
            return torch.zeros(items.shape, dtype=self.target_item.weight.dtype, device=items.device)
        return self.bias[items]

    # ---------------------------------------------------------- components
    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected components of every item with the no-content slot appended.

        Returns:
            ``(n_items, max_components + 1, dim)`` and mask ``(n_items, max_components + 1)``;
            the last slot is valid only for items without any component.
        """
        projected = self.project(self.features)
        n_items = projected.shape[0]
        slot = self.no_content.expand(n_items, 1, -1)
        mask = torch.cat([self.feature_mask, ~self.feature_mask.any(dim=1, keepdim=True)], dim=1)
        return torch.cat([projected, slot], dim=1), mask

    def component_attention(self, user: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``xbar`` ``(n, history, dim)`` and ``beta`` ``(n, history, max_components + 1)``."""
        projected, mask = self.components()
        x = projected[history]  # (n, H, M, dim)
        valid = mask[history]  # (n, H, M)
        if self.config.component_attention:
            keys = self.comp_component(projected)[history]  # (n, H, M, att)
            hidden = F.relu(keys + self.comp_user(user)[:, None, None, :])
            logits = self.comp_out(hidden).squeeze(-1)
        else:
            logits = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
        beta = torch.softmax(logits.masked_fill(~valid, -torch.inf), dim=-1)
        return torch.einsum("nhm,nhmd->nhd", beta, x), beta

    # --------------------------------------------------------------- items
    def item_logits(self, user: torch.Tensor, history: torch.Tensor, xbar: torch.Tensor | None) -> torch.Tensor:
        """``a(i, l)``: ``(n, history)``."""
        if not self.config.item_attention:
            return torch.zeros(history.shape, dtype=user.dtype, device=user.device)
        hidden = (
            self.att_user(user)[:, None, :]
            + self.att_target(self.target_item(history))
            + self.att_history(self.history_item(history))
        )
        if xbar is not None:
            hidden = hidden + self.att_content(xbar)
        return self.att_out(F.relu(hidden)).squeeze(-1)

    def attend(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Item logits ``(n, history)`` (``-inf`` on padding), user vectors ``(n, dim)``, beta or None."""
        user = self.user(users)
        history = self.history[users]
        xbar, beta = self.component_attention(user, history) if self.has_content else (None, None)
        logits = self.item_logits(user, history, xbar)
        return logits.masked_fill(~self.history_mask[users], -torch.inf), user, beta

    def pool(self, users: torch.Tensor) -> _Pooled:
        """Attention sums of ``users`` ``(n,)``, computed once per user."""
        logits, user, _ = self.attend(users)
        mask = self.history_mask[users]
        count = mask.sum(dim=1)
        top = logits.argmax(dim=1)
        shift = torch.where(count > 0, logits.max(dim=1).values, torch.zeros_like(user[:, 0]))
        weights = torch.exp(logits - shift[:, None]).masked_fill(~mask, 0.0)
        not_top = torch.ones_like(weights).scatter(1, top[:, None], 0.0)
        rest = weights * not_top
        numerator_rest = torch.einsum("nh,nhd->nd", rest, self.history_item(self.history[users]))
        return _Pooled(users, user, mask, weights, shift, top, numerator_rest, rest.sum(dim=1), count)

    def user_vectors(self, pooled: _Pooled, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """``u_i + sum alpha p_l`` ``(n, dim)``; ``exclude`` ``(n,)`` removes that item from the history.

        Without ``exclude`` (or when the item is not in the history) the top item is added back
        to the "rest" sums; with it, its exp-weighted term is subtracted from them.
        """
        history = self.history[pooled.users]
        n = pooled.user.shape[0]
        top_item = history[torch.arange(n, device=history.device), pooled.top]
        numerator = pooled.numerator_rest + self.history_item(top_item)
        denominator = pooled.denominator_rest + 1.0
        count = pooled.count
        if exclude is not None:
            match = (history == exclude[:, None]) & pooled.mask
            found = match.any(dim=1)
            is_top = found & (top_item == exclude)
            removed = (pooled.weights * match).sum(dim=1)
            sub_numerator = numerator - removed[:, None] * self.history_item(exclude)
            numerator = torch.where(is_top[:, None], pooled.numerator_rest, sub_numerator)
            denominator = torch.where(is_top, pooled.denominator_rest, denominator - removed)
            count = count - found.long()
        return pooled.user + self._history_term(numerator, denominator, count, pooled.shift)

    def _history_term(
        self, numerator: torch.Tensor, denominator: torch.Tensor, count: torch.Tensor, shift: torch.Tensor
    ) -> torch.Tensor:
        """``numerator * exp(c (1 - s)) / denominator^s`` (the shift ``c`` cancels only when s = 1)."""
        smoothing = self.config.history_smoothing
        log_scale = shift * (1.0 - smoothing) - smoothing * torch.log(denominator.clamp_min(1e-30))
        scale = torch.where(count > 0, torch.exp(log_scale), torch.zeros_like(log_scale))
        return numerator * scale[:, None]


@register("acf")
class ACF(TorchRecommender):
    """Attentive Collaborative Filtering with component- and item-level attention.

    Content comes from ``components=`` (an :class:`AlignedComponents` over the model's dense item
    indices), :meth:`set_components`, or ``config.components_path`` (a ComponentStore aligned on the
    Split's item ids). Without any, the model warns and trains without content. The aligned
    components are saved with the model.
    """

    config_class: ClassVar[type[ModelConfig]] = ACFConfig
    config: ACFConfig
    module: _ACFNetwork | None

    def __init__(
        self, config: ACFConfig | None = None, components: AlignedComponents | None = None, **overrides: Any
    ) -> None:
        super().__init__(config, **overrides)
        self._components = components

    def set_components(self, components: AlignedComponents | None) -> ACF:
        """Give the content used by the next ``fit``; returns self."""
        if components is not None and not isinstance(components, AlignedComponents):
            raise TypeError(f"components must be AlignedComponents, got {type(components).__name__}")
        self._components = components
        return self

    # ------------------------------------------------------------- building
    def _build(self, data: TrainData) -> _ACFNetwork:
        n_users, n_items = data.train.shape
        history, mask = build_history(data, self.config.max_history, self.config.seed)
        content = self._resolve_components(data, n_items) if self.config.use_content else None
        features = feature_mask = None
        if content is not None:
            content = content.truncate(self.config.max_components)
            features, feature_mask = content.features.clone(), content.mask.clone()
        return _ACFNetwork(n_users, n_items, history, mask, self.config, features, feature_mask)

    def _resolve_components(self, data: TrainData, n_items: int) -> AlignedComponents | None:
        content = self._components
        if content is None and self.config.components_path is not None:
            items = data.split.items if data.split is not None else None
            if items is None:
                raise DataValidationError(
                    f"components_path={self.config.components_path!r} needs item ids to align on: "
                    "fit on a Split, or pass components= (AlignedComponents) instead"
                )
            store = ComponentStore.open(Path(self.config.components_path))
            content = store.align(items, self.config.max_components)
        if content is None:
            logger.warning("ACF: no components given; training without content (use_content has no effect)")
            return None
        if content.n_items != n_items:
            raise DataValidationError(
                f"aligned components cover {content.n_items} items but the training matrix has {n_items}: "
                "align the store on the same item id map"
            )
        return content

    def _set_state(self, state: dict[str, Any]) -> None:
        weights = state["module"]
        n_users, n_items = self._require_fitted().shape
        features = weights.get("features")
        self.module = _ACFNetwork(
            n_users, n_items, weights["history"], weights["history_mask"], self.config,
            features, weights.get("feature_mask"),
        ).to(self.device)
        self.module.load_state_dict(weights)

    def _net(self) -> _ACFNetwork:
        if self.module is None:
            raise NotFittedError("ACF is not fitted: call fit() or load() first")
        return self.module

    # -------------------------------------------------------------- training
    def _loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """BPR loss; each distinct user of the batch is attended once, positives leave their history."""
        net = self._net()
        distinct, row_user = torch.unique(users, return_inverse=True)
        pooled = net.pool(distinct)
        rows = _select(pooled, row_user)
        positive_vectors = net.user_vectors(rows, exclude=positives)
        full_vectors = net.user_vectors(pooled)[row_user]
        positive = (positive_vectors * net.target_item(positives)).sum(dim=-1) + net.item_bias(positives)
        negative = torch.einsum("bd,bkd->bk", full_vectors, net.target_item(negatives)) + net.item_bias(negatives)
        loss = F.softplus(negative - positive[:, None]).mean()
        if self.config.weight_decay > 0:
            loss = loss + self.config.weight_decay * self._l2(distinct, positives, negatives) / users.numel()
        return loss

    def _l2(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Squared norms of the embeddings the batch used (history items: per-user mean)."""
        net = self._net()
        history = net.history_item(net.history[users]) * net.history_mask[users][..., None]
        per_user = history.pow(2).sum(dim=(1, 2)) / net.history_mask[users].sum(dim=1).clamp_min(1)
        return (
            net.user(users).pow(2).sum()
            + per_user.sum()
            + net.target_item(positives).pow(2).sum()
            + net.target_item(negatives).pow(2).sum()
        )

    # --------------------------------------------------------------- scoring
    def _score_all(self, users: torch.Tensor) -> torch.Tensor:
        """``(batch,)`` -> ``(batch, n_items)``: the attended user vector against every ``v_j``, plus ``b_j``."""
        net = self._net()
        bias = net.item_bias(torch.arange(net.target_item.num_embeddings, device=users.device))
        chunks = [
            net.user_vectors(net.pool(users[start : start + _SCORE_CHUNK])) @ net.target_item.weight.T + bias
            for start in range(0, users.numel(), _SCORE_CHUNK)
        ]
        return torch.cat(chunks) if chunks else net.target_item.weight.new_zeros((0, net.target_item.num_embeddings))

    def item_factors(self) -> np.ndarray:
        """``(n_items, dim)`` target-item vectors ``v_j``."""
        return self._net().target_item.weight.detach().cpu().numpy().copy()

    # ------------------------------------------------------------ inspection
    def attention(self, users: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Both attention levels for ``users`` ``(n,)``.

        Returns:
            ``history`` ``(n, H)`` int64 items (-1 padding); ``alpha`` ``(n, H)`` item weights
            (0 on padding; they sum to ``|R|^(1 - smoothing)``-ish, exactly 1 for a plain
            softmax); ``beta`` ``(n, H, max_components)`` component weights over each history
            item's own components (all 0 for items without content and on padding; absent
            key when the model has no content).
        """
        self._require_fitted()
        net = self._net()
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        check_indices(users, self.n_users, "user")
        with torch.no_grad():
            users_t = torch.as_tensor(users, device=self.device)
            logits, _, beta = net.attend(users_t)
            mask = net.history_mask[users_t]
            count = mask.sum(dim=1)
            log_norm = torch.logsumexp(logits, dim=1).nan_to_num(0.0, neginf=0.0)
            alpha = torch.exp(logits - self.config.history_smoothing * log_norm[:, None])
            alpha = torch.where(mask & (count[:, None] > 0), alpha, torch.zeros_like(alpha))
            out = {
                "history": torch.where(mask, net.history[users_t], -1).cpu().numpy(),
                "alpha": alpha.cpu().numpy(),
            }
            if beta is not None:
                out["beta"] = (beta[..., :-1] * mask[..., None]).cpu().numpy()
        return out

    def explain(self, user: int, item: int, top_items: int = 5, top_components: int = 3) -> dict[str, Any]:
        """Why ``item`` scores what it does for ``user``.

        Returns:
            ``{"user", "item", "score", "user_term", "history": [...]}`` with up to ``top_items``
            history entries by decreasing alpha, each ``{"item", "alpha", "contribution"
            (alpha p_l . v_item), "components": [{"component", "beta"}, ...]}`` where
            ``component`` indexes the history item's own components (empty when it has none).
        """
        self._require_fitted()
        check_indices(np.asarray([item]), self.n_items, "item")
        found = self.attention([user])
        net = self._net()
        history, alpha = found["history"][0], found["alpha"][0]
        with torch.no_grad():
            target = net.target_item.weight[item]
            user_term = float(net.user.weight[user] @ target)
            dots = (net.history_item(torch.as_tensor(np.maximum(history, 0))) @ target).cpu().numpy()
        order = np.argsort(-alpha[history >= 0], kind="stable")[:top_items]
        entries = []
        for position in order.tolist():  # a handful of entries for a person to read
            components: list[dict[str, float | int]] = []
            if "beta" in found:
                beta = found["beta"][0, position]
                for m in np.argsort(-beta, kind="stable")[:top_components].tolist():
                    if beta[m] > 0:
                        components.append({"component": int(m), "beta": float(beta[m])})
            entries.append(
                {
                    "item": int(history[position]),
                    "alpha": float(alpha[position]),
                    "contribution": float(alpha[position] * dots[position]),
                    "components": components,
                }
            )
        score = float(self.score([user], [item])[0, 0])
        return {"user": int(user), "item": int(item), "score": score, "user_term": user_term, "history": entries}


def _select(pooled: _Pooled, rows: torch.Tensor) -> _Pooled:
    """The per-user sums repeated for batch rows ``rows`` (indices into the distinct users)."""
    return _Pooled(*(getattr(pooled, f.name)[rows] for f in dataclasses.fields(pooled)))


def _embedding(n: int, dim: int, std: float) -> nn.Embedding:
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=std)
    return table


def build_history(data: TrainData, max_history: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded training histories, distinct items per user.

    Args:
        data: ``train`` CSR, and ``train_frame`` (``user``, ``item``, ``timestamp``) when order
            is known: then the ``max_history`` most recent items are kept, else a seeded sample.
    Returns:
        ``history`` ``(n_users, H)`` int64 (0 on padding) and ``mask`` ``(n_users, H)`` bool,
        ``H = min(max_history, longest history)`` (at least 1).
    """
    if max_history < 1:
        raise DataValidationError(f"max_history must be >= 1, got {max_history}")
    n_users = data.train.shape[0]
    if data.train_frame is not None and data.train_frame.height > 0:
        users, items = _ordered_pairs(data.train_frame, data.train)
    else:
        users, items = _sampled_pairs(data.train, np.random.default_rng(seed))
    counts = np.bincount(users, minlength=n_users)
    width = int(max(1, min(max_history, counts.max(initial=0))))
    starts = np.cumsum(counts) - counts
    rank_from_end = counts[users] - 1 - (np.arange(users.size) - starts[users])
    keep = rank_from_end < width
    kept = np.minimum(counts, width)
    slot = (kept[users] - 1 - rank_from_end)[keep]
    history = np.zeros((n_users, width), dtype=np.int64)
    mask = np.zeros((n_users, width), dtype=bool)
    history[users[keep], slot] = items[keep]
    mask[users[keep], slot] = True
    return torch.from_numpy(history), torch.from_numpy(mask)


def _ordered_pairs(frame: pl.DataFrame, train: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) of the training frame, user-major and oldest first, each pair once (latest kept)."""
    ordered = (
        frame.select("user", "item", "timestamp")
        .with_row_index("__row")
        .sort(["user", "timestamp", "__row"])
        .unique(subset=["user", "item"], keep="last", maintain_order=True)
    )
    users = ordered["user"].to_numpy().astype(np.int64)
    items = ordered["item"].to_numpy().astype(np.int64)
    n_users, n_items = train.shape
    check_indices(users, n_users, "user")
    check_indices(items, n_items, "item")
    return users, items


def _sampled_pairs(train: sp.csr_matrix, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) of the CSR, user-major in a seeded random order (so capping keeps a sample)."""
    coo = train.tocoo()
    order = np.lexsort((rng.random(coo.nnz), coo.row))
    return coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)


__all__ = ["ACF", "ACFConfig", "build_history"]
