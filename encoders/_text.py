"""What every text encoder shares: tokeniser, vocabulary, padded token batches, the sentence-level
training/evaluation loop and the recurrent building blocks.

A text encoder yields one component per sentence of each document (an empty document yields
none). Token ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3, then the training words
by falling count. Encoders read ``words + <eos>``; decoders read ``<bos> + words`` and predict
``words + <eos>`` (teacher forcing), so perplexity counts the end of every sentence.
"""

from __future__ import annotations

import math
import re
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from encoders.base import Encoder, EncoderConfig
from encoders.corpus import Components, Corpus, TextCorpus

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")

# Words (with an inner apostrophe: "don't", "andy's") or single punctuation marks.
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
# A sentence ends at . ! or ? (and a closing quote) followed by space and a capital, digit or quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b[A-Z]\.)(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)[\"')\]]?\s+(?=[\"'(A-Z0-9])")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: ``"Andy's toys!" -> ["andy's", "toys", "!"]``."""
    return _TOKEN.findall(text.lower())


def split_sentences(text: str) -> list[str]:
    """Sentences of a raw text (for users who have paragraphs, not sentence lists); blanks dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


class Vocabulary:
    """Word <-> id. ``n_output`` words (specials + training words) are what decoders predict;
    words added by vocabulary expansion come after them and exist on the encoder side only."""

    def __init__(self, words: Sequence[str], n_output: int | None = None) -> None:
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {list(words[:4])}")
        self.words = list(words)
        self.n_output = len(self.words) if n_output is None else int(n_output)
        self.index = {word: i for i, word in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary has duplicate words")

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_count: int = 1, max_size: int = 0) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical);
        ``max_size`` > 0 caps the size including the 4 specials."""
        counts = Counter(token for tokens in sentences for token in tokens)
        kept = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS), key=lambda w: (-counts[w], w))
        if max_size > 0:
            kept = kept[: max(max_size - len(SPECIALS), 0)]
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.index.get(token, UNK) for token in tokens]

    def to_extra(self) -> dict[str, Any]:
        return {"words": self.words, "n_output": self.n_output}

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> Vocabulary:
        return cls(extra["words"], extra["n_output"])


