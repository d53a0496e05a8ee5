"""Sequence autoencoder (Dai and Le 2015, "Semi-supervised Sequence Learning").

An LSTM reads the sentence (``words + <eos>``); a decoder LSTM started from its final state
``(h, c)`` reconstructs the same sentence with teacher forcing (``<bos> + words`` ->
``words + <eos>``). As in the paper the encoder and decoder share their weights by default (one
LSTM that reads the sentence and then goes on to write it); ``share_weights=False`` gives them
separate LSTMs. A sentence's component is the encoder's final hidden state ``h``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from encoders._text import (
    PAD,
    Terms,
    TextConfig,
    TextEncoder,
    TokenBatch,
    last_layer,
    read_sentences,
    token_nll,
)
from encoders.base import register


@dataclass
class SeqAutoencoderConfig(TextConfig):
    share_weights: bool = True  # Dai and Le: encoder and decoder are the same LSTM


class SeqAutoencoderNet(nn.Module):
    def __init__(self, n_words: int, n_output: int, embed_dim: int, hidden_dim: int, share_weights: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_words, embed_dim, padding_idx=PAD)
        self.encoder = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.decoder = self.encoder if share_weights else nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.out = nn.Linear(hidden_dim, n_output)


@register("seq-autoencoder")
class SequenceAutoencoder(TextEncoder):
    """LSTM sequence autoencoder; ``output_dim`` = ``hidden_dim``."""

    config_class = SeqAutoencoderConfig
    config: SeqAutoencoderConfig
    module: SeqAutoencoderNet

    def _network(self) -> nn.Module:
        c = self.config
        return SeqAutoencoderNet(len(self.vocab), self.vocab.n_output, c.embed_dim, c.hidden_dim, c.share_weights)

    def _terms(self, batch: TokenBatch) -> Terms:
        net = self.module
        _, state = read_sentences(net.embed, net.encoder, batch)
        inputs, targets = batch.decoder_io(self.vocab.n_output)
        states, _ = net.decoder(net.embed(inputs), state)
        return Terms(token_nll(net.out(states), targets), batch.n_target_tokens(), len(batch))

    def _sentence_vectors(self, batch: TokenBatch) -> torch.Tensor:
        """``(batch, hidden_dim)`` final encoder hidden state."""
        _, (h_n, _) = read_sentences(self.module.embed, self.module.encoder, batch)
        return last_layer(h_n)
