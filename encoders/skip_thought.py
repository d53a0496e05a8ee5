"""Skip-thought vectors (Kiros et al. 2015).

A GRU encoder reads sentence ``s_i`` (``words + <eos>``) into ``h_i``; two GRU decoders, one for
the previous and one for the next sentence *of the same document*, predict those sentences word
by word with teacher forcing. As in the paper every decoder step is conditioned on ``h_i`` (its
``C_z h_i``, ``C_r h_i``, ``C h_i`` gate terms are a GRU whose input is ``[word; h_i]``) and the
two decoders share the output word matrix. Sentences without a neighbour in their document
still train the decoder of the neighbour they have; lone sentences do not train.

Variants (``variant``): ``uni`` (a forward GRU of ``hidden_dim``), ``bi`` (forward and backward
GRUs of ``hidden_dim // 2`` each, concatenated) and ``combine`` (combine-skip: a uni-skip and a
bi-skip model with separate parameters trained side by side on the same batches, their losses
summed; the component is their concatenation, ``2 * hidden_dim``).

Vocabulary expansion: :meth:`SkipThought.expand_vocabulary` fits, by least squares over the words
both know, a linear map from a larger word-embedding space (given by the user, e.g. word2vec
vectors; nothing is downloaded) into each encoder's word-embedding space, then gives every word of
that space unseen in training its mapped embedding. :func:`cooccurrence_vectors` builds such a
space (PPMI + truncated SVD) from any text, e.g. a bigger corpus than the training one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from encoders._text import (
    PAD,
    SPECIALS,
    RNNDecoder,
    Terms,
    TextConfig,
    TextEncoder,
    TokenBatch,
    Vocabulary,
    last_layer,
    read_sentences,
    token_nll,
    tokenize,
)
from encoders.base import register
from encoders.corpus import TextCorpus

VARIANTS = ("uni", "bi", "combine")
WordVectors = Mapping[str, np.ndarray] | tuple[Sequence[str], np.ndarray]


def neighbours(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Previous and next sentence of every sentence within its own document.

    Args:
        offsets: ``(n_items + 1,)`` sentence offsets per document.
    Returns:
        ``prev``, ``next``: ``(n_sentences,)`` int64 global sentence indices, -1 where the sentence
        opens (closes) its document.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = int(offsets[-1])
    doc = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    index = np.arange(n)
    prev = np.where((index > 0) & (doc == np.roll(doc, 1)), index - 1, -1)
    nxt = np.where((index < n - 1) & (doc == np.roll(doc, -1)), index + 1, -1)
    return prev.astype(np.int64), nxt.astype(np.int64)


@dataclass
class SkipThoughtConfig(TextConfig):
    variant: str = "uni"  # uni | bi | combine


@dataclass
class SkipBatch:
    """Centre sentences and their neighbours; a missing neighbour is an empty sentence with
    ``has_prev`` / ``has_next`` ``(batch,)`` False (it adds nothing to the loss)."""

    centre: TokenBatch
    prev: TokenBatch
    next: TokenBatch
    has_prev: torch.Tensor
    has_next: torch.Tensor


class SkipThoughtModel(nn.Module):
    """One skip-thought model: embedding, GRU encoder, previous/next GRU decoders, shared output."""

    def __init__(self, n_words: int, n_output: int, embed_dim: int, hidden_dim: int, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.embed = nn.Embedding(n_words, embed_dim, padding_idx=PAD)
        self.encoder = nn.GRU(embed_dim, hidden_dim // 2 if bidirectional else hidden_dim, batch_first=True, bidirectional=bidirectional)
        code_dim = 2 * (hidden_dim // 2) if bidirectional else hidden_dim
        self.decode_prev = RNNDecoder(embed_dim, hidden_dim, code_dim, cell="gru")
        self.decode_next = RNNDecoder(embed_dim, hidden_dim, code_dim, cell="gru")
        self.out = nn.Linear(hidden_dim, n_output)

    def vectors(self, batch: TokenBatch) -> torch.Tensor:
        """``(batch, code_dim)`` sentence vectors ``h_i``."""
        _, h_n = read_sentences(self.embed, self.encoder, batch)
        return last_layer(h_n, self.bidirectional)

    def neighbour_nll(self, code: torch.Tensor, decoder: RNNDecoder, target: TokenBatch, present: torch.Tensor) -> torch.Tensor:
        inputs, targets = target.decoder_io(self.out.out_features)
        targets = targets.masked_fill(~present[:, None], PAD)
        states, _ = decoder(self.embed(inputs), None, code)
        return token_nll(self.out(states), targets)

    def nll(self, batch: SkipBatch) -> torch.Tensor:
        code = self.vectors(batch.centre)
        return self.neighbour_nll(code, self.decode_prev, batch.prev, batch.has_prev) + self.neighbour_nll(
            code, self.decode_next, batch.next, batch.has_next
        )


class SkipThoughtNet(nn.Module):
    def __init__(self, n_words: int, n_output: int, embed_dim: int, hidden_dim: int, variant: str) -> None:
        super().__init__()
        kinds = {"uni": [False], "bi": [True], "combine": [False, True]}[variant]
        self.models = nn.ModuleList(SkipThoughtModel(n_words, n_output, embed_dim, hidden_dim, bi) for bi in kinds)


@register("skip-thought")
class SkipThought(TextEncoder):
    """Skip-thought encoder; ``output_dim`` = ``hidden_dim`` (uni, bi) or ``2 * hidden_dim`` (combine)."""

    config_class = SkipThoughtConfig
    config: SkipThoughtConfig
    module: SkipThoughtNet
    test_overrides = {**TextEncoder.test_overrides, "variant": "combine"}

    @property
    def output_dim(self) -> int:
        half = 2 * (self.config.hidden_dim // 2)
        return {"uni": self.config.hidden_dim, "bi": half, "combine": self.config.hidden_dim + half}[self.config.variant]

    def _network(self) -> nn.Module:
        if self.config.variant not in VARIANTS:
            raise ValueError(f"skip-thought: variant must be one of {VARIANTS}, got {self.config.variant!r}")
        c = self.config
        return SkipThoughtNet(len(self.vocab), self.vocab.n_output, c.embed_dim, c.hidden_dim, c.variant)

    def _make_batches(self, corpus: TextCorpus, rng: np.random.Generator | None) -> Iterator[SkipBatch]:
        """Sentences with at least one neighbour in their document, shuffled by ``rng``."""
        ids = self.sentence_ids(corpus.sentences)
        prev, nxt = neighbours(corpus.offsets)
        centres = np.flatnonzero((prev >= 0) | (nxt >= 0))
        if centres.size == 0:
            raise ValueError(f"{self.name}: no document has two sentences, so no sentence has a neighbour to predict")
        if rng is not None:
            centres = rng.permutation(centres)
        for start in range(0, centres.size, self.config.batch_size):
            chosen = centres[start : start + self.config.batch_size]
            yield SkipBatch(
                centre=self._token_batch([ids[i] for i in chosen]),
                prev=self._token_batch([ids[j] if j >= 0 else [] for j in prev[chosen]]),
                next=self._token_batch([ids[j] if j >= 0 else [] for j in nxt[chosen]]),
                has_prev=torch.as_tensor(prev[chosen] >= 0, device=self.device),
                has_next=torch.as_tensor(nxt[chosen] >= 0, device=self.device),
            )

    def _terms(self, batch: SkipBatch) -> Terms:
        """Summed NLL of the neighbours predicted (per model, summed over combine's two models);
        counts are those of one model so that perplexity is per model."""
        recon = sum(model.nll(batch) for model in self.module.models) / len(self.module.models)
        tokens = int(((batch.prev.lengths + 1) * batch.has_prev).sum() + ((batch.next.lengths + 1) * batch.has_next).sum())
        sentences = int(batch.has_prev.sum() + batch.has_next.sum())
        return Terms(recon, tokens, sentences)

    def _loss(self, batch: SkipBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = super()._loss(batch)
        return loss * len(self.module.models), metrics  # combine: each model gets its full gradient

    def _sentence_vectors(self, batch: TokenBatch) -> torch.Tensor:
        """``(batch, output_dim)``: each model's ``h_i``, concatenated for combine-skip."""
        return torch.cat([model.vectors(batch) for model in self.module.models], dim=-1)

    # ------------------------------------------------------------ vocabulary expansion
    def expand_vocabulary(self, word_vectors: WordVectors) -> list[str]:
        """Give words unseen in training an embedding mapped from ``word_vectors``.

        Args:
            word_vectors: ``{word: (d,) vector}`` or ``(words, (n_words, d) matrix)``: a word
                space that covers more words than the training vocabulary.
        Returns:
            The words added (encoder side only: the decoders still predict the training words).
            A second call replaces the first one's additions.
        """
        words, matrix = _as_word_matrix(word_vectors)
        trained = self.vocab.words[: self.vocab.n_output]
        trained_index = {w: i for i, w in enumerate(trained)}
        shared = [(row, trained_index[w]) for row, w in enumerate(words) if w in trained_index and w not in SPECIALS]
        if len(shared) < 2:
            raise ValueError(f"{self.name}.expand_vocabulary: only {len(shared)} word(s) shared with the training vocabulary; need 2+")
        new_rows = [row for row, w in enumerate(words) if w not in trained_index]
        source = torch.as_tensor(matrix, dtype=torch.float64)
        shared_rows, shared_ids = (torch.as_tensor(x) for x in zip(*shared, strict=True))
        for model in self._require_module().models:
            old = model.embed.weight.detach()[: self.vocab.n_output]
            mapping = fit_linear_map(source[shared_rows], old[shared_ids].double())
            added = (source[new_rows] @ mapping).to(old.dtype) if new_rows else old[:0]
            model.embed = nn.Embedding.from_pretrained(torch.cat([old, added]), freeze=False, padding_idx=PAD)
        self.vocab = Vocabulary(trained + [words[r] for r in new_rows], self.vocab.n_output)
        self.extra["vocab"] = self.vocab.to_extra()
        return [words[r] for r in new_rows]


def fit_linear_map(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares ``W`` ``(d_source, d_target)`` minimising ``||source @ W - target||``.

    Args:
        source: ``(n_shared, d_source)`` vectors of the shared words in the big space.
        target: ``(n_shared, d_target)`` their embeddings in the encoder.
    """
    if source.shape[0] != target.shape[0]:
        raise ValueError(f"fit_linear_map: {source.shape[0]} source rows vs {target.shape[0]} target rows")
    return torch.linalg.lstsq(source.double(), target.double(), driver="gelsd").solution


def _as_word_matrix(word_vectors: WordVectors) -> tuple[list[str], np.ndarray]:
    if isinstance(word_vectors, Mapping):
        words = list(word_vectors)
        matrix = np.stack([np.asarray(word_vectors[w], dtype=np.float64) for w in words]) if words else np.zeros((0, 0))
    else:
        words, matrix = list(word_vectors[0]), np.asarray(word_vectors[1], dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != len(words):
        raise ValueError(f"word vectors: expected ({len(words)}, dim) for {len(words)} words, got shape {matrix.shape}")
    return words, matrix


def cooccurrence_vectors(
    sentences: Sequence[str], dim: int = 64, window: int = 4, min_count: int = 1, seed: int = 0
) -> tuple[list[str], np.ndarray]:
    """A word space from raw text: positive PMI of co-occurrence within ``window`` words (inside a
    sentence), reduced by truncated SVD (rows ``U sqrt(S)``).

    Returns:
        ``words`` and their ``(n_words, min(dim, n_words))`` float32 vectors.
    """
    token_lists = [tokenize(s) for s in sentences]
    vocab = Vocabulary.build(token_lists, min_count)
    words = vocab.words[len(SPECIALS) :]
    if len(words) < 2:
        raise ValueError(f"cooccurrence_vectors: fewer than 2 words seen {min_count}+ times")
    ids = np.array([i - len(SPECIALS) if i >= len(SPECIALS) else -1 for t in token_lists for i in vocab.ids(t)], dtype=np.int64)
    sentence = np.repeat(np.arange(len(token_lists)), [len(t) for t in token_lists])
    pairs = []
    for shift in range(1, window + 1):  # window offsets, each one vectorised over the corpus
        left, right = ids[:-shift], ids[shift:]
        keep = (sentence[:-shift] == sentence[shift:]) & (left >= 0) & (right >= 0)
        pairs += [np.stack([left[keep], right[keep]]), np.stack([right[keep], left[keep]])]
    index = torch.as_tensor(np.concatenate(pairs, axis=1))
    n = len(words)
    counts = torch.sparse_coo_tensor(index, torch.ones(index.shape[1], dtype=torch.float64), (n, n), check_invariants=True).coalesce()
    (rows, cols), values = counts.indices(), counts.values()
    marginal = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, values)
    pmi = torch.log(values * values.sum() / (marginal[rows] * marginal[cols]))
    positive = pmi > 0
    ppmi = torch.sparse_coo_tensor(torch.stack([rows[positive], cols[positive]]), pmi[positive], (n, n), check_invariants=True).coalesce()
    rank = min(dim, n - 1)
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws a random sketch: keep the caller's RNG as it was
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(ppmi, q=rank, niter=4)
    return words, (u * s.sqrt()).float().numpy()
