"""Hierarchical LSTM autoencoder of documents (Li, Luong and Jurafsky 2015, "A Hierarchical
Neural Autoencoder for Paragraphs and Documents").

Encoder: a word-level LSTM reads each sentence (``words + <eos>``) into a sentence vector
``e_s`` (its final hidden state); a sentence-level LSTM reads ``e_1..e_S`` into the document
vector (its final state). Decoder: a sentence-level LSTM started from the document state produces
one state per sentence; a word-level LSTM started from that state writes the sentence (teacher
forcing). The sentence decoder's input at step t is the word decoder's last state of sentence t-1
(zeros at t = 1), as in the paper. With ``attention`` the sentence decoder also reads
``m_t = sum_i a_i h_i`` over the encoder's sentence-level states, ``a = softmax_i(u^T tanh(W1
h^dec_{t-1} + W2 h^enc_i))`` (the paper's attention model).

Training and evaluation keep the first ``max_sentences`` sentences of each document
(``batch_size`` counts documents here); components are the word-level sentence vectors ``e_s`` of
every sentence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from encoders._text import (
    PAD,
    Terms,
    TextConfig,
    TextEncoder,
    TokenBatch,
    at_positions,
    last_layer,
    read_sentences,
    run_packed,
    token_nll,
)
from encoders.base import register
from encoders.corpus import TextCorpus


@dataclass
class HierarchicalConfig(TextConfig):
    attention: bool = False
    max_sentences: int = 8  # per document in training and evaluation (encoding covers all)


@dataclass
class DocBatch:
    """Documents, longest first, as their sentences laid end to end.

    Attributes:
        sentences: ``(n_sentences, max_words)`` the kept sentences, document after document.
        doc_lengths: ``(n_docs,)`` sentences per document, non-increasing, all >= 1.
    """

    sentences: TokenBatch
    doc_lengths: torch.Tensor


class HierarchicalNet(nn.Module):
    def __init__(self, n_words: int, n_output: int, embed_dim: int, hidden_dim: int, attention: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_words, embed_dim, padding_idx=PAD)
        self.word_encoder = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.sentence_encoder = nn.LSTM(hidden_dim, hidden_dim, batch_first=True)
        self.sentence_decoder = nn.LSTMCell(hidden_dim * (2 if attention else 1), hidden_dim)
        self.word_decoder = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.out = nn.Linear(hidden_dim, n_output)
        self.attention = attention
        if attention:
            self.attend_decoder = nn.Linear(hidden_dim, hidden_dim, bias=False)
            self.attend_encoder = nn.Linear(hidden_dim, hidden_dim)
            self.attend_score = nn.Linear(hidden_dim, 1, bias=False)

    def context(self, h_dec: torch.Tensor, enc_states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(docs, hidden)`` attention read of ``enc_states`` ``(docs, S, hidden)`` (``valid`` ``(docs, S)``)."""
        scores = self.attend_score(torch.tanh(self.attend_decoder(h_dec)[:, None] + self.attend_encoder(enc_states))).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        return (weights[..., None] * enc_states).sum(1)


@register("hierarchical-autoencoder")
class HierarchicalAutoencoder(TextEncoder):
    """Hierarchical LSTM autoencoder; ``output_dim`` = ``hidden_dim``."""

    config_class = HierarchicalConfig
    config: HierarchicalConfig
    module: HierarchicalNet
    test_overrides = {**TextEncoder.test_overrides, "attention": True}

    def _network(self) -> nn.Module:
        c = self.config
        return HierarchicalNet(len(self.vocab), self.vocab.n_output, c.embed_dim, c.hidden_dim, c.attention)

    def _make_batches(self, corpus: TextCorpus, rng: np.random.Generator | None) -> Iterator[DocBatch]:
        """Non-empty documents (first ``max_sentences`` sentences), shuffled by ``rng``."""
        ids = self.sentence_ids(corpus.sentences)
        offsets = corpus.offsets
        docs = np.flatnonzero(np.diff(offsets) > 0)
        if rng is not None:
            docs = rng.permutation(docs)
        for start in range(0, docs.size, self.config.batch_size):
            chosen = docs[start : start + self.config.batch_size]
            lengths = np.minimum(offsets[chosen + 1] - offsets[chosen], self.config.max_sentences)
            order = np.argsort(-lengths, kind="stable")
            kept = [ids[offsets[d] + s] for d, n in zip(chosen[order], lengths[order], strict=True) for s in range(n)]
            yield DocBatch(self._token_batch(kept), torch.as_tensor(lengths[order], device=self.device))

    def _terms(self, batch: DocBatch) -> Terms:
        net = self.module
        n_docs, n_steps = len(batch.doc_lengths), int(batch.doc_lengths.max())
        doc = torch.repeat_interleave(torch.arange(n_docs, device=self.device), batch.doc_lengths)
        position = torch.arange(doc.numel(), device=self.device) - torch.repeat_interleave(
            torch.cumsum(batch.doc_lengths, 0) - batch.doc_lengths, batch.doc_lengths
        )
        sentence_vectors = self._sentence_vectors(batch.sentences)
        grid = sentence_vectors.new_zeros(n_docs, n_steps, sentence_vectors.shape[-1])
        grid[doc, position] = sentence_vectors
        enc_states, (h_doc, c_doc) = run_packed(net.sentence_encoder, grid, batch.doc_lengths)
        valid = torch.arange(n_steps, device=self.device)[None] < batch.doc_lengths[:, None]
        # sentence t of the document in row d is sentence number where_sentence[d, t] of the batch
        where_sentence = torch.zeros(n_docs, n_steps, dtype=torch.long, device=self.device)
        where_sentence[doc, position] = torch.arange(doc.numel(), device=self.device)
        h, c = h_doc[-1], c_doc[-1]
        previous = torch.zeros_like(h)
        recon = h.new_zeros(())
        for step in range(n_steps):  # sentence-level recurrence, batched over documents
            active = int((batch.doc_lengths > step).sum())  # documents are sorted: a prefix
            h, c, previous = h[:active], c[:active], previous[:active]
            inputs = previous
            if net.attention:
                inputs = torch.cat([previous, net.context(h, enc_states[:active], valid[:active])], dim=-1)
            h, c = net.sentence_decoder(inputs, (h, c))
            rows = where_sentence[:active, step]
            sentence = TokenBatch(batch.sentences.words[rows], batch.sentences.lengths[rows])
            word_inputs, targets = sentence.decoder_io(self.vocab.n_output)
            states, _ = net.word_decoder(net.embed(word_inputs), (h[None].contiguous(), c[None].contiguous()))
            recon = recon + token_nll(net.out(states), targets)
            previous = at_positions(states, sentence.lengths)
        return Terms(recon, batch.sentences.n_target_tokens(), len(batch.sentences))

    def _sentence_vectors(self, batch: TokenBatch) -> torch.Tensor:
        """``(batch, hidden_dim)`` word-level encoder final states ``e_s``."""
        _, (h_n, _) = read_sentences(self.module.embed, self.module.word_encoder, batch)
        return last_layer(h_n)