@dataclass
class TokenBatch:
    """Padded word ids of a batch of sentences.

    Attributes:
        words: ``(batch, max_words)`` int64, ``PAD`` after each sentence's words (at least 1 column).
        lengths: ``(batch,)`` int64 number of words (0 for an empty sentence).
    """

    words: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_ids(cls, id_lists: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> TokenBatch:
        lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.long)
        width = max(int(lengths.max()) if len(id_lists) else 0, 1)
        words = torch.full((len(id_lists), width), PAD, dtype=torch.long)
        if len(id_lists):
            flat = torch.tensor([i for ids in id_lists for i in ids], dtype=torch.long)
            rows = torch.repeat_interleave(torch.arange(len(id_lists)), lengths)
            cols = torch.arange(flat.numel()) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
            words[rows, cols] = flat
        return cls(words.to(device), lengths.to(device))

    def __len__(self) -> int:
        return int(self.words.shape[0])

    def with_eos(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input ``(batch, max_words + 1)`` = words then ``<eos>``, and its lengths ``(batch,)``."""
        tokens = F.pad(self.words, (0, 1), value=PAD)
        tokens.scatter_(1, self.lengths[:, None], EOS)
        return tokens, self.lengths + 1

    def decoder_io(self, n_output: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: inputs ``<bos> + words`` and targets ``words + <eos>``, both
        ``(batch, max_words + 1)``; targets are ``PAD`` past the end, expansion-only words ``<unk>``."""
        bos = torch.full_like(self.words[:, :1], BOS)
        inputs = torch.cat([bos, self.words], dim=1)
        targets = self.with_eos()[0]
        return _clip_to_output(inputs, n_output), _clip_to_output(targets, n_output)

    def n_target_tokens(self) -> int:
        return int((self.lengths + 1).sum())


def _clip_to_output(ids: torch.Tensor, n_output: int) -> torch.Tensor:
    return torch.where(ids >= n_output, torch.full_like(ids, UNK), ids)


# ------------------------------------------------------------------ recurrent building blocks
def run_packed(
    rnn: nn.RNNBase, inputs: torch.Tensor, lengths: torch.Tensor, state: Any = None
) -> tuple[torch.Tensor, Any]:
    """Run ``rnn`` (batch_first) on ``inputs`` ``(batch, time, dim)`` stopping at each row's length.

    Returns outputs ``(batch, time, hidden * directions)`` (zeros past the end) and the final state
    (``h_n`` or ``(h_n, c_n)``, each ``(layers * directions, batch, hidden)``) at each row's last step.
    """
    packed = pack_padded_sequence(inputs, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
    out, final = rnn(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=inputs.shape[1])
    return out, final


def read_sentences(embed: nn.Embedding, rnn: nn.RNNBase, batch: TokenBatch) -> tuple[torch.Tensor, Any]:
    """Encoder pass over ``words + <eos>``: outputs ``(batch, max_words + 1, hidden * directions)``
    and the final state at each sentence's ``<eos>`` (see :func:`run_packed`)."""
    tokens, lengths = batch.with_eos()
    return run_packed(rnn, embed(tokens), lengths)


def last_layer(h_n: torch.Tensor, bidirectional: bool = False) -> torch.Tensor:
    """``(batch, hidden)`` top-layer final hidden state (both directions concatenated)."""
    return torch.cat([h_n[-2], h_n[-1]], dim=-1) if bidirectional else h_n[-1]


def at_positions(outputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``outputs[b, positions[b]]``: ``(batch, time, dim)``, ``(batch,)`` -> ``(batch, dim)``."""
    index = positions.view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
    return outputs.gather(1, index).squeeze(1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood (nats) of ``targets`` ``(batch, time)`` under ``logits``
    ``(batch, time, vocab)``; ``PAD`` targets count nothing."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD, reduction="sum")


def word_dropout(inputs: torch.Tensor, rate: float) -> torch.Tensor:
    """Bowman et al. 2016: replace decoder input words (not ``<bos>``/``<pad>``) by ``<unk>``
    with probability ``rate`` so the decoder must lean on the latent code."""
    if rate <= 0:
        return inputs
    drop = (torch.rand(inputs.shape, device=inputs.device) < rate) & (inputs != PAD) & (inputs != BOS)
    return inputs.masked_fill(drop, UNK)


class RNNDecoder(nn.Module):
    """Word-level decoder (``cell`` "lstm" or "gru"): embedded inputs ``(batch, time, embed_dim)``
    -> states ``(batch, time, hidden)``, optionally with a ``(batch, cond_dim)`` vector concatenated
    to every input (for a GRU that is exactly skip-thought's extra ``C h_i`` terms in every gate)."""

    def __init__(self, embed_dim: int, hidden_dim: int, cond_dim: int = 0, cell: str = "lstm") -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(embed_dim + cond_dim, hidden_dim, batch_first=True)

    def forward(self, embedded: torch.Tensor, state: Any = None, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        if cond is not None:
            embedded = torch.cat([embedded, cond[:, None].expand(-1, embedded.shape[1], -1)], dim=-1)
        return self.rnn(embedded, state)


# ------------------------------------------------------------------ the shared encoder class
@dataclass
class TextConfig(EncoderConfig):
    """Options every text encoder has (sizes, vocabulary)."""

    embed_dim: int = 128
    hidden_dim: int = 256
    min_count: int = 2  # words seen fewer times in training are <unk>
    max_vocab: int = 20000  # including the 4 specials; 0 = no cap
    max_len: int = 50  # words kept per sentence (the rest is cut)


@dataclass
class Terms:
    """Summed figures of one batch: reconstruction NLL (nats), optional KL (nats), counts."""

    recon: torch.Tensor
    tokens: int
    sentences: int
    kl: torch.Tensor | None = None
    # What the training loss charges for the KL when it differs from ``kl`` (free bits).
    kl_objective: torch.Tensor | None = None


class TextEncoder(Encoder):
    """Base of the sentence encoders: vocabulary from the training corpus (kept in ``extra``),
    shuffled sentence batches, one component per sentence, perplexity evaluation.

    Subclasses implement ``_network() -> nn.Module`` (``self.vocab`` is set),
    ``_terms(batch) -> Terms`` and ``_sentence_vectors(TokenBatch) -> (batch, output_dim)``;
    those whose batches are not single sentences override ``_make_batches``.
    """

    modality: ClassVar[str] = "text"
    config_class: ClassVar[type[EncoderConfig]] = TextConfig
    test_overrides: ClassVar[dict[str, Any]] = {"embed_dim": 16, "hidden_dim": 16, "min_count": 1}
    config: TextConfig
    vocab: Vocabulary

    @property
    def output_dim(self) -> int:
        """One ``hidden_dim`` vector per sentence unless the model says otherwise."""
        return self.config.hidden_dim

    # ------------------------------------------------------------ building
    def _build(self, corpus: Corpus | None) -> nn.Module:
        if corpus is not None:
            if not isinstance(corpus, TextCorpus):
                raise TypeError(f"{self.name} is a text encoder: fit it on a TextCorpus, got {type(corpus).__name__}")
            tokens = (tokenize(s)[: self.config.max_len] for s in corpus.sentences)
            vocab = Vocabulary.build(tokens, self.config.min_count, self.config.max_vocab)
            if len(vocab) == len(SPECIALS):
                raise ValueError(f"{self.name}: the training corpus has no word seen {self.config.min_count}+ times")
            self.extra = {"vocab": vocab.to_extra()}
        self.vocab = Vocabulary.from_extra(self.extra["vocab"])
        return self._network()

    def _build_from_extra(self) -> nn.Module:
        return self._build(None)

    @abstractmethod
    def _network(self) -> nn.Module: ...

    @abstractmethod
    def _terms(self, batch: Any) -> Terms: ...

    @abstractmethod
    def _sentence_vectors(self, batch: TokenBatch) -> torch.Tensor: ...

    # ------------------------------------------------------------ batches
    def sentence_ids(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids of each sentence, cut to ``max_len`` words (unknown words -> ``<unk>``)."""
        return [self.vocab.ids(tokenize(s)[: self.config.max_len]) for s in sentences]

    def _token_batch(self, id_lists: Sequence[Sequence[int]]) -> TokenBatch:
        return TokenBatch.from_ids(id_lists, self.device)

    def _make_batches(self, corpus: TextCorpus, rng: np.random.Generator | None) -> Iterator[Any]:
        """Sentence batches, shuffled by ``rng`` (in corpus order when ``None``)."""
        ids = self.sentence_ids(corpus.sentences)
        order = np.arange(len(ids)) if rng is None else rng.permutation(len(ids))
        for start in range(0, len(ids), self.config.batch_size):
            yield self._token_batch([ids[i] for i in order[start : start + self.config.batch_size]])

    def _batches(self, corpus: Corpus, rng: np.random.Generator) -> Iterable[Any]:
        return self._make_batches(_text_corpus(corpus, self.name), rng)

    # ------------------------------------------------------------ training and evaluation
    def kl_weight(self) -> float:
        """Weight of the KL term in the training loss (annealed by the VAE)."""
        return 1.0

    def _loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self._terms(batch)
        loss = terms.recon
        metrics = {"nll_per_token": float(terms.recon.detach()) / max(terms.tokens, 1)}
        if terms.kl is not None:
            weight = self.kl_weight()
            loss = loss + weight * (terms.kl if terms.kl_objective is None else terms.kl_objective)
            metrics.update(kl=float(terms.kl.detach()) / max(terms.sentences, 1), kl_weight=weight)
        return loss / max(terms.sentences, 1), metrics

    def evaluate(self, corpus: Corpus) -> dict[str, float]:
        """Held-out figures: ``nll_nats`` per sentence (reconstruction + KL: the ELBO bound for
        the VAE), ``perplexity`` = exp(NLL / target tokens, ``<eos>`` included), ``kl`` per sentence."""
        module = self._require_module()
        was_training = module.training
        module.eval()
        recon = kl = 0.0
        tokens = sentences = 0
        try:
            with torch.no_grad():
                for batch in self._make_batches(_text_corpus(corpus, self.name), None):
                    terms = self._terms(batch)
                    recon += float(terms.recon)
                    kl += float(terms.kl) if terms.kl is not None else 0.0
                    tokens, sentences = tokens + terms.tokens, sentences + terms.sentences
        finally:
            module.train(was_training)
        if tokens == 0:
            raise ValueError(f"{self.name}.evaluate: the corpus has no sentence to score")
        figures = {
            "nll_nats": (recon + kl) / sentences,
            "perplexity": math.exp((recon + kl) / tokens),
            "recon_nats": recon / sentences,
            "n_tokens": float(tokens),
        }
        if self._has_kl():
            figures["kl"] = kl / sentences
        return figures

    def _has_kl(self) -> bool:
        return False

    # ------------------------------------------------------------ encoding
    def _encode(self, corpus: Corpus) -> Components:
        corpus = _text_corpus(corpus, self.name)
        ids = self.sentence_ids(corpus.sentences)
        parts = [
            self._sentence_vectors(self._token_batch(ids[start : start + self.config.batch_size])).float().cpu()
            for start in range(0, len(ids), self.config.batch_size)
        ]
        matrix = torch.cat(parts).numpy() if parts else np.zeros((0, self.output_dim), np.float32)
        return Components(matrix, corpus.offsets, corpus.item_ids)


def _text_corpus(corpus: Corpus, name: str) -> TextCorpus:
    if not isinstance(corpus, TextCorpus):
        raise TypeError(f"{name} is a text encoder: it needs a TextCorpus, got {type(corpus).__name__}")
    return corpus
