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
Attention runs on the flat list of real history entries of those users; every user-independent
term is computed once per distinct history item of the batch (see :class:`_ACFNetwork`). By
default a training step attends a rescaled random sample of each history
(``ACFConfig.history_sample``); scoring always attends the whole history.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
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
from acfrec.data.idmap import IdMap, check_indices
from acfrec.errors import DataValidationError, NotFittedError
from acfrec.models.base import (
    ModelConfig,
    Recommender,
    TorchConfig,
    TorchRecommender,
    TrainData,
    get_model,
    register,
    scoring,
    training_threads,
)
from acfrec.models.content_tower import ContentTower, ItemTables, dropped_items
from acfrec.utils import fingerprint_arrays, is_int_at_least

logger = logging.getLogger(__name__)

# Users scored at once by _score_all: bounds the (entries, components, attention) temporaries.
_SCORE_CHUNK = 256
# Items run through the content tower at once when scoring or adding items.
_TOWER_CHUNK = 4096
# A training batch attends every user (one flat layout built once for all batches) when its
# distinct users hold at least this share of the history entries (ML-100K, batch 4096: ~95%).
_EVERY_USER_SHARE = 0.9


@dataclass
class ACFConfig(TorchConfig):
    """ACF options on top of :class:`TorchConfig`.

    The training defaults are the SVD++ baseline's (batch 1024, lr 0.002, L2 0.001, init 0.01),
    tuned on ML-100K leave-one-out. Every measurement behind the options, and the variants tried
    and dropped, are in benchmarks/FINDINGS.md (section 1 for the training defaults).

    Attributes:
        attention_dim: hidden size of both attention networks.
        component_attention: False replaces component attention by the mean of the components.
        item_attention: False gives every history item the same logit, i.e. the FISM-like
            ``|R(i)|^-smoothing`` weight.
        use_content: False drops the component level (ACF without content).
        history_smoothing: exponent on the item-level softmax denominator (NAIS beta; 1.0 is
            the plain softmax of the paper). 0.5 damps long histories and measured better on
            ML-100K. Measured: benchmarks/FINDINGS.md, section 1.
        max_history: history items per user kept (most recent by timestamp when the training
            data is ordered, else a seeded sample).
        history_sample: training only: each step attends a fresh uniform sample (without
            replacement) of at most this many entries of each history; None attends the whole
            history. The softmax's numerator and denominator sums over the sample are multiplied
            by (history length / sample length), both counted after removing the BPR positive, so
            they estimate the whole history's sums (with ``history_smoothing`` < 1 the
            denominator's scale counts). A positive in the sample is removed from it exactly; one
            outside it only lowers the history length. The draws come from torch's global
            generator, which the Trainer seeds with ``seed``. Scoring, validation, ``attention``
            and ``explain`` always attend the whole history (up to ``max_history``). 32 halves
            the training time on ML-100K at noise-sized quality differences.
            Measured: benchmarks/FINDINGS.md, section 2.
        max_components: components per item kept (the item's first ones).
        components_path: a ComponentStore folder, aligned on the training Split's item ids.
        init_std: standard deviation of the embeddings' normal initialisation.
        item_bias: add a learned item bias ``b_j`` to the score (an extension of the paper, as
            in the FISM / SVD++ / BPR-MF baselines: popularity then need not crowd the factors).
        attention_dropout: dropout on the hidden units of the item-level attention network
            while training (0 = none). Off by default: it did not make component attention find
            the liked frames. Measured: benchmarks/FINDINGS.md, section 5.
        scale_attention_inputs: feed both attention networks the user, item and history
            vectors at unit root-mean-square (``x / rms(x)``). The embeddings start at
            ``init_std`` and are shrunk by L2, so unscaled, the projected content terms dwarf
            the user term and the attention is nearly user-independent. Off by default: it did
            not make component attention find the liked frames on its own.
            Measured: benchmarks/FINDINGS.md, section 5.
        attention_lr_scale: step-size multiplier of the two attention output vectors (``w1``,
            ``w2``, both zero at init and the bottleneck of learning any attention), by
            reparametrisation: the stored vector is multiplied by the scale in the forward
            pass. Adam's and Adagrad's steps do not depend on the gradient's magnitude, so the
            effective vector then moves ``scale`` times faster (the Trainer has one parameter group).
            Measured: benchmarks/FINDINGS.md, sections 6 and 7.
        pretrain: None, or ``"fism"``: before ACF's own training, fit the library's FISM
            (same ``dim``, ``seed``, ``init_std``, ``item_bias``, ``weight_decay``, its
            ``alpha`` = ``history_smoothing``, early stopping on the same validation items) and
            start ACF from its history-item embeddings (``p``), target-item embeddings
            (``v``) and item bias (``b``); ``u`` starts at zero and the attention networks at
            their uniform init, so epoch 0 of ACF scores exactly as FISM (up to
            ``max_history`` capping). With ``checkpoint_dir`` set and a checkpoint present, the
            FISM stage is skipped (the checkpoint holds ACF's state, pre-trained values
            included). The NAIS / ACF recipe: from ``init_std``-sized embeddings the attention
            logits' gradients are tiny and attention barely learns.
            Measured: benchmarks/FINDINGS.md, section 6.
        pretrain_epochs: the FISM stage's maximum epochs (None: ``epochs``); it stops early on
            validation with ACF's ``patience``.
        pretrain_lr: the FISM stage's learning rate.
        pretrain_batch_size: the FISM stage's batch size (None: FISM's default, 4096). Set it to
            the FISM baseline's when comparing against one trained at another batch size (the
            ml100k config's 1024): the stage then trains that very model, and ACF, which keeps
            its start unless an ACF epoch validates higher, cannot validate below it.
        content_tower: learn a :class:`~acfrec.models.content_tower.ContentTower` that maps an
            item's components to its ``(v_j, p_j, b_j)``, so items nobody has consumed can be
            added (:meth:`ACF.add_items`) and scored. Needs components. An extension of the paper.
            Measured: benchmarks/FINDINGS.md, section 4.
        tower_hidden: width of the tower's component embedding and hidden layer.
        tower_pooling: ``"mean"`` or ``"attention"`` (learned, user-independent) over an item's
            embedded components.
        tower_dropout: DropoutNet's rate: in each training step every item's learned vectors are
            replaced by the tower's output with this probability (one draw per item and step).
        tower_blend: when scoring warm items, ``(1 - blend) * learned + blend * tower`` (0: the
            learned vectors; added items always use the tower's).
        tower_weight_decay: L2 coefficient on the tower's weight matrices.
        tower_validation_weight: with ``tower_training="joint"``, the share of the content-only
            validation NDCG in the early-stopping score (below); lower keeps more of the warm
            items' quality.

        user_embedding: False drops the paper's free user vector ``u_i`` (kept at zero, not
            trained): a user is the attention-pooled sum over its history alone, as in FISM and
            NAIS. With a few items per user, ``u_i`` memorises them. Kept by default: on ML-100K
            ``u_i`` is what lifts ACF past its FISM start (at one seed of two). Without ``u_i`` and without content,
            item attention has no user-specific input and can collapse onto one history item
            per user; ``fit`` warns. Measured: benchmarks/FINDINGS.md, section 3.
        tower_epochs, tower_patience: the maximum epochs and the early-stopping patience of the
            tower's own stage (``tower_training="after"``); None: ACF's ``epochs`` / ``patience``.
            The content-only validation NDCG that stage watches is noisy, so ACF's patience can
            let it run long. Measured: benchmarks/FINDINGS.md, section 4.
        tower_training: ``"after"`` (default): two stages. First ACF alone (the tower unused;
            early stopping on the warm validation NDCG), then the tower alone with everything
            else frozen, DropoutNet-style (so its items compete with learned ones), early
            stopping on the content-only validation NDCG. Warm items then score exactly as ACF
            without a tower (the tower is built last, so even the initialisation is the same).
            ``"joint"``: the tower trains with the rest of the model and early stopping watches
            ``tower_validation_weight`` (below). "after" is the default: it keeps the warm items'
            quality and led cold-start recall on the larger planted catalogue.
            Measured: benchmarks/FINDINGS.md, section 4.

        content_in_history: an extension of the paper: each history item adds its projected,
            beta-mixed content to its vector, ``u_i + sum alpha (p_l + W_c xbar_l)`` (``W_c``
            zero at init, so the model starts as without it). In the paper ``xbar_l`` reaches
            the score only through the item logits, a second-order signal for beta; here the
            liked frames of a history item also predict the targets directly. Off by default
            (not seed-robust). Measured: benchmarks/FINDINGS.md, section 7.
        profile_query: an extension: component attention is queried with ``u_i`` plus the
            user's content profile (mean over the history of each item's mean projected
            component) instead of ``u_i`` alone, so it knows the user's taste before ``u_i``
            has learned it (``u`` starts at zero after pre-training). Off by default (not
            seed-robust). Measured: benchmarks/FINDINGS.md, section 7.
        frame_agreement: weight of an auxiliary loss (an extension; 0 = off) rewarding beta for
            mixing, over the user's history, components of the same k-means cluster (16
            clusters of the raw components, cosine; k-means++ with ten restarts) as
            the training positive's components:
            ``-mean_{l != j} sum_m beta(i, l, m) share_j(cluster(x_lm))``. Beta then has a
            first-order, user-specific signal: which frames look like the things this user goes on
            to take. The positive ``j``'s own history entry is left out of the mean (its frames
            match themselves whatever beta does, a reward for each item's majority cluster that is
            the same for every user). Off by default (not seed-robust).
            Measured: benchmarks/FINDINGS.md, sections 7, 8 and 11.

        training_context: what a training positive is predicted from. ``"history"`` (the paper):
            the user's whole history without the positive. ``"earlier"`` (an extension, next-item
            training): only the entries before the positive in time, as leave-one-out by time
            tests the model (the held-out item comes after the whole history). Then each positive
            and its negatives are scored against that prefix. Needs interactions in time order
            (``fit`` on a Split or with timestamps). With the whole history, every training target
            is exchangeable with the history entries, so item attention is rewarded only for what
            predicts the other entries; the prefix tells it which entries predict what comes next.
            Measured: benchmarks/FINDINGS.md, section 9.

    With a content tower trained jointly, early stopping watches a weighted mean of two validation NDCGs: learned
    item vectors, and every item scored from content alone (target ``v_j``, ``b_j`` from the tower, as
    a cold item is). The best warm epoch alone comes before the tower has learned anything.

    The FISM stage shares ``epochs`` and ``patience`` unless ``pretrain_epochs`` is set, and
    ``min_epochs`` and ``average_half_life`` always.

    Whether component attention finds the liked frames on the planted presets, and with which
    options: benchmarks/FINDINGS.md, section 7.
    """

    epochs: int = 100
    lr: float = 0.002
    weight_decay: float = 0.001
    patience: int = 10
    attention_dim: int = 32
    component_attention: bool = True
    item_attention: bool = True
    use_content: bool = True
    history_smoothing: float = 0.5
    max_history: int = 200
    history_sample: int | None = 32
    max_components: int = 10
    components_path: str | None = None
    init_std: float = 0.01
    item_bias: bool = True
    attention_dropout: float = 0.0
    scale_attention_inputs: bool = False
    attention_lr_scale: float = 1.0
    pretrain: str | None = "fism"
    pretrain_epochs: int | None = None
    pretrain_lr: float = 0.005
    pretrain_batch_size: int | None = None
    content_tower: bool = False
    tower_hidden: int = 128
    tower_pooling: str = "mean"
    tower_dropout: float = 0.5
    tower_blend: float = 0.0
    tower_weight_decay: float = 0.0
    tower_validation_weight: float = 0.5
    content_in_history: bool = False
    frame_agreement: float = 0.0
    profile_query: bool = False
    tower_training: str = "after"
    tower_epochs: int | None = None
    tower_patience: int | None = None
    user_embedding: bool = True
    training_context: str = "history"


