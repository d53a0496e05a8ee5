"""Text VAE (Bowman et al. 2016, "Generating Sentences from a Continuous Space") with an LSTM or a
dilated-CNN decoder (Yang et al. 2017, "Improved Variational Autoencoders for Text Modeling using
Dilated Convolutions").

* Encoder: an LSTM reads ``words + <eos>``; its final state gives a diagonal Gaussian
  ``q(z | x) = N(mu, diag(exp(logvar)))``; ``z = mu + exp(logvar / 2) * eps`` (reparameterised).
* Loss: ``-E_q[log p(x | z)] + beta(step) * KL(q(z | x) || N(0, I))`` per sentence, with the KL
  weight ``beta`` annealed from 0 to 1 over ``kl_anneal_steps`` training steps (``linear`` or
  ``sigmoid``; the step count is a buffer of the network, so it survives checkpoints and resume).
* Word dropout: decoder input words become ``<unk>`` with probability ``word_dropout`` in training.
* Free bits (Kingma et al. 2016, an addition to Bowman's recipe): with ``free_bits = lambda > 0``
  the training loss charges each latent dimension ``max(lambda, KL_d)`` (KL_d averaged over the
  batch), so the optimiser gains nothing by pushing a dimension's KL below ``lambda`` nats: the
  guard against posterior collapse. Annealing and word dropout alone collapsed the KL to ~0 on
  plot sentences (both decoders, a few epochs). ``evaluate`` always reports the true KL and bound.
* ``decoder="lstm"``: ``z`` sets the initial state (``z_feed="init"``, Bowman), is concatenated to
  every input (``"input"``, Yang's LSTM-VAE) or both.
* ``decoder="cnn"``: ``[embedding; z]`` at every position, then residual blocks of causal dilated
  1-D convolutions (1x1 reduce, dilated ``cnn_kernel`` conv, 1x1 expand, ReLUs), one block per entry
  of ``cnn_dilations``. The decoder sees ``receptive_field = 1 + (kernel - 1) * sum(dilations)``
  previous tokens: Yang et al.'s knob between an LM-like decoder (large) and a bag-of-words-like
  one (small) that has to use ``z``.

``evaluate`` reports ``nll_nats`` (the negative ELBO per sentence, one posterior sample drawn from a
fixed seed), ``kl`` per sentence and ``perplexity`` = exp(-ELBO / tokens). Components are the
posterior means ``mu``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from encoders._text import (
    PAD,
    RNNDecoder,
    Terms,
    TextConfig,
    TextEncoder,
    TokenBatch,
    last_layer,
    read_sentences,
    token_nll,
    word_dropout,
)
from encoders.base import register

ANNEAL_SCHEDULES = ("linear", "sigmoid", "none")
DECODERS = ("lstm", "cnn")
Z_FEEDS = ("init", "input", "both")
_SIGMOID_SLOPE = 10.0  # sigmoid schedule: weight 0.0067 at step 0, 0.5 halfway, 0.9933 at the end


def kl_weight(step: int, schedule: str, steps: int) -> float:
    """KL weight after ``step`` training steps: ``linear`` = min(1, step / steps); ``sigmoid`` =
    1 / (1 + exp(-10 (step / steps - 1/2))) (Bowman et al.'s logistic schedule); ``none`` = 1."""
    if schedule not in ANNEAL_SCHEDULES:
        raise ValueError(f"kl_anneal must be one of {ANNEAL_SCHEDULES}, got {schedule!r}")
    if schedule == "none" or steps <= 0:
        return 1.0
    if schedule == "linear":
        return min(1.0, step / steps)
    return 1.0 / (1.0 + math.exp(-_SIGMOID_SLOPE * (step / steps - 0.5)))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` KL(N(mu, diag exp(logvar)) || N(0, I)) in nats."""
    return gaussian_kl_dims(mu, logvar).sum(-1)


def gaussian_kl_dims(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``(batch, latent_dim)`` the KL of each latent dimension, in nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def free_bits_kl(kl_dims: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Summed KL the loss charges for a batch ``(batch, latent_dim)``: per dimension
    ``max(free_bits, mean over the batch)``, times the batch size (so it sums like the true KL)."""
    return kl_dims.mean(0).clamp(min=free_bits).sum() * kl_dims.shape[0]


@dataclass
class TextVAEConfig(TextConfig):
    latent_dim: int = 32
    decoder: str = "lstm"  # lstm | cnn
    z_feed: str = "init"  # lstm decoder: init | input | both
    word_dropout: float = 0.0  # Bowman et al. use e.g. 0.25; 0 keeps the decoder a plain LM
    kl_anneal: str = "linear"  # linear | sigmoid | none
    kl_anneal_steps: int = 2000
    free_bits: float = 0.25  # nats per latent dimension the loss does not charge below (0 = Bowman's plain loss)
    cnn_kernel: int = 3
    cnn_dilations: list[int] = field(default_factory=lambda: [1, 2, 4])
    cnn_channels: int = 0  # 0 = hidden_dim
    cnn_dropout: float = 0.0


class CausalConv1d(nn.Conv1d):
    """1-D convolution over ``(batch, channels, time)`` whose output at t sees inputs <= t only
    (left padding of ``(kernel - 1) * dilation``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.left = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left, 0)))


class DilatedBlock(nn.Module):
    """Yang et al.'s residual block: ReLU, 1x1 conv (c -> c/2), ReLU, causal dilated conv, ReLU,
    1x1 conv (c/2 -> c), added to the input."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        inner = max(channels // 2, 1)
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(channels, inner, 1),
            nn.ReLU(),
            CausalConv1d(inner, inner, kernel_size, dilation),
            nn.ReLU(),
            nn.Conv1d(inner, channels, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DilatedCNNDecoder(nn.Module):
    """``(batch, time, in_dim)`` inputs (embedding and z) -> ``(batch, time, channels)`` causal states."""

    def __init__(self, in_dim: int, channels: int, kernel_size: int, dilations: list[int], dropout: float) -> None:
        super().__init__()
        self.project = nn.Conv1d(in_dim, channels, 1)
        self.blocks = nn.Sequential(*(DilatedBlock(channels, kernel_size, d, dropout) for d in dilations))
        self.receptive_field = 1 + (kernel_size - 1) * sum(dilations)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.project(inputs.transpose(1, 2))).transpose(1, 2)


class TextVAENet(nn.Module):
    def __init__(self, n_words: int, n_output: int, config: TextVAEConfig) -> None:
        super().__init__()
        c = config
        self.embed = nn.Embedding(n_words, c.embed_dim, padding_idx=PAD)
        self.encoder = nn.LSTM(c.embed_dim, c.hidden_dim, batch_first=True)
        self.posterior = nn.Linear(c.hidden_dim, 2 * c.latent_dim)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        if c.decoder == "lstm":
            feeds_input = c.z_feed in ("input", "both")
            self.decoder = RNNDecoder(c.embed_dim, c.hidden_dim, c.latent_dim if feeds_input else 0)
            self.init_state = nn.Linear(c.latent_dim, 2 * c.hidden_dim) if c.z_feed in ("init", "both") else None
            out_dim = c.hidden_dim
        else:
            out_dim = c.cnn_channels or c.hidden_dim
            self.decoder = DilatedCNNDecoder(c.embed_dim + c.latent_dim, out_dim, c.cnn_kernel, c.cnn_dilations, c.cnn_dropout)
        self.out = nn.Linear(out_dim, n_output)


@register("text-vae")
class TextVAE(TextEncoder):
    """Bowman et al.'s sentence VAE (LSTM or dilated-CNN decoder); ``output_dim`` = ``latent_dim``."""

    config_class = TextVAEConfig
    config: TextVAEConfig
    module: TextVAENet
    test_overrides = {**TextEncoder.test_overrides, "latent_dim": 8, "kl_anneal_steps": 4}

    @property
    def output_dim(self) -> int:
        return self.config.latent_dim

    def _network(self) -> nn.Module:
        c = self.config
        for option, value, allowed in (("decoder", c.decoder, DECODERS), ("z_feed", c.z_feed, Z_FEEDS), ("kl_anneal", c.kl_anneal, ANNEAL_SCHEDULES)):
            if value not in allowed:
                raise ValueError(f"text-vae: {option} must be one of {allowed}, got {value!r}")
        if c.decoder == "cnn" and (c.cnn_kernel < 1 or not c.cnn_dilations or min(c.cnn_dilations) < 1):
            raise ValueError(f"text-vae: cnn_kernel >= 1 and positive cnn_dilations needed, got {c.cnn_kernel}, {c.cnn_dilations}")
        return TextVAENet(len(self.vocab), self.vocab.n_output, c)

    def _has_kl(self) -> bool:
        return True

    def kl_weight(self) -> float:
        """Annealed weight at the current step; counts the step while training."""
        step = int(self.module.steps_done)
        if self.module.training:
            self.module.steps_done += 1
        return kl_weight(step, self.config.kl_anneal, self.config.kl_anneal_steps)

    def _posterior(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, latent_dim)`` mean and log-variance of q(z | sentence)."""
        _, (h_n, _) = read_sentences(self.module.embed, self.module.encoder, batch)
        mu, logvar = self.module.posterior(last_layer(h_n)).chunk(2, dim=-1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``(batch, time, n_output)`` next-word logits given ``z`` ``(batch, latent)`` and input ids."""
        net, c = self.module, self.config
        embedded = net.embed(inputs)
        if c.decoder == "cnn":
            states = net.decoder(torch.cat([embedded, z[:, None].expand(-1, embedded.shape[1], -1)], dim=-1))
            return net.out(states)
        state = None
        if net.init_state is not None:
            h0, c0 = torch.tanh(net.init_state(z)).chunk(2, dim=-1)
            state = (h0[None].contiguous(), c0[None].contiguous())
        states, _ = net.decoder(embedded, state, z if c.z_feed in ("input", "both") else None)
        return net.out(states)

    def _terms(self, batch: TokenBatch) -> Terms:
        mu, logvar = self._posterior(batch)
        if self.module.training:
            eps = torch.randn_like(mu)
        else:  # held-out bound: one sample, the same every call
            generator = torch.Generator(device=mu.device).manual_seed(self.config.seed)
            eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps
        inputs, targets = batch.decoder_io(self.vocab.n_output)
        if self.module.training:
            inputs = word_dropout(inputs, self.config.word_dropout)
        recon = token_nll(self.decode_logits(z, inputs), targets)
        kl_dims = gaussian_kl_dims(mu, logvar)
        objective = free_bits_kl(kl_dims, self.config.free_bits) if self.module.training and self.config.free_bits > 0 else None
        return Terms(recon, batch.n_target_tokens(), len(batch), kl=kl_dims.sum(), kl_objective=objective)

    def _sentence_vectors(self, batch: TokenBatch) -> torch.Tensor:
        """``(batch, latent_dim)`` posterior means."""
        return self._posterior(batch)[0]
