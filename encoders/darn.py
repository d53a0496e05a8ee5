"""DARN: Deep AutoRegressive Networks (Gregor, Danihelka, Mnih, Blundell, Wierstra 2014).

A generative model of binary images with stochastic binary hidden layers ``h^1 .. h^L``
(``layers``, nearest the image first)::

    p(x, h) = p(h^L) prod_l p(h^l | h^(l+1)) p(x | h^1)

Every factor is an *autoregressive* Bernoulli layer (:class:`AutoregressiveBernoulli`): unit
``k`` of a layer is a logistic unit of the layer above plus direct (linear, strictly lower-
triangular) connections from units ``< k`` of its own layer, as in the paper. So the top prior
``p(h^L)`` is autoregressive over its units and the decoder ``p(x | h^1)`` is autoregressive over
the pixels (raster order, channel by channel) given ``h^1``. The encoder ``q(h^1 | x)``,
``q(h^(l+1) | h^l)`` has the same form; ``autoregressive_encoder=False`` makes it factorised
(independent logistic units, sampled in one shot instead of unit by unit).

Deterministic hidden layers (``deterministic_hidden = n > 0``; the paper allows them between the
stochastic layers): every conditional's path from the layer it conditions on becomes a one-
hidden-layer tanh MLP of width ``n`` instead of a linear map, in the decoder
``p(h^l | h^(l+1))``, ``p(x | h^1)`` and the encoder ``q(h^(l+1) | h^l)``, ``q(h^1 | x)`` alike
(the top prior has nothing to condition on). The autoregressive connections within a layer stay
linear, so the stochastic layers and their codes are unchanged; ``0`` (the default) is the
plain linear DARN.

Training minimises the description-length bound (the negative ELBO, nats per image)::

    L(x) = E_q[ -log p(x, h) + log q(h | x) ]      (the code length of x through h)

with one sampled ``h`` per image. The generative parameters get exact gradients of
``log p(x, h)``; the encoder's gradient is the score-function (REINFORCE) estimate
``l(x, h) * grad log q(h | x)`` with ``l = log p(x, h) - log q(h | x)``, made usable by the
variance reduction of NVIL (Mnih and Gregor 2014): an input-dependent baseline ``b(x)`` (an MLP
trained to predict the centred signal by least squares), a running mean ``c`` of ``l - b(x)`` and
division by ``max(1, sqrt(v))`` with ``v`` the running variance of ``l - b(x)``
(:class:`LearningSignal`, momentum ``signal_momentum`` = NVIL's 0.8).

Binarisation (``binarize``): ``"threshold"`` (pixel >= 128) or ``"sample"``: one fixed
stochastic binarisation, each pixel on with probability ``pixel / 255``, drawn from a hash of the
image's own pixels and the seed, so an image binarises the same way in training, evaluation and
encoding (the usual "static binarised MNIST" protocol).

Features (``features``), one component per image / frame: ``"probs"`` the encoder's
probabilities ``q(h_k = 1 | ...)``, ``"codes"`` the binary code, ``"both"`` the two concatenated;
every stochastic layer's, concatenated. For encoding the code is chosen deterministically (each
unit set to its more probable value given the units before it), so an item always gets the same
features; training and evaluation sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.base import Encoder, EncoderConfig, register
from encoders.corpus import Components, Corpus, ImageCorpus


@dataclass
class DARNConfig(EncoderConfig):
    layers: tuple[int, ...] = (200,)  # stochastic binary units per hidden layer, nearest the image first
    deterministic_hidden: int = 0  # width of a tanh layer inside every conditional's input path; 0 = linear
    autoregressive_encoder: bool = True
    binarize: Literal["threshold", "sample"] = "threshold"
    features: Literal["probs", "codes", "both"] = "probs"
    baseline_hidden: int = 100  # NVIL's input-dependent baseline: one tanh layer
    signal_momentum: float = 0.8  # running mean/variance of the learning signal (NVIL's alpha)
    variance_reduction: bool = True  # False: plain REINFORCE with the raw signal (an ablation)
    eval_samples: int = 20  # samples of h per image for the importance-sampled NLL
    batch_size: int = 100
    lr: float = 3e-4


class AutoregressiveBernoulli(nn.Module):
    """``p(v | u) = prod_k Bernoulli(v_k; sigmoid(b_k + W_k u + sum_{j<k} A_kj v_j))``.

    ``v`` ``(batch, n_units)`` binary, ``u`` ``(batch, n_cond)`` the conditioning layer (none for a
    top-level prior). ``A`` is masked strictly lower-triangular, so unit ``k`` never sees units
    ``>= k``; without ``autoregressive`` the units are independent given ``u``. With ``hidden > 0``
    the term ``W u`` becomes ``W_2 tanh(W_1 u + b_1)`` (a deterministic hidden layer of that width).
    """

    def __init__(self, n_units: int, n_cond: int, autoregressive: bool = True, hidden: int = 0) -> None:
        super().__init__()
        self.n_units = n_units
        self.bias = nn.Parameter(torch.zeros(n_units))
        self.cond = _conditioning(n_cond, n_units, hidden) if n_cond else None
        self.autoregressive = autoregressive
        if autoregressive:
            self.lateral = nn.Parameter(torch.zeros(n_units, n_units))
            self.register_buffer("mask", torch.tril(torch.ones(n_units, n_units), diagonal=-1))

    def _context(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``(batch, n_units)`` logits before the autoregressive term."""
        base = self.bias.expand(batch, -1)
        return base + self.cond(cond) if self.cond is not None else base

    def _lateral(self) -> torch.Tensor:
        return self.lateral * self.mask

    def logits(self, v: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, n_units)`` logits of every unit given the units before it (teacher forcing)."""
        logits = self._context(cond, v.shape[0])
        return logits + v @ self._lateral().T if self.autoregressive else logits

    def log_prob(self, v: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch,)`` log-probability of the binary ``v``."""
        return -F.binary_cross_entropy_with_logits(self.logits(v, cond), v, reduction="none").sum(-1)

    def sample(
        self, cond: torch.Tensor | None, batch: int, generator: torch.Generator | None = None, greedy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``v`` unit by unit; ``greedy`` takes each unit's more probable value instead.

        Returns ``(v, probs)``, both ``(batch, n_units)``; ``probs[:, k] = p(v_k = 1 | v_<k, u)``.
        """
        logits = self._context(cond, batch).detach().clone()
        if not self.autoregressive:
            probs = torch.sigmoid(logits)
            return _draw(probs, generator, greedy), probs
        lateral = self._lateral().detach()
        v = torch.zeros_like(logits)
        probs = torch.zeros_like(logits)
        for k in range(self.n_units):  # inherently sequential: unit k depends on units < k
            probs[:, k] = torch.sigmoid(logits[:, k])
            v[:, k] = _draw(probs[:, k], generator, greedy)
            logits += v[:, k : k + 1] * lateral[:, k]  # add unit k's contribution to every later unit
        return v, probs


def _conditioning(n_cond: int, n_units: int, hidden: int) -> nn.Module:
    """``(batch, n_cond) -> (batch, n_units)``: linear, or through a tanh layer of width ``hidden``."""
    if hidden < 0:
        raise ValueError(f"darn: deterministic_hidden must be >= 0, got {hidden}")
    if hidden == 0:
        return nn.Linear(n_cond, n_units, bias=False)  # the layer's own bias is AutoregressiveBernoulli.bias
    return nn.Sequential(nn.Linear(n_cond, hidden), nn.Tanh(), nn.Linear(hidden, n_units, bias=False))


def _draw(probs: torch.Tensor, generator: torch.Generator | None, greedy: bool) -> torch.Tensor:
    if greedy:
        return (probs > 0.5).to(probs.dtype)
    return (torch.rand(probs.shape, generator=generator, dtype=probs.dtype) < probs).to(probs.dtype)


class LearningSignal(nn.Module):
    """NVIL's centring and normalisation of the score-function learning signal.

    ``forward(signal, baseline)`` with ``(batch,)`` tensors: in training mode first updates the
    running mean ``c`` and variance ``v`` of ``signal - baseline`` (exponential, ``momentum``;
    the first batch initialises them), then returns ``(signal - baseline - c) / max(1, sqrt(v))``.
    """

    def __init__(self, momentum: float = 0.8) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, signal: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        centred = signal - baseline
        if self.training:
            alpha = 0.0 if int(self.updates) == 0 else self.momentum
            self.mean.mul_(alpha).add_((1 - alpha) * centred.mean())
            self.var.mul_(alpha).add_((1 - alpha) * centred.var(unbiased=False))
            self.updates += 1
        return (centred - self.mean) / self.var.sqrt().clamp(min=1.0)


class DARNModule(nn.Module):
    """The generative stack, the encoder stack, the baseline and the signal statistics."""

    def __init__(self, n_pixels: int, config: DARNConfig) -> None:
        super().__init__()
        sizes, hidden = [n_pixels, *config.layers], config.deterministic_hidden
        # decoder[l]: p(layer l | layer l+1); layer 0 is the image. prior: p(top layer).
        self.decoder = nn.ModuleList(
            AutoregressiveBernoulli(sizes[i], sizes[i + 1], hidden=hidden) for i in range(len(sizes) - 1)
        )
        self.prior = AutoregressiveBernoulli(sizes[-1], 0)
        self.encoder = nn.ModuleList(
            AutoregressiveBernoulli(sizes[i + 1], sizes[i], config.autoregressive_encoder, hidden)
            for i in range(len(sizes) - 1)
        )
        self.baseline = nn.Sequential(nn.Linear(n_pixels, config.baseline_hidden), nn.Tanh(),
                                      nn.Linear(config.baseline_hidden, 1))
        self.signal = LearningSignal(config.signal_momentum)

    def infer(
        self, x: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Sample ``h^1 .. h^L ~ q(h | x)``: per layer codes and probabilities ``(batch, units)``."""
        codes, probs, below = [], [], x
        for layer in self.encoder:
            code, prob = layer.sample(below, x.shape[0], generator, greedy)
            codes.append(code)
            probs.append(prob)
            below = code
        return codes, probs

    def log_q(self, x: torch.Tensor, codes: list[torch.Tensor]) -> torch.Tensor:
        """``(batch,)`` ``log q(h | x)`` of given codes (differentiable in the encoder)."""
        below = [x, *codes[:-1]]
        return sum(layer.log_prob(code, cond) for layer, code, cond in zip(self.encoder, codes, below, strict=True))

    def log_joint(self, x: torch.Tensor, codes: list[torch.Tensor]) -> torch.Tensor:
        """``(batch,)`` ``log p(x, h)`` (differentiable in the generative parameters)."""
        layers = [x, *codes]
        terms = [layer.log_prob(layers[i], layers[i + 1]) for i, layer in enumerate(self.decoder)]
        return self.prior.log_prob(codes[-1]) + sum(terms)

    def elbo_samples(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(batch,)`` ``log p(x, h) - log q(h | x)`` for one sampled ``h`` per row."""
        codes, _ = self.infer(x, generator)
        return self.log_joint(x, codes) - self.log_q(x, codes)


@register("darn")
class DARNEncoder(Encoder):
    """DARN on binarised images; components are one code/probability vector per image."""

    modality = "frames"
    config_class = DARNConfig
    config: DARNConfig
    test_overrides = {"layers": (8,), "baseline_hidden": 8, "eval_samples": 4}

    @property
    def output_dim(self) -> int:
        return sum(self.config.layers) * (2 if self.config.features == "both" else 1)

    def _build(self, corpus: Corpus) -> nn.Module:
        if not isinstance(corpus, ImageCorpus):
            raise TypeError(f"darn trains on images, got a {type(corpus).__name__}")
        if not self.config.layers or min(self.config.layers) < 1:
            raise ValueError(f"darn: layers must be one or more positive sizes, got {self.config.layers}")
        self.extra = {"image_shape": list(corpus.image_shape)}
        return self._build_from_extra()

    def _build_from_extra(self) -> nn.Module:
        return DARNModule(int(np.prod(self.extra["image_shape"])), self.config)

    def binarize(self, corpus: ImageCorpus) -> torch.Tensor:
        """``(n_images, channels * height * width)`` float 0/1 pixels."""
        return torch.from_numpy(binarize_images(corpus.images, self.config.binarize, self.config.seed))

    def _batches(self, corpus: Corpus, rng: np.random.Generator) -> Iterator[torch.Tensor]:
        x = self.binarize(corpus)  # type: ignore[arg-type]
        order = torch.from_numpy(rng.permutation(x.shape[0]))
        for start in range(0, x.shape[0], self.config.batch_size):
            yield x[order[start : start + self.config.batch_size]].to(self.device)

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        module: DARNModule = self._require_module()  # type: ignore[assignment]
        codes, _ = module.infer(batch)
        log_joint = module.log_joint(batch, codes)
        log_q = module.log_q(batch, codes)
        elbo = (log_joint - log_q).detach()
        baseline = module.baseline(batch).squeeze(-1)
        signal = module.signal(elbo, baseline.detach()) if self.config.variance_reduction else elbo
        # Baseline regresses onto the signal left after the running mean (NVIL's least squares).
        baseline_loss = (elbo - module.signal.mean - baseline).pow(2).mean()
        surrogate = -(log_joint + signal * log_q).mean() + baseline_loss
        return surrogate, {
            "loss": float(-elbo.mean()),  # the description-length bound, nats per image
            "baseline_mse": float(baseline_loss.detach()),
            "signal_std": float(module.signal.var.sqrt()),
        }

    def _encode(self, corpus: Corpus) -> Components:
        module: DARNModule = self._require_module()  # type: ignore[assignment]
        x = self.binarize(corpus)  # type: ignore[arg-type]
        chunks = []
        for start in range(0, x.shape[0], 1024):
            codes, probs = module.infer(x[start : start + 1024].to(self.device), greedy=True)
            parts = {"codes": codes, "probs": probs, "both": [*probs, *codes]}[self.config.features]
            chunks.append(torch.cat(parts, dim=1).cpu())
        matrix = torch.cat(chunks) if chunks else torch.zeros(0, self.output_dim)
        return Components(matrix.numpy(), corpus.offsets, corpus.item_ids)

    @torch.no_grad()
    def evaluate(self, corpus: Corpus) -> dict[str, float]:
        """Held-out ``nll_bound_nats`` (mean bound over ``eval_samples`` draws) and ``nll_is_nats``.

        ``nll_is_nats`` is the importance-sampled ``-log (1/S) sum_s p(x, h_s) / q(h_s | x)``
        over the same ``S = eval_samples`` draws: never above the bound, and tighter as ``S`` grows.
        Both in nats per image; seeded, so repeatable.
        """
        module: DARNModule = self._require_module()  # type: ignore[assignment]
        was_training = module.training
        module.eval()
        x = self.binarize(corpus)  # type: ignore[arg-type]
        samples = max(1, self.config.eval_samples)
        generator = torch.Generator().manual_seed(self.config.seed)
        bound, importance = [], []
        rows = max(1, 4096 // samples)
        for start in range(0, x.shape[0], rows):
            chunk = x[start : start + rows].to(self.device)
            weights = module.elbo_samples(chunk.repeat(samples, 1), generator).view(samples, -1)  # (S, batch)
            bound.append(-weights.mean(0))
            importance.append(-(torch.logsumexp(weights, 0) - math.log(samples)))
        module.train(was_training)
        n_pixels = x.shape[1]
        nll = torch.cat(bound).mean().item() if bound else float("nan")
        nll_is = torch.cat(importance).mean().item() if importance else float("nan")
        return {"nll_bound_nats": nll, "nll_is_nats": nll_is, "bits_per_pixel": nll_is / (n_pixels * math.log(2))}


def binarize_images(images: np.ndarray, how: str, seed: int) -> np.ndarray:
    """``(n, c, h, w)`` uint8 -> ``(n, c*h*w)`` float32 0/1.

    ``"threshold"``: pixel >= 128. ``"sample"``: pixel on with probability ``pixel / 255``, the
    uniform draw per pixel a hash of (seed, the image's pixels, the pixel position), so the
    same image always gets the same binarisation whatever corpus it is in.
    """
    flat = np.asarray(images).reshape(len(images), -1)
    if how == "threshold":
        return (flat >= 128).astype(np.float32)
    if how != "sample":
        raise ValueError(f"binarize must be 'threshold' or 'sample', got {how!r}")
    with np.errstate(over="ignore"):
        weights = _mix(np.arange(1, flat.shape[1] + 1, dtype=np.uint64) + np.uint64(seed))
        image_key = _mix((flat.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64))  # (n,)
        uniform = _mix(image_key[:, None] ^ weights[None, :]) >> np.uint64(11)
    return (uniform.astype(np.float64) / float(1 << 53) < flat / 255.0).astype(np.float32)


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-mixed uint64 hash of every entry (wrapping arithmetic)."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