@dataclass
class _Pooled:
    """Per-user attention sums, shifted by the user's largest item logit ``c``.

    ``top_item`` has that largest logit; its weight ``exp(a_top - c)`` is exactly 1, and
    ``numerator_rest`` / ``denominator_rest`` exclude it, so removing any item from a history
    never subtracts a number from one of similar size (no cancellation).
    """

    user: torch.Tensor  # (n, dim)
    history: torch.Tensor  # (n, history) item indices (0 on padding)
    mask: torch.Tensor  # (n, history) real history entries
    weights: torch.Tensor  # (n, history) exp(a - c), 0 where padded
    shift: torch.Tensor  # (n,) c
    top_item: torch.Tensor  # (n,) the item with the largest logit
    top_vector: torch.Tensor  # (n, dim) its p_l
    numerator_rest: torch.Tensor  # (n, dim)
    denominator_rest: torch.Tensor  # (n,)
    count: torch.Tensor  # (n,) history length
    square_norm: torch.Tensor  # (n,) mean |p_l|^2 over the history (the L2 term)
    # (n, history, dim) W_c xbar_l of every history slot (content_in_history), else None
    history_content: torch.Tensor | None = None
    # (n, history, K) beta-mixed frame-cluster codes of every history slot (frame_agreement), else None
    frame_codes: torch.Tensor | None = None
    # (n, history) item logits a(i, l), -inf on padding
    logits: torch.Tensor | None = None
    # (n, history) each slot's position in the user's whole (time-ordered) history; None: the slot index
    positions: torch.Tensor | None = None
    # When ``history`` / ``mask`` are a sample of each history (training with ``history_sample``):
    # the users (n,) and their full history lengths (n,), for the rescaling; None otherwise
    users: torch.Tensor | None = None
    full_count: torch.Tensor | None = None


@dataclass
class _Flat:
    """The real (unpadded) history entries of a batch of users, and the distinct items among them.

    Everything user-independent is computed once per distinct item (``items``) and broadcast to
    the ``F`` entries through ``inverse``; only the user-dependent ``relu`` runs per entry.
    """

    rows: torch.Tensor  # (F,) row of each entry in the (n, history) grid
    cols: torch.Tensor  # (F,) its position in the row
    items: torch.Tensor  # (U,) distinct items of the histories
    inverse: torch.Tensor  # (F,) index into ``items`` of each entry
    # (F, dim) W_c xbar_l of each entry, set by _ACFNetwork._entries when content_in_history
    content: torch.Tensor | None = None
    # (F, D) beta-mixed unit frame features of each entry, set when frame_agreement > 0
    frames: torch.Tensor | None = None
    # the component layout of ``items``: (has content (U,), attended slots (U, M), _Components);
    # built on first use by _ACFNetwork.component_terms
    layout: tuple[torch.Tensor, torch.Tensor, _Components] | None = None

    @classmethod
    def of(cls, history: torch.Tensor, mask: torch.Tensor, n_items: int) -> _Flat:
        rows, cols = mask.nonzero(as_tuple=True)
        entries = history[rows, cols]
        if n_items <= entries.numel():
            # A small catalogue: every item's terms cost less than sorting the entries to find
            # the distinct ones.
            return cls(rows, cols, torch.arange(n_items, device=entries.device), entries)
        items, inverse = torch.unique(entries, return_inverse=True)
        return cls(rows, cols, items, inverse)

    def per_entry(self, per_item: torch.Tensor) -> torch.Tensor:
        """``(U, ...)`` -> ``(F, ...)``; index_select, whose backward is deterministic on CPU."""
        return per_item.index_select(0, self.inverse)

    def to_grid(self, values: torch.Tensor, shape: torch.Size, fill: float) -> torch.Tensor:
        """``(F, ...)`` -> ``(n, history, ...)`` laid back on the padded grid, ``fill`` elsewhere."""
        grid = values.new_full(tuple(shape) + values.shape[1:], fill)
        return grid.index_put((self.rows, self.cols), values)

    def per_row(self, per_user: torch.Tensor) -> torch.Tensor:
        """``(n, ...)`` -> ``(F, ...)``."""
        return per_user.index_select(0, self.rows)


# (entry, component) pairs per chunk of the component-attention kernel: its (pairs, attention_dim)
# temporaries then stay in cache (measured on ML-100K; the unchunked version is memory-bound).
_MIX_CHUNK = 16384


@dataclass
class _Bucket:
    """The history entries whose item has exactly ``k`` real components: dense, without padding.

    The entries are grouped by item (item ``i``'s start at ``starts[i]``), so sums over an item's
    entries are segment sums; ``parts`` cuts them, between items, into chunks of about
    ``_MIX_CHUNK`` (entry, component) pairs: ``(first entry, end entry, first item, end item)``.
    """

    components: torch.Tensor  # (U_k, k) flat component of each real slot of the bucket's items
    slots: torch.Tensor  # (U_k, k) their slots
    entries: torch.Tensor  # (n_k,) the entries
    items: torch.Tensor  # (n_k,) their item's row in ``components`` (nondecreasing)
    rows: torch.Tensor  # (n_k,) their user row
    starts: torch.Tensor  # (U_k,) first entry of each item
    parts: list[tuple[int, int, int, int]]
    # per part: the components of its entries (n, k) and, when k > 1, the (n * k, 2) bags
    # (component, C + user row) whose sums are the pre-activations keys[c] + user_keys[r]
    gathers: list[tuple[torch.Tensor, torch.Tensor | None]] = dataclasses.field(default_factory=list)


