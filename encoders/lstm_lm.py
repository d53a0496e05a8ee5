"""Plain LSTM language model over sentences: the reference a text VAE has to beat.

``p(w_1..w_n, <eos>) = prod_t p(w_t | <bos>, w_<t)`` with one LSTM layer; its perplexity on held-out
sentences is the baseline of the text benchmarks (Yang et al. 2017 compare every VAE with it).
A sentence's component is the LSTM state after reading its last word.
"""

from __future__ import annotations

from torch import nn

from encoders._text import PAD, RNNDecoder, Terms, TextEncoder, TokenBatch, at_positions, token_nll
from encoders.base import register


class LanguageModelNet(nn.Module):
    def __init__(self, n_words: int, n_output: int, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_words, embed_dim, padding_idx=PAD)
        self.decoder = RNNDecoder(embed_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, n_output)


@register("lstm-lm")
class LSTMLanguageModel(TextEncoder):
    """LSTM language model; ``output_dim`` = ``hidden_dim``."""

    module: LanguageModelNet

    def _network(self) -> nn.Module:
        return LanguageModelNet(len(self.vocab), self.vocab.n_output, self.config.embed_dim, self.config.hidden_dim)

    def _states(self, batch: TokenBatch):
        inputs, targets = batch.decoder_io(self.vocab.n_output)
        states, _ = self.module.decoder(self.module.embed(inputs))
        return states, targets

    def _terms(self, batch: TokenBatch) -> Terms:
        states, targets = self._states(batch)
        return Terms(token_nll(self.module.out(states), targets), batch.n_target_tokens(), len(batch))

    def _sentence_vectors(self, batch: TokenBatch):
        """``(batch, hidden_dim)``: the state after ``<bos> + words`` (the one that predicts ``<eos>``)."""
        states, _ = self._states(batch)
        return at_positions(states, batch.lengths)