@dataclass
class _Components:
    """The real components of a batch's distinct items, flattened, and the entries grouped by how
    many their item has.

    Component ``c`` is slot ``slot[c]`` of distinct item ``item[c]`` (item-major, so an item's
    components are contiguous). One :class:`_Bucket` per component count ``k`` (at most ``M``):
    there every entry has exactly ``k`` components, so component attention runs on dense
    ``(entries, k, att)`` blocks with no padded slot.
    """

    item: torch.Tensor  # (C,) index into the distinct items
    slot: torch.Tensor  # (C,)
    buckets: list[_Bucket]
    n_entries: int
    n_slots: int

    @classmethod
    def of(cls, slots: torch.Tensor, inverse: torch.Tensor, rows: torch.Tensor) -> _Components:
        """From ``slots`` ``(U, M)`` (at least one True per item), ``inverse`` and ``rows`` ``(F,)``."""
        item, slot = slots.nonzero(as_tuple=True)  # row-major: item-major
        count = slots.sum(dim=1)
        first = torch.cumsum(count, 0) - count  # (U,) first component of each item
        by_item = torch.sort(inverse, stable=True).indices  # the entries grouped by item
        per_entry = count.index_select(0, inverse.index_select(0, by_item))
        local = torch.empty_like(count)  # each item's row within its bucket
        buckets = []
        # a loop over component counts (<= M), not items; bincount: no sort of the entries
        for k in torch.bincount(per_entry).nonzero().squeeze(1).tolist():
            members = (count == k).nonzero().squeeze(1)
            local[members] = torch.arange(members.shape[0], device=count.device)
            entries = by_item[per_entry == k]
            items = local.index_select(0, inverse.index_select(0, entries))
            sizes = torch.bincount(items, minlength=members.shape[0])
            ends = torch.cumsum(sizes, 0)
            components = first.index_select(0, members)[:, None] + torch.arange(k, device=count.device)
            bucket = _Bucket(
                components, slot[components], entries, items, rows.index_select(0, entries),
                ends - sizes, _cut(ends, max(1, _MIX_CHUNK // k)),
            )
            entry_rows = bucket.rows + item.shape[0]
            for first_entry, last_entry, _, _ in bucket.parts:
                chunk = components.index_select(0, items[first_entry:last_entry])
                bags = None if k == 1 else torch.stack(
                    [chunk, entry_rows[first_entry:last_entry, None].expand(-1, k)], dim=-1
                ).view(-1, 2)
                bucket.gathers.append((chunk, bags))
            buckets.append(bucket)
        return cls(item, slot, buckets, inverse.shape[0], slots.shape[1])


def _cut(ends: torch.Tensor, step: int) -> list[tuple[int, int, int, int]]:
    """Chunks of about ``step`` entries ending between items (``ends`` ``(U_k,)``: each item's
    cumulative entry count): ``(first entry, end entry, first item, end item)``; an item with more
    entries than ``step`` is a chunk of its own."""
    total = int(ends[-1])
    cut_items = torch.searchsorted(ends, torch.arange(step, max(total, step), step, device=ends.device))
    items = sorted({0, *(cut_items + 1).tolist(), ends.shape[0]})
    bounds = [0, *ends[torch.tensor(items[1:], dtype=torch.long, device=ends.device) - 1].tolist()]
    return [
        (bounds[i], bounds[i + 1], items[i], items[i + 1]) for i in range(len(items) - 1) if bounds[i + 1] > bounds[i]
    ]


class _MixComponents(torch.autograd.Function):
    """Component attention and mixing of ``F`` history entries over their items' real components only,
    chunked, with a hand-written backward.

    For entry ``f`` (user row ``r_f``, distinct item ``u_f``) and the components ``c`` of ``u_f``::

        beta_fc = softmax_c(w . relu(keys[c] + user_keys[r_f]))
        mixed_f = sum_c beta_fc values[c]

    The entries run bucket by bucket of :class:`_Components` (all of a bucket's items have ``k``
    components), so padded slots cost nothing and every operation is dense; with ``k = 1`` beta
    is 1 and no attention is computed. Autograd would keep several ``(pairs, att)`` tensors alive;
    here the forward keeps, per chunk, only the weights ``(n, k)`` and the hidden units
    ``(n, k, att)`` (one ``(pairs, att)`` tensor in all, ~45 MB for an ML-100K batch that touches
    every user), which relu's backward needs; recomputing them cost three more passes over the
    pairs. Each step is one fused pass (embedding_bag, bmm, threshold_backward): on one CPU thread,
    broadcasting elementwise ops over ``(n, k, att)`` ran 3-5x slower than these. With
    ``with_beta``, ``beta`` is also laid on the ``(F, M)`` slot grid (zero on padded slots) for the
    callers that show it; training does not need it.

    Inputs: ``keys`` ``(C, att)``, ``values`` ``(C, width)``; ``user_keys`` ``(n, att)``; ``w`` ``(att,)``;
    ``layout`` a :class:`_Components`. Returns ``mixed`` ``(F, width)`` and ``beta`` ``(F, M)`` (None
    without ``with_beta``).
    """

    @staticmethod
    def forward(ctx, keys, values, user_keys, w, layout, with_beta=True):  # noqa: ANN001, ANN205
        n_slots = layout.n_slots
        mixed = values.new_empty((layout.n_entries, values.shape[1]))
        beta = values.new_zeros((layout.n_entries, n_slots)) if with_beta else None
        # keys then user keys: keys[c] + user_keys[r] is one fixed-size bag of two rows
        table = torch.cat([keys, user_keys])
        saved = []  # per bucket, per chunk: (weights, hidden)
        for bucket in layout.buckets:
            k = bucket.components.shape[1]
            chunks = []
            for (first, last, _, _), (components, bags) in zip(bucket.parts, bucket.gathers, strict=True):
                entries, items = bucket.entries[first:last], bucket.items[first:last]
                if k == 1:
                    mixed.index_copy_(0, entries, values.index_select(0, components[:, 0]))
                    if beta is not None:
                        beta.view(-1).index_fill_(0, _cells(entries, bucket.slots.index_select(0, items), n_slots).view(-1), 1.0)
                    continue
                hidden = F.embedding_bag(bags, table, mode="sum").clamp_min_(0.0).view(-1, k, keys.shape[1])  # (n, k, att)
                logits = hidden @ w  # (n, k)
                # by hand: torch.softmax over a last dim of a few slots is several times slower
                weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
                weights /= weights.sum(dim=-1, keepdim=True)
                chunks.append((weights, hidden))
                # fixed-size bags: a fused gather and weighted sum of the components' values
                mixed.index_copy_(0, entries, F.embedding_bag(components, values, mode="sum", per_sample_weights=weights))
                if beta is not None:
                    cells = _cells(entries, bucket.slots.index_select(0, items), n_slots)
                    beta.view(-1).index_copy_(0, cells.view(-1), weights.view(-1))
            saved.append(chunks)
        ctx.save_for_backward(keys, values, user_keys, w)
        ctx.layout, ctx.chunks = layout, saved
        if beta is not None:
            ctx.mark_non_differentiable(beta)
        return mixed, beta

    @staticmethod
    def backward(ctx, grad_mixed, _grad_beta):  # noqa: ANN001, ANN205
        keys, values, user_keys, w = ctx.saved_tensors
        layout, saved = ctx.layout, ctx.chunks
        att, width = keys.shape[1], values.shape[1]
        grad_keys, grad_values = torch.zeros_like(keys), torch.zeros_like(values)
        grad_user = torch.zeros_like(user_keys)
        grad_mixed = grad_mixed.contiguous()
        for bucket, chunks in zip(layout.buckets, saved, strict=True):
            k = bucket.components.shape[1]
            bucket_values = values[bucket.components]  # (U_k, k, width)
            grad_bucket_keys = keys.new_zeros((bucket.components.shape[0], k, att))
            grad_bucket_values = torch.zeros_like(bucket_values)
            for index, (first, last, item_first, item_last) in enumerate(bucket.parts):
                entries, items = bucket.entries[first:last], bucket.items[first:last]
                # an item's entries are contiguous and no item spans two chunks: sums over them are
                # segment sums (embedding_bag) written straight to the item's rows
                offsets = bucket.starts[item_first:item_last] - first
                if k == 1:  # beta is 1 whatever the logit: no gradient reaches the attention
                    grad_bucket_values[item_first:item_last, 0] = F.embedding_bag(entries, grad_mixed, offsets, mode="sum")
                    continue
                weights, hidden = chunks[index]
                # sum over an item's entries of beta_fj grad_f, one weighted segment sum per slot j
                # (a loop over at most M slots): no (n, k, width) outer product
                per_slot = weights.T.contiguous()
                for j in range(k):
                    grad_bucket_values[item_first:item_last, j] = F.embedding_bag(
                        entries, grad_mixed, offsets, mode="sum", per_sample_weights=per_slot[j]
                    )
                grad = grad_mixed.index_select(0, entries)  # (n, width)
                grad_weights = torch.bmm(bucket_values.index_select(0, items), grad[:, :, None]).squeeze(-1)  # (n, k)
                grad_logits = weights * (grad_weights - (weights * grad_weights).sum(dim=-1, keepdim=True))
                # relu's backward: zero where the unit was off (hidden = 0 exactly where pre <= 0);
                # the pre-activations' gradient is w times this, applied to the sums below
                on = torch.ops.aten.threshold_backward(grad_logits[..., None].expand_as(hidden), hidden, 0.0)
                n = on.shape[0]
                grad_bucket_keys[item_first:item_last] = F.embedding_bag(
                    torch.arange(n, device=on.device), on.view(n, k * att), offsets, mode="sum"
                ).view(-1, k, att)
                # each entry's sum over its k slots as fixed-size bags (faster than on.sum(dim=1))
                slot_sums = F.embedding_bag(torch.arange(n * k, device=on.device).view(n, k), on.view(-1, att), mode="sum")
                grad_user.index_add_(0, bucket.rows[first:last], slot_sums)
            components = bucket.components.reshape(-1)
            grad_keys.index_add_(0, components, grad_bucket_keys.view(-1, att))
            grad_values.index_add_(0, components, grad_bucket_values.view(-1, width))
        ctx.chunks = None
        # w's gradient, sum over (entry, component) of grad_logits * relu(keys + user_keys), from the
        # sums above: where the unit is on, the hidden unit is keys + user_keys, so the sum splits
        # into keys times their sums plus user keys times theirs (no pass over the pairs)
        grad_w = (keys * grad_keys).sum(dim=0) + (user_keys * grad_user).sum(dim=0)
        return grad_keys * w, grad_values, grad_user * w, grad_w, None, None


def _cells(entries: torch.Tensor, slots: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Positions ``(n, k)`` in the flattened ``(F, M)`` grid of entries ``(n,)`` at slots ``(n, k)``."""
    return entries[:, None] * n_slots + slots


class _ACFNetwork(nn.Module):
    """Parameters and forward pieces; the histories and components are buffers (saved with it).

    Attention runs over the flat list of real history entries of the batch's distinct users, so
    padding costs nothing; the terms of both attention networks that do not depend on the user
    (``W1v v_l + W1p p_l + b1``, ``W2x x_lm + b2``, ``W1x x_lm``) are computed once per distinct
    history item of the batch and only the user's term is added per entry. Since ``xbar_l``
    enters the score only through ``W1x xbar_l = sum_m beta W1x x_lm``, the components are mixed
    in attention space (``attention_dim`` wide) rather than in ``dim``. The component level never
    touches a padded slot: the distinct items' real components are flattened once per batch (once
    for all batches when a training batch attends every user, :meth:`batch_users`), and each entry
    attends over its own item's only (:class:`_Components`, :class:`_MixComponents`); ``beta`` is
    laid back on the ``(entries, max_components)`` slot grid for the callers that show it.
    """

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
        # Identity when off: a zero-rate dropout would still cost a pass over the hidden units.
        self.dropout = nn.Dropout(config.attention_dropout) if config.attention_dropout > 0 else nn.Identity()
        self.has_content = features is not None
        self.tower: ContentTower | None = None
        # True while validating the tower: target items scored from content alone
        self.content_only = False
        # "off" in the first of two training stages (ACFConfig.tower_training): learned vectors only
        self.tower_mode = "joint"
        if config.content_tower and features is None:
            raise DataValidationError("content_tower=True needs components (components_path or components=)")
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
            if config.content_in_history:
                # W_c, zero at init: the model starts as without it (and as FISM when pre-trained)
                self.content_history = nn.Linear(dim, dim, bias=False)
                nn.init.zeros_(self.content_history.weight)
        if not config.user_embedding:  # u_i = 0, untrained (see ACFConfig.user_embedding)
            nn.init.zeros_(self.user.weight)
            self.user.weight.requires_grad_(False)
        # Both attentions start uniform (FISM-like pooling, mean of components) and learn from there.
        for layer in (self.att_out, getattr(self, "comp_out", None)):
            if layer is not None:
                nn.init.zeros_(layer.weight)
        if config.content_tower:
            # Built last, so the rest of the model starts exactly as without a tower (same seed).
            self.tower = ContentTower(features.shape[2], dim, config.tower_hidden, config.tower_pooling)
            self.tower.standardise(features, feature_mask)

    def scaled(self, vectors: torch.Tensor) -> torch.Tensor:
        """``vectors`` ``(..., dim)`` at unit root-mean-square, when ``scale_attention_inputs``."""
        if not self.config.scale_attention_inputs:
            return vectors
        return vectors * torch.rsqrt(vectors.pow(2).mean(dim=-1, keepdim=True) + 1e-12)

    # ---------------------------------------------------------- item vectors
    def tables(self, training: bool = False) -> ItemTables:
        """The item vectors ``(p, v, b)`` of one forward pass.

        Without a content tower: the learned tables. With one, while training, each item's learned
        vectors are replaced by the tower's output with probability ``tower_dropout`` (DropoutNet);
        when scoring, ``(1 - tower_blend) * learned + tower_blend * tower``, or with
        ``content_only`` the tower's ``v`` and ``b`` for every item.
        """
        learned = ItemTables(self.history_item.weight, self.target_item.weight, self.bias)
        if self.tower is None:
            return learned
        if training:
            if self.tower_mode == "off":
                return learned
            items = dropped_items(learned.target.shape[0], self.config.tower_dropout, learned.target.device)
            if items.numel() == 0:
                return learned
            target, history, bias = self.tower(self.features[items], self.feature_mask[items])
            return ItemTables(
                learned.history.index_copy(0, items, history),
                learned.target.index_copy(0, items, target),
                None if learned.bias is None else learned.bias.index_copy(0, items, bias),
            )
        blend = 1.0 if self.content_only else self.config.tower_blend
        if blend <= 0:
            return learned
        target, history, bias = self.content_vectors(self.features, self.feature_mask)
        if self.content_only:  # every item as if nobody had consumed it; histories stay learned
            return ItemTables(learned.history, target, None if learned.bias is None else bias)
        return ItemTables(
            torch.lerp(learned.history, history, blend),
            torch.lerp(learned.target, target, blend),
            None if learned.bias is None else torch.lerp(learned.bias, bias, blend),
        )

    def content_vectors(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tower's ``(v, p, b)`` ``(n, dim), (n, dim), (n,)`` of items with components
        ``(n, M, D)`` and mask ``(n, M)``, in chunks (bounds the temporaries of a big catalogue)."""
        assert self.tower is not None
        parts = [
            self.tower(features[start : start + _TOWER_CHUNK], mask[start : start + _TOWER_CHUNK])
            for start in range(0, features.shape[0], _TOWER_CHUNK)
        ]
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]

    def append_items(
        self, history: torch.Tensor, target: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Grow the item tables by ``n`` rows: ``p`` / ``v`` ``(n, dim)``, ``b`` ``(n,)``, components
        ``(n, M, D)`` and mask ``(n, M)`` (the width of the trained components)."""
        for table, rows in ((self.history_item, history), (self.target_item, target)):
            table.weight = nn.Parameter(torch.cat([table.weight.detach(), rows.to(table.weight.dtype)]))
            table.num_embeddings = table.weight.shape[0]
        if self.bias is not None:
            self.bias = nn.Parameter(torch.cat([self.bias.detach(), bias.to(self.bias.dtype)]))
        self.features = torch.cat([self.features, features.to(self.features.dtype)])
        self.feature_mask = torch.cat([self.feature_mask, mask])
        self._codes = None  # frame clusters of the frame-agreement loss: recomputed on demand

    # ---------------------------------------------------------- components
    def component_terms(
        self, user: torch.Tensor, flat: _Flat, with_beta: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W1x xbar_l`` ``(F, att)`` of every history entry and its ``beta`` ``(F, max_components)``
        (None without ``with_beta``: training does not use it).

        Items without content have all-zero ``beta`` and ``xbar_l`` = the learned no-content vector.
        With ``content_in_history``, ``W_c xbar_l`` ``(F, dim)`` is mixed by the same beta and
        left in ``flat.content``.

        Only the real components of the batch's distinct items are projected and attended (see
        :class:`_Components`); an item without content keeps one slot, holding its no-content vector.
        """
        has_content, slots, layout = self.component_terms_layout(flat)
        real = has_content.index_select(0, layout.item)[:, None]  # (C, 1)
        x = self.project(self.features[flat.items.index_select(0, layout.item), layout.slot])  # (C, dim)
        values = torch.where(real, self.att_content(x), self.att_content(self.no_content))
        att, dim = values.shape[-1], x.shape[-1]
        if self.config.content_in_history:
            history_content = self.content_history(torch.where(real, x, self.no_content))
            values = torch.cat([values, history_content], dim=-1)  # one kernel pass mixes all
        if self.config.frame_agreement > 0:
            values = torch.cat([values, self.frame_codes(flat.items)[layout.item, layout.slot]], dim=-1)
        if self.config.component_attention:
            query = user
            if self.config.profile_query:
                query = user + self.content_profile(x, real, layout.item, flat, user.shape[0])
            mixed, beta = _MixComponents.apply(
                self.comp_component(x), values, self.comp_user(self.scaled(query)),
                self.comp_out.weight[0] * self.config.attention_lr_scale, layout, with_beta,
            )
        else:
            # The mean of the components is user-independent: mix once per item.
            count = slots.sum(dim=1, keepdim=True)
            share = (1.0 / count).to(values.dtype)
            mean = values.new_zeros((count.shape[0], values.shape[1])).index_add_(
                0, layout.item, values * share.index_select(0, layout.item)
            )
            mixed, beta = flat.per_entry(mean), flat.per_entry(slots * share) if with_beta else None
        if self.config.frame_agreement > 0:
            codes = _AGREEMENT_CLUSTERS
            mixed, flat.frames = mixed[:, : values.shape[-1] - codes], mixed[:, -codes:]
        if self.config.content_in_history:
            mixed, flat.content = mixed[:, :att], mixed[:, att : att + dim]
        return mixed, None if beta is None else beta * flat.per_entry(has_content[:, None])

    def component_terms_layout(self, flat: _Flat) -> tuple[torch.Tensor, torch.Tensor, _Components]:
        """``flat.layout``, built when missing: which distinct items have content ``(U,)``, the slots
        attended ``(U, M)`` (an item without content keeps slot 0) and the :class:`_Components`."""
        if flat.layout is None:
            valid = self.feature_mask.index_select(0, flat.items)  # (U, M)
            has_content = valid.any(dim=1)
            slots = valid.clone()
            slots[:, 0] |= ~has_content
            flat.layout = has_content, slots, _Components.of(slots, flat.inverse, flat.rows)
        return flat.layout

    @staticmethod
    def content_profile(x: torch.Tensor, real: torch.Tensor, item: torch.Tensor, flat: _Flat, n_rows: int) -> torch.Tensor:
        """``(n, dim)`` mean over each row's history of its items' mean projected component, from the
        flat components ``x`` ``(C, dim)``, whether they are real ``(C, 1)`` and their items ``(C,)``."""
        n_items = flat.items.shape[0]
        total = x.new_zeros((n_items, x.shape[-1])).index_add(0, item, x * real)
        count = torch.zeros(n_items, dtype=x.dtype, device=x.device).index_add(0, item, real[:, 0].to(x.dtype))
        item_mean = total / count.clamp_min(1)[:, None]
        total = x.new_zeros((n_rows, x.shape[-1])).index_add(0, flat.rows, flat.per_entry(item_mean))
        count = torch.bincount(flat.rows, minlength=n_rows).clamp_min(1)
        return total / count[:, None]

    def frame_codes(self, items: torch.Tensor) -> torch.Tensor:
        """``(U, M, K)`` one-hot k-means cluster of every component of ``items`` (zero on empty
        slots): what the frame-agreement loss compares."""
        # computed once from the component buffers (deterministic in the seed, so not saved)
        if getattr(self, "_codes", None) is None:
            self._codes = _cluster_codes(self.features, self.feature_mask, _AGREEMENT_CLUSTERS, self.config.seed)
        return self._codes[items]

    def target_codes(self, items: torch.Tensor) -> torch.Tensor:
        """``(..., K)`` share of each item's components in every cluster (zero for items without content)."""
        frames = self.frame_codes(items.reshape(-1))
        count = self.feature_mask[items.reshape(-1)].sum(dim=1, keepdim=True).clamp_min(1)
        return (frames.sum(dim=1) / count).reshape(*items.shape, -1)

    # --------------------------------------------------------------- items
    def _entries(
        self, user: torch.Tensor, history: torch.Tensor, mask: torch.Tensor, with_content: bool, tables: ItemTables,
        with_beta: bool = False, flat: _Flat | None = None,
    ) -> tuple[_Flat, torch.Tensor, torch.Tensor | None]:
        """The flat history, item logits ``a(i, l)`` ``(F,)`` and (``with_beta``) beta of rows with
        user vectors ``user`` ``(n, dim)`` and histories ``history`` / ``mask`` ``(n, H)`` (``flat``:
        their flat layout when already built)."""
        flat = _Flat.of(history, mask, tables.history.shape[0]) if flat is None else flat
        content, beta = self.component_terms(user, flat, with_beta) if with_content else (None, None)
        if not self.config.item_attention:
            return flat, user.new_zeros(flat.rows.shape), beta
        items = flat.items
        keys = self.att_target(self.scaled(tables.target.index_select(0, items))) + self.att_history(
            self.scaled(tables.history.index_select(0, items))
        )
        hidden = flat.per_entry(keys) + flat.per_row(self.att_user(self.scaled(user)))
        if content is not None:
            hidden = hidden + content
        logits = self.att_out(self.dropout(F.relu(hidden))).squeeze(-1) * self.config.attention_lr_scale
        return flat, logits, beta

    def attend(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Item logits ``(n, history)`` (``-inf`` on padding), user vectors ``(n, dim)`` and beta
        ``(n, history, max_components)`` (zero on padding and for items without content; None
        without content), as scored (not training)."""
        user, mask = self.user(users), self.history_mask[users]
        flat, entries, beta = self._entries(
            user, self.history[users], mask, self.has_content, self.tables(), with_beta=True
        )
        logits = flat.to_grid(entries, mask.shape, fill=-torch.inf)
        return logits, user, None if beta is None else flat.to_grid(beta, mask.shape, fill=0.0)

    def batch_users(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The users to attend for a training batch of rows ``users`` ``(n,)`` and each row's index
        among them: the batch's distinct users, or every user when those already hold most
        (``_EVERY_USER_SHARE``) of the history entries and the component level runs. The flat and
        component layouts of every history are built once (:meth:`pool`), so a batch then skips
        sorting its entries into new ones; the extra users cost a few percent more attention and
        add nothing to the loss. Without components there is no sort to save (measured 5% slower
        on ML-100K). Not with attention dropout, whose draws would then change."""
        distinct, row_user = torch.unique(users, return_inverse=True)
        if (
            not self._with_content()
            or self.config.attention_dropout > 0
            or self.samples_history()  # a fresh sample each step: no layout to reuse
            or distinct.shape[0] == self.history.shape[0]
        ):
            return distinct, row_user
        lengths = self.history_mask.sum(dim=1)
        if lengths.index_select(0, distinct).sum() >= _EVERY_USER_SHARE * lengths.sum():
            return torch.arange(self.history.shape[0], device=users.device), users
        return distinct, row_user

    def _with_content(self) -> bool:
        """Whether pooling runs the component level."""
        # Without item attention the components matter only through content_in_history (or the
        # frame-agreement loss).
        config = self.config
        return self.has_content and (config.item_attention or config.content_in_history or config.frame_agreement > 0)

    def samples_history(self) -> bool:
        """Whether training attends a sample of each history (``history_sample`` below the width)."""
        sample = self.config.history_sample
        return sample is not None and sample < self.history.shape[1]

    def sample_history(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A uniform sample without replacement of at most ``history_sample`` entries of each
        history of ``users`` ``(n,)``: ``history`` ``(n, K)`` and ``mask`` ``(n, K)`` (a history
        of ``K`` entries or fewer is kept whole), each full history's length ``(n,)`` and the
        sampled slots ``(n, K)``. The draws come from torch's global generator, which the Trainer
        seeds with ``config.seed``."""
        mask = self.history_mask.index_select(0, users)
        keys = torch.rand(mask.shape, device=mask.device).masked_fill_(~mask, 2.0)  # padding last
        # the K smallest keys: a uniform sample of each history (in random order; the sums do
        # not depend on it)
        slots = keys.topk(self.config.history_sample, dim=1, largest=False, sorted=False).indices
        return self.history.index_select(0, users).gather(1, slots), mask.gather(1, slots), mask.sum(dim=1), slots

    def in_history(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``(n,)`` bool: whether ``items[r]`` is in the (capped) history of ``users[r]``, by a
        binary search in the sorted ``user * n + item`` keys of every history entry (cached, keyed
        on the history buffers): no pass over the ``(n, max_history)`` grid."""
        n = int(self.history_item.num_embeddings)  # items are below it
        key = _buffers_key(n, self.history, self.history_mask)
        cached = getattr(self, "_history_keys", None)
        if cached is None or cached[0] != key:
            rows, cols = self.history_mask.nonzero(as_tuple=True)
            cached = key, torch.sort(rows * n + self.history[rows, cols]).values
            self._history_keys = cached
        keys, query = cached[1], users * n + items
        if keys.numel() == 0:
            return torch.zeros_like(query, dtype=torch.bool)
        return keys.index_select(0, torch.searchsorted(keys, query).clamp_max_(keys.numel() - 1)) == query

    def pool(self, users: torch.Tensor, tables: ItemTables | None = None, sample: bool = False) -> _Pooled:
        """Attention sums of known users ``(n,)``, computed once per user (``tables``: the
        scoring tables when None). Every user in order (``arange``) reuses one flat layout of all
        the histories, rebuilt only when the histories, components or catalogue change.

        ``sample`` (training): when :meth:`samples_history`, the sums run over a fresh
        :meth:`sample_history` and :meth:`user_vectors` rescales them to estimate the full ones."""
        tables = self.tables() if tables is None else tables
        if sample and self.samples_history():
            history, mask, full_count, slots = self.sample_history(users)
            pooled = self.pool_rows(self.user(users), history, mask, tables)
            pooled.users, pooled.full_count, pooled.positions = users, full_count, slots
            return pooled
        n_users, flat = self.history.shape[0], None
        if users.shape[0] == n_users and n_users > 0 and bool((users[1:] > users[:-1]).all()) and int(users[0]) == 0:
            flat = self._every_history(tables.history.shape[0])
        return self.pool_rows(self.user(users), self.history[users], self.history_mask[users], tables, flat)

    def _every_history(self, n_items: int) -> _Flat:
        """The flat layout (with its component layout, once built) of every user's history: cached,
        keyed on the buffers it derives from (their identity and in-place version) and ``n_items``;
        each call returns a fresh :class:`_Flat` sharing the layout tensors."""
        buffers = [self.history, self.history_mask] + ([self.feature_mask] if self.has_content else [])
        key = _buffers_key(n_items, *buffers)
        cached = getattr(self, "_every_flat", None)
        if cached is None or cached[0] != key:
            cached = key, _Flat.of(self.history, self.history_mask, n_items)
            self._every_flat = cached
        template = cached[1]
        if template.layout is None and self._with_content():
            self.component_terms_layout(template)
        return dataclasses.replace(template, content=None, frames=None)

    def pool_rows(
        self, user: torch.Tensor, history: torch.Tensor, mask: torch.Tensor, tables: ItemTables, flat: _Flat | None = None
    ) -> _Pooled:
        """Attention sums of rows with user vectors ``(n, dim)`` and histories / masks ``(n, H)``
        (``flat``: their flat layout when already built)."""
        flat, entries, _ = self._entries(user, history, mask, self._with_content(), tables, flat=flat)
        logits = flat.to_grid(entries, mask.shape, fill=-torch.inf)
        count = mask.sum(dim=1)
        top = logits.argmax(dim=1)
        shift = torch.where(count > 0, logits.max(dim=1).values, torch.zeros_like(user[:, 0]))
        weights = torch.exp(logits - shift[:, None]).masked_fill(~mask, 0.0)
        rest = weights.scatter(1, top[:, None], 0.0)
        table = tables.history
        bags = torch.cumsum(count, 0) - count  # flat entries are row-major: one bag per user
        flat_items = history[flat.rows, flat.cols]
        top_item = history.gather(1, top[:, None]).squeeze(1)
        top_vector, history_content = F.embedding(top_item, table), None
        if flat.content is None:
            numerator_rest = F.embedding_bag(
                flat_items, table, bags, mode="sum", per_sample_weights=rest[flat.rows, flat.cols]
            )
        else:
            # p_l + W_c xbar_l depends on the user (through beta): summed per entry, not per item
            history_content = flat.to_grid(flat.content, mask.shape, fill=0.0)  # (n, H, dim)
            entries_vectors = F.embedding(flat_items, table) + flat.content
            numerator_rest = torch.zeros_like(user).index_add(
                0, flat.rows, rest[flat.rows, flat.cols][:, None] * entries_vectors
            )
            top_vector = top_vector + history_content.gather(
                1, top[:, None, None].expand(-1, 1, history_content.shape[2])
            ).squeeze(1)
        item_norms = flat.per_entry(F.embedding(flat.items, table).pow(2).sum(dim=1))
        square_norm = torch.zeros_like(shift).index_add(0, flat.rows, item_norms)
        frame_codes = None if flat.frames is None else flat.to_grid(flat.frames, mask.shape, fill=0.0)
        return _Pooled(
            user, history, mask, weights, shift, top_item, top_vector,
            numerator_rest, rest.sum(dim=1), count, square_norm / count.clamp_min(1), history_content, frame_codes,
            logits,
        )

    def user_vectors(
        self, pooled: _Pooled, exclude: torch.Tensor | None = None, tables: ItemTables | None = None
    ) -> torch.Tensor:
        """``u_i + sum alpha p_l`` ``(n, dim)``; ``exclude`` ``(n,)`` removes that item from the history.

        Without ``exclude`` (or when the item is not in the history) the top item is added back
        to the "rest" sums; with it, its exp-weighted term is subtracted from them. ``tables``
        must be those ``pooled`` was built with (the scoring tables when None).

        When ``pooled`` holds a sample of each history (``full_count`` set), both sums are
        multiplied by (full history length / sample length), both counted after the exclusion,
        so they estimate the full history's sums: the smoothed softmax ``N / D^s`` depends on
        the denominator's scale unless ``s = 1``. A positive in the sample is removed exactly
        (the sample's other entries are a uniform sample of the rest of the history); one
        outside it is removed by the count alone.
        """
        tables = self.tables() if tables is None else tables
        numerator = pooled.numerator_rest + pooled.top_vector
        denominator = pooled.denominator_rest + 1.0
        count = pooled.count
        if exclude is not None:
            match = (pooled.history == exclude[:, None]) & pooled.mask
            found = match.any(dim=1)
            is_top = found & (pooled.top_item == exclude)
            removed = (pooled.weights * match).sum(dim=1)
            sub_numerator = numerator - removed[:, None] * tables.history.index_select(0, exclude)
            if pooled.history_content is not None:
                sub_numerator = sub_numerator - torch.einsum(
                    "nh,nhd->nd", pooled.weights * match, pooled.history_content
                )
            numerator = torch.where(is_top[:, None], pooled.numerator_rest, sub_numerator)
            denominator = torch.where(is_top, pooled.denominator_rest, denominator - removed)
            count = count - found.long()
        if pooled.full_count is not None:
            full = pooled.full_count
            if exclude is not None:
                full = full - self.in_history(pooled.users, exclude).long()
            ratio = (full / count.clamp_min(1)).to(numerator.dtype)
            numerator, denominator = numerator * ratio[:, None], denominator * ratio
        return pooled.user + self._history_term(numerator, denominator, count, pooled.shift)

    def earlier_vectors(self, pooled: _Pooled, users: torch.Tensor, items: torch.Tensor, tables: ItemTables) -> torch.Tensor:
        """``u_i + sum alpha p_l`` ``(n, dim)`` over the entries before ``items`` ``(n,)`` in each
        user's time-ordered history (``training_context="earlier"``); ``pooled``: the rows of
        ``users`` ``(n,)``. An item outside the (capped) history is older than all of it (the
        cap keeps the most recent entries): it sees none.

        With a sampled history, the softmax sums over the sampled earlier entries are multiplied
        by (earlier entries / sampled earlier entries), as :meth:`user_vectors` does for the whole.
        """
        full = self.history.index_select(0, users)
        match = (full == items[:, None]) & self.history_mask.index_select(0, users)
        # histories are left-aligned and oldest first: the positive's slot counts its earlier entries
        before = torch.where(match.any(dim=1), match.int().argmax(dim=1), 0)
        positions = pooled.positions
        if positions is None:
            positions = torch.arange(pooled.mask.shape[1], device=before.device).expand_as(pooled.mask)
        earlier = pooled.mask & (positions < before[:, None])
        count = earlier.sum(dim=1)
        dtype = pooled.user.dtype
        # 0 for a row without earlier entries (its weights are all zero; log 0 would make NaNs)
        log_ratio = torch.log(before.clamp_min(1).to(dtype)) - torch.log(count.clamp_min(1).to(dtype))
        logits = pooled.logits.masked_fill(~earlier, -torch.inf)
        # a finite norm for rows without earlier entries (their weights are all zero anyway)
        log_norm = torch.logsumexp(logits, dim=1).nan_to_num(0.0, neginf=0.0) + log_ratio
        weights = torch.exp(logits + (log_ratio - self.config.history_smoothing * log_norm)[:, None])
        vectors = F.embedding(pooled.history, tables.history)
        if pooled.history_content is not None:
            vectors = vectors + pooled.history_content
        return pooled.user + torch.einsum("nh,nhd->nd", weights, vectors)

    def query_rows(self, user: torch.Tensor, history: torch.Tensor, mask: torch.Tensor, tables: ItemTables) -> torch.Tensor:
        """Attended user vectors ``(n, dim)`` of rows with user vectors ``(n, dim)`` and histories /
        masks ``(n, H)``, in chunks of users (bounds the attention temporaries)."""
        chunks = [
            self.user_vectors(self.pool_rows(user[part], history[part], mask[part], tables), tables=tables)
            for part in (slice(start, start + _SCORE_CHUNK) for start in range(0, user.shape[0], _SCORE_CHUNK))
        ]
        return torch.cat(chunks) if chunks else user.new_zeros((0, user.shape[1]))

    def score_rows(self, user: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores ``(n, n_items)``: :meth:`query_rows` against every ``v_j``, plus ``b_j``."""
        tables = self.tables()
        return torch.addmm(
            tables.biases().expand(user.shape[0], -1), self.query_rows(user, history, mask, tables), tables.target.T
        )

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

    def _validator(self) -> Callable[[TorchRecommender, TrainData], float] | None:
        """With a content tower: the weighted mean of the validation NDCG with learned item vectors
        and with every item scored from its content (as a cold item is), so the kept checkpoint is
        good at both; the best warm epoch alone often comes before the tower has learned anything."""
        if not self.config.content_tower or self._tower_after:
            return None
        from acfrec.train.trainer import default_validator

        def warm_and_content(model: TorchRecommender, data: TrainData) -> float:
            warm = default_validator(model, data)
            content = self._content_only_validation(model, data)
            logger.debug("ACF validation NDCG: learned items %.4f, content only %.4f", warm, content)
            weight = self.config.tower_validation_weight
            return (1 - weight) * warm + weight * content

        return warm_and_content

    @property
    def _tower_after(self) -> bool:
        """True when a content tower trains in its own stage after ACF (``tower_training="after"``)."""
        return self.config.content_tower and self.config.tower_training == "after"

    def _content_only_validation(self, model: TorchRecommender, data: TrainData) -> float:
        """The validation NDCG with every target item scored from its content, as a cold item is."""
        from acfrec.train.trainer import default_validator

        net = self._net()
        net.content_only = True
        try:
            return default_validator(model, data)
        finally:
            net.content_only = False

    def _fit(self, data: TrainData) -> None:
        """ACF's training; with ``tower_training="after"``, then the tower's own stage."""
        super()._fit(data)
        if self._tower_after:
            history = self.history
            self._pretrained = False  # the tower's stage starts from an untrained tower
            self._net().tower_mode = "joint"
            self._fit_tower(data)
            self.history = [*history, *({**entry, "stage": "tower"} for entry in self.history)]

    def _fit_tower(self, data: TrainData) -> None:
        """The second stage: the tower trains against the frozen ACF, early stopping on the
        content-only validation NDCG.

        Its checkpoints, if any, go to ``checkpoint_dir/tower-<fingerprint of the frozen model>``:
        a tower checkpoint resumes only against the very model it was training against (a
        resumed first stage that trained on changes the fingerprint; older folders are removed).
        """
        from acfrec.train import Trainer

        net = self._net()
        frozen = [
            param for name, param in net.named_parameters() if not name.startswith("tower.") and param.requires_grad
        ]
        config = dataclasses.replace(
            self.config,
            epochs=self.config.epochs if self.config.tower_epochs is None else self.config.tower_epochs,
            patience=self.config.patience if self.config.tower_patience is None else self.config.tower_patience,
        )
        if config.checkpoint_dir is not None:
            stamp = fingerprint_arrays(*(param.detach().cpu().numpy() for param in frozen))
            folder = Path(config.checkpoint_dir) / f"tower-{stamp}"
            for stale in Path(config.checkpoint_dir).glob("tower-*"):
                if stale != folder and stale.is_dir():
                    shutil.rmtree(stale)
            config = dataclasses.replace(config, checkpoint_dir=str(folder))
        for param in frozen:
            param.requires_grad_(False)

        try:
            with training_threads(config.num_threads):
                self.history = Trainer(config, callbacks=self.callbacks, validator=self._content_only_validation).fit(
                    self, data
                )
        finally:
            for param in frozen:
                param.requires_grad_(True)

    # ------------------------------------------------------------- building
    def _build(self, data: TrainData) -> _ACFNetwork:
        _check_tower_options(self.config)
        sample = self.config.history_sample
        if sample is not None and not is_int_at_least(sample, 1):
            raise ValueError(f"history_sample must be None (the whole history) or an int >= 1, got {sample!r}")
        if self.config.training_context not in ("history", "earlier"):
            raise ValueError(f"training_context must be 'history' or 'earlier', got {self.config.training_context!r}")
        if self.config.training_context == "earlier" and (data.train_frame is None or data.train_frame.height == 0):
            raise DataValidationError(
                "training_context='earlier' needs the interactions' time order: fit on a Split or on data with timestamps"
            )
        n_users, n_items = data.train.shape
        history, mask = build_history(data, self.config.max_history, self.config.seed)
        content = self._resolve_components(data, n_items) if self.config.use_content else None
        features = feature_mask = None
        if content is not None:
            content = content.truncate(self.config.max_components)
            features, feature_mask = content.features.clone(), content.mask.clone()
        if self.config.item_attention and not self.config.user_embedding and features is None:
            # Nothing user-specific reaches the item logits: they become one global score per
            # item, and the softmax can pile each history onto its top item (measured on the
            # "legible" preset: smallest alpha ~1e-35, HR@10 below FISM's).
            logger.warning(
                "ACF: item attention without u_i (user_embedding=False) and without content has no "
                "user-specific input; its weights are a global per-item score. Set item_attention=False "
                "for FISM-like pooling, or keep u_i or give components."
            )
        network = _ACFNetwork(n_users, n_items, history, mask, self.config, features, feature_mask)
        if self._tower_after:
            network.tower_mode = "off"
        self._pretrained = self._pretrain_wanted()
        if self._pretrained:
            _copy_fism(network, self._pretrained_fism(data))
        return network

    @property
    def starts_trained(self) -> bool:
        """True while training from the FISM stage's weights (epoch 0 scores exactly as FISM)."""
        return getattr(self, "_pretrained", False)

    def _pretrain_wanted(self) -> bool:
        """True when ``pretrain`` is set and no checkpoint will overwrite the pre-trained state."""
        from acfrec.train.trainer import CHECKPOINT_NAME

        if self.config.pretrain is None:
            return False
        if self.config.pretrain not in _PRETRAINERS:
            raise ValueError(f"pretrain must be None or one of {sorted(_PRETRAINERS)}, got {self.config.pretrain!r}")
        if self.config.pretrain_batch_size is not None and not is_int_at_least(self.config.pretrain_batch_size, 1):
            raise ValueError(f"pretrain_batch_size must be None (FISM's own) or an int >= 1, got {self.config.pretrain_batch_size!r}")
        directory = self.config.checkpoint_dir
        return directory is None or not (Path(directory) / CHECKPOINT_NAME).is_file()

    def _pretrained_fism(self, data: TrainData) -> Recommender:
        """The FISM stage, fitted on ``data`` (same seed: repeatable); ACF's RNG is reseeded after it."""
        config = self.config
        batch = {} if config.pretrain_batch_size is None else {"batch_size": config.pretrain_batch_size}
        fism = get_model(_PRETRAINERS[config.pretrain])(
            dim=config.dim, seed=config.seed, init_std=config.init_std, item_bias=config.item_bias,
            weight_decay=config.weight_decay, alpha=config.history_smoothing,
            epochs=config.epochs if config.pretrain_epochs is None else config.pretrain_epochs,
            lr=config.pretrain_lr, patience=config.patience, min_epochs=config.min_epochs, eval_k=config.eval_k,
            device=config.device, **batch,
            progress=config.progress, num_threads=config.num_threads, average_half_life=config.average_half_life,
        )
        fism.fit(data)
        torch.manual_seed(config.seed)
        return fism

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
        """BPR loss; each distinct user of the batch is attended once (over a sample of its history
        with ``history_sample``), positives leave their history.

        L2 (``weight_decay``), as in the FISM / BPR-MF baselines, per row on what the row used:
        ``|u_i|^2``, the mean ``|p_l|^2`` of the history, ``|v_j|^2`` and ``b_j^2`` of the
        positive and (averaged) of the negatives.
        """
        net = self._net()
        tables = net.tables(training=True)
        distinct, row_user = net.batch_users(users)
        pooled = net.pool(distinct, tables, sample=True)
        rows = _select(pooled, row_user)
        if self.config.training_context == "earlier":
            # the positive and its negatives against the same prefix of the history
            positive_vectors = full_vectors = net.earlier_vectors(rows, users, positives, tables)
        else:
            positive_vectors = net.user_vectors(rows, exclude=positives, tables=tables)
            full_vectors = net.user_vectors(pooled, tables=tables).index_select(0, row_user)
        q_pos = tables.target.index_select(0, positives)
        q_neg = tables.target.index_select(0, negatives.reshape(-1)).reshape(*negatives.shape, -1)
        b_pos, b_neg = tables.item_bias(positives), tables.item_bias(negatives)
        positive = (positive_vectors * q_pos).sum(dim=-1) + b_pos
        negative = torch.einsum("bd,bkd->bk", full_vectors, q_neg) + b_neg
        loss = F.softplus(negative - positive[:, None]).mean()
        if self.config.weight_decay > 0:
            norm = (
                rows.user.pow(2).sum(dim=-1)
                + rows.square_norm
                + q_pos.pow(2).sum(dim=-1)
                + q_neg.pow(2).sum(dim=-1).mean(dim=-1)
                + b_pos.pow(2)
                + b_neg.pow(2).mean(dim=-1)
            )
            loss = loss + self.config.weight_decay * norm.mean()
        if net.tower is not None and self.config.tower_weight_decay > 0:
            # The tower sees each warm item many times: without it, it memorises the warm items'
            # learned vectors instead of learning what their content says (cold quality falls).
            weights = sum(p.pow(2).sum() for name, p in net.tower.named_parameters() if name.endswith("weight"))
            loss = loss + self.config.tower_weight_decay * weights
        if rows.frame_codes is not None:
            agreement = frame_agreement(rows.frame_codes, rows.history, rows.mask, positives, net.target_codes(positives))
            loss = loss - self.config.frame_agreement * agreement.mean()
        return loss

    # --------------------------------------------------------------- scoring
    def _score_all(self, users: torch.Tensor) -> torch.Tensor:
        """``(batch,)`` -> ``(batch, n_items)``: the attended user vector against every ``v_j``, plus ``b_j``."""
        net = self._net()
        return net.score_rows(net.user(users), net.history[users], net.history_mask[users])

    def score_histories(self, histories: sp.spmatrix) -> torch.Tensor:
        """``(n, n_items)`` sparse histories of new users -> ``(n, n_items)`` float32 scores.

        A new user has no trained ``u_i``; it gets the mean of the trained user vectors. Unlike
        ``u = 0`` (a point no user was trained at), the mean keeps the inputs of both attention
        networks where training put them, and ``mean(u) . v_j`` is the taste shared by all
        users. The history is pooled exactly as a known user's (capped at ``max_history``, a
        seeded sample since a matrix has no order); an empty history scores ``mean(u) . v_j + b_j``.
        """
        histories = self._check_histories(histories)
        net = self._net()
        history, mask = build_history(TrainData(histories), self.config.max_history, self.config.seed)
        history, mask = history.to(self.device), mask.to(self.device)
        with scoring(net):
            mean_user = net.user.weight.mean(dim=0).expand(mask.shape[0], -1)
            return net.score_rows(mean_user, history, mask).float().cpu()

    def item_factors(self) -> np.ndarray:
        """``(n_items, dim)`` target-item vectors ``v_j`` as scored (blended with the tower's when
        ``tower_blend > 0``)."""
        with torch.no_grad():
            return self._net().tables().target.float().cpu().numpy().copy()

    def user_vectors(self, users: np.ndarray | list[int]) -> np.ndarray:
        """``(batch,)`` -> ``(batch, dim + 1)`` queries ``[u_i + sum alpha p_l, 1]``.

        Attention depends on the user and the history, never on the target item, so ACF's score is
        an inner product: ``score_all(users) == user_vectors(users) @ item_vectors().T`` and a
        FAISS inner-product index serves it exactly.
        """
        self._require_fitted()
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        check_indices(users, self.n_users, "user")
        net = self._net()
        with scoring(net):
            users_t = torch.as_tensor(users, device=self.device)
            queries = net.query_rows(net.user(users_t), net.history[users_t], net.history_mask[users_t], net.tables())
        return np.hstack([queries.float().cpu().numpy(), np.ones((users.size, 1), dtype=np.float32)])

    def item_vectors(self) -> np.ndarray:
        """``(n_items, dim + 1)`` item vectors ``[v_j, b_j]`` (``b_j = 0`` without item bias)."""
        with torch.no_grad():
            tables = self._net().tables()
            return torch.cat([tables.target, tables.biases()[:, None]], dim=1).float().cpu().numpy()

    # ------------------------------------------------------------ new items
    def add_items(
        self, components: ComponentStore | AlignedComponents, item_ids: Sequence[object] | None = None
    ) -> np.ndarray:
        """Add items nobody has consumed yet, scored from their content, without retraining.

        The content tower turns each new item's components into ``(v_j, p_j, b_j)``, which are
        appended to the item tables (the items then score, recommend and, in new users'
        histories, attend like any other) and to the model's item id map and ``seen`` matrix.

        Args:
            components: a :class:`ComponentStore` (by default every store item the model does not
                know yet, in store order) or :class:`AlignedComponents` ``(n_new, M, D)`` of the
                new items in order.
            item_ids: the new items' external ids: which store items to add (an id the store
                lacks is added without content, with a warning), or the names of the aligned
                rows (required then when the model has an item id map).
        Returns:
            ``(n_new,)`` int64 dense indices of the added items (``n_items`` before, onwards).
        """
        net = self._net()
        self._require_fitted()
        if net.tower is None:
            raise DataValidationError(
                "add_items needs a content tower: train ACF with content_tower=True (and components)"
            )
        new_ids, aligned = self._new_item_content(components, item_ids)
        features, mask = (part.to(self.device) for part in _fit_width(aligned, net.features.shape[1]))
        with scoring(net):
            target, history, bias = net.content_vectors(features, mask)
        start = self.n_items
        net.append_items(history, target, bias, features, mask)
        self.seen = sp.hstack([self.seen, sp.csr_matrix((self.n_users, aligned.n_items), dtype=self.seen.dtype)]).tocsr()
        if self.items is not None:
            self.items = IdMap([*self.items.external_ids.tolist(), *new_ids], kind="item")
        return np.arange(start, self.n_items, dtype=np.int64)

    def _new_item_content(
        self, components: ComponentStore | AlignedComponents, item_ids: Sequence[object] | None
    ) -> tuple[list[str], AlignedComponents]:
        """The new items' external ids (empty without an id map) and their aligned components."""
        known = self.items
        ids = None if item_ids is None else [str(x) for x in item_ids]
        if isinstance(components, ComponentStore):
            if known is None:
                raise DataValidationError(
                    "add_items from a ComponentStore needs a model fitted on a Split (an item id map); "
                    "pass AlignedComponents instead"
                )
            if ids is None:
                ids = [x for x in components.items.external_ids.tolist() if x not in known]
            # Ids the store lacks are added without content (align warns with the count): the
            # tower's generic vector scores them, as the no-content path does for known items.
            aligned = components.align(IdMap(ids, kind="item"), self.config.max_components)
        elif isinstance(components, AlignedComponents):
            aligned = components
            if known is not None and (ids is None or len(ids) != aligned.n_items):
                raise DataValidationError(
                    f"add_items with AlignedComponents of {aligned.n_items} items needs item_ids of the same "
                    f"length (got {'none' if ids is None else len(ids)})"
                )
        else:
            raise TypeError(f"components must be a ComponentStore or AlignedComponents, got {type(components).__name__}")
        if aligned.n_items == 0:
            raise DataValidationError("add_items: no new items (every store item is already in the model)")
        if known is not None:
            clash = next((x for x in ids if x in known), None)
            if clash is not None:
                raise DataValidationError(f"item id {clash!r} is already in the model; add_items adds new items only")
            IdMap(ids, kind="item")  # duplicate ids among the new ones raise here, naming the id
        features_dim = self._net().features.shape[2]
        if aligned.dim != features_dim:
            raise DataValidationError(
                f"new items' components have dimension {aligned.dim} but the model was trained on {features_dim}"
            )
        return ids or [], aligned

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
                out["beta"] = beta.cpu().numpy()
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
            tables = net.tables()
            target = tables.target[item]
            user_term = float(net.user.weight[user] @ target)
            dots = (tables.history[torch.as_tensor(np.maximum(history, 0), device=self.device)] @ target).cpu().numpy()
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


# pretrain value -> registered model whose embeddings start ACF
_PRETRAINERS = {"fism": "fism"}


def _copy_fism(network: _ACFNetwork, fism: Recommender) -> None:
    """FISM's ``p_l``, ``q_j`` and ``b_j`` into ACF's ``p``, ``v`` and ``b``; ``u`` to zero."""
    source = fism.module
    with torch.no_grad():
        network.history_item.weight.copy_(source.history_item.weight)
        network.target_item.weight.copy_(source.item.weight)
        if network.bias is not None and source.item_bias is not None:
            network.bias.copy_(source.item_bias.weight.squeeze(-1))
        network.user.weight.zero_()


def _check_tower_options(config: ACFConfig) -> None:
    for name in ("tower_dropout", "tower_blend", "tower_validation_weight"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)}")
    if config.tower_training not in ("joint", "after"):
        raise ValueError(f"tower_training must be 'joint' or 'after', got {config.tower_training!r}")
    if config.frame_agreement < 0:
        raise ValueError(f"frame_agreement must be >= 0 (a loss weight), got {config.frame_agreement}")
    for name, low in (("tower_epochs", 1), ("tower_patience", 0)):
        value = getattr(config, name)
        if value is not None and not is_int_at_least(value, low):
            raise ValueError(f"{name} must be None (ACF's own) or an int >= {low}, got {value!r}")
    if config.tower_hidden < 1 or config.tower_weight_decay < 0:
        raise ValueError(
            f"tower_hidden must be >= 1 and tower_weight_decay >= 0, got {config.tower_hidden} and {config.tower_weight_decay}"
        )


def _fit_width(aligned: AlignedComponents, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Components ``(n, M, D)`` and mask ``(n, M)`` truncated or zero-padded to ``width`` slots."""
    features, mask = aligned.features[:, :width], aligned.mask[:, :width]
    pad = width - features.shape[1]
    if pad > 0:
        features = F.pad(features, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    return features, mask


def frame_agreement(
    codes: torch.Tensor, history: torch.Tensor, mask: torch.Tensor, positives: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """``(n,)`` agreement of each row's beta-mixed history frames with its positive's frames.

    Args:
        codes: ``(n, history, K)`` beta-mixed frame-cluster codes of every history slot.
        history: ``(n, history)`` item of every slot; ``mask``: ``(n, history)`` real slots.
        positives: ``(n,)`` the training positive of each row.
        target: ``(n, K)`` share of the positive's frames in every cluster.
    Returns:
        mean over the row's other history entries of ``codes . target`` (0 when there is none).
    """
    # The positive's own history entry is left out: its frames match themselves whatever beta
    # does, which rewarded each item's majority cluster, the same for every user.
    others = mask & (history != positives[:, None])
    profile = torch.einsum("nh,nhk->nk", others.to(codes.dtype), codes)
    return (profile * target).sum(dim=-1) / others.sum(dim=1).clamp_min(1)


def _buffers_key(size: int, *buffers: torch.Tensor) -> tuple:
    """Cache key of something derived from ``buffers`` (and a catalogue ``size``): their identity,
    in-place version and shape, so an appended item or a replaced history invalidates it."""
    return (size, *((b.data_ptr(), b._version, b.shape) for b in buffers))


def _select(pooled: _Pooled, rows: torch.Tensor) -> _Pooled:
    """The per-user sums repeated for batch rows ``rows`` (indices into the distinct users)."""
    # index_select: its backward is deterministic on CPU (advanced indexing's is not)
    return _Pooled(*(
        None if (value := getattr(pooled, f.name)) is None else value.index_select(0, rows)
        for f in dataclasses.fields(pooled)
    ))


# k-means clusters of the components compared by the frame-agreement loss
_AGREEMENT_CLUSTERS = 16


def _cluster_codes(features: torch.Tensor, mask: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``(n_items, M, k)`` one-hot k-means cluster of every valid component of ``features``
    ``(n_items, M, D)`` (``mask`` ``(n_items, M)``), zero elsewhere. The components are L2-normalised
    first (cosine clusters). scikit-learn's k-means++ with ten restarts, the best kept: one Lloyd
    run from random points landed in local optima whose mean cosine to the centre varied from 0.84
    to 0.91 with the seed on the "stray" preset, and the worst made the frame-agreement loss reward
    the wrong frames (ACF fell below FISM at one catalogue seed)."""
    from sklearn.cluster import KMeans

    codes = features.new_zeros((*mask.shape, k))
    points = F.normalize(features[mask].double(), dim=-1).cpu().numpy()
    if points.shape[0] == 0:
        return codes
    n_clusters = min(k, points.shape[0])
    labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(points)
    codes[mask] = F.one_hot(torch.as_tensor(labels, dtype=torch.long, device=features.device), k).to(features.dtype)
    return codes


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
    """(user, item) of the CSR, user-major in a seeded random order (so capping keeps a sample).

    The order comes from one seeded priority per item, so a row's sample does not depend on the
    other rows (a new user's history scores the same alone or in a batch).
    """
    coo = train.tocoo()
    priority = rng.permutation(train.shape[1])
    order = np.lexsort((priority[coo.col], coo.row))
    return coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)


__all__ = ["ACF", "ACFConfig", "build_history"]
