"""Neural Statistician (Edwards and Storkey 2017): a VAE over *sets*.

A data set ``D = {x_1 .. x_n}`` has one context ``c`` and every element its own latent ``z_i``::

    p(D) = int p(c) prod_i int p(x_i | z_i, c) p(z_i | c) dz_i dc,   p(c) = N(0, I)

* statistic network ``q(c | D)``: a shared element encoder ``e(x_i)``, **mean-pooled** over the
  set, then a post-pooling MLP to a diagonal Gaussian;
* inference network ``q(z_i | x_i, c)`` and latent decoder ``p(z_i | c)``: diagonal Gaussians;
* observation decoder ``p(x_i | z_i, c)``: Bernoulli (binarised images) or diagonal Gaussian with a
  learned per-dimension scale (vectors).

Trained on the dataset-level bound (reparameterised ``c`` and ``z``, one sample each)::

    -L(D) = sum_i [ -E log p(x_i | z_i, c) + KL(q(z_i | x_i, c) || p(z_i | c)) ] + KL(q(c | D) || p(c))

(one ``KL(c)`` per set, whatever its size). One ``z`` layer (the paper stacks several for its
larger experiments) and MLPs throughout (the paper's image experiments use conv nets).

Used twice in acfrec:

* :class:`NeuralStatisticianEncoder` (``"neural-statistician"``, modality ``frames``): an item is
  the set of its frames/images. ``features="context"`` (default) gives **one component per
  item**, the mean of ``q(c | frames)``: an item-level content vector (items without frames get
  none). ``features="frames"`` gives one component per frame instead, the mean of
  ``q(z_i | x_i, c)`` with ``c`` at its mean.
* :class:`SetProfiler`: a user as the set of the item vectors they consumed (Gaussian decoder)
  -> a content profile, useful for users with few interactions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.base import ENCODER_FORMAT_VERSION, Encoder, EncoderConfig, _atomic_dir, register
from encoders.corpus import Components, Corpus, ImageCorpus
from encoders.darn import binarize_images

_LOG_2PI = float(np.log(2 * np.pi))


def _mlp(n_in: int, hidden: int, n_out: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(n_in, hidden), nn.ELU()]
        n_in = hidden
    return nn.Sequential(*layers, nn.Linear(n_in, n_out))


def _gaussian(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., 2 * dim)`` -> mean and log-variance ``(..., dim)`` (log-variance kept in a sane range)."""
    mean, logvar = params.chunk(2, dim=-1)
    return mean, logvar.clamp(-10.0, 8.0)


def _sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + (0.5 * logvar).exp() * noise


def gaussian_kl(mean_q: torch.Tensor, logvar_q: torch.Tensor, mean_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean_q, var_q) || N(mean_p, var_p))`` summed over the last dimension."""
    ratio = (logvar_q - logvar_p).exp()
    return 0.5 * (ratio + (mean_q - mean_p).pow(2) / logvar_p.exp() - 1.0 - (logvar_q - logvar_p)).sum(-1)


class NeuralStatistician(nn.Module):
    """The networks of the Neural Statistician over sets of ``n_in``-vectors.

    Sets arrive padded: ``x`` ``(n_sets, set_size, n_in)`` with ``mask`` ``(n_sets, set_size)``
    bool (True for a real element); padding never influences any output.
    ``shift``/``scale`` standardise Gaussian inputs (set by :class:`SetProfiler`).
    """

    def __init__(self, n_in: int, hidden: int, context_dim: int, latent_dim: int,
                 likelihood: Literal["bernoulli", "gaussian"] = "bernoulli") -> None:
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        self.likelihood = likelihood
        self.embed = nn.Sequential(_mlp(n_in, hidden, hidden), nn.ELU())
        self.statistic = _mlp(hidden, hidden, 2 * context_dim)
        self.posterior_z = _mlp(hidden + context_dim, hidden, 2 * latent_dim)
        self.prior_z = _mlp(context_dim, hidden, 2 * latent_dim)
        self.decoder = _mlp(latent_dim + context_dim, hidden, n_in, depth=3)
        self.log_scale = nn.Parameter(torch.zeros(n_in)) if likelihood == "gaussian" else None
        self.register_buffer("shift", torch.zeros(n_in))
        self.register_buffer("scale", torch.ones(n_in))

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale

    def context(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(c | D)``: mean and log-variance ``(n_sets, context_dim)``."""
        return self._context(self.embed(self._standardise(x)), mask)

    def _context(self, embedded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = mask.unsqueeze(-1).to(embedded.dtype)
        pooled = (embedded * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean over real elements
        return _gaussian(self.statistic(pooled))

    def latent(self, embedded: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z_i | x_i, c)``: ``(n_sets, set_size, latent_dim)`` mean and log-variance."""
        context = c.unsqueeze(1).expand(-1, embedded.shape[1], -1)
        return _gaussian(self.posterior_z(torch.cat([embedded, context], -1)))

    def frame_latents(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of ``q(z_i | x_i, c)`` with ``c`` at the mean of ``q(c | D)``: ``(n_sets, set_size, latent_dim)``."""
        embedded = self.embed(self._standardise(x))
        c_mean, _ = self._context(embedded, mask)
        return self.latent(embedded, c_mean)[0]

    def bound_terms(self, x: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
                    ) -> dict[str, torch.Tensor]:
        """The dataset-level bound's terms per set, each ``(n_sets,)`` nats.

        ``reconstruction`` = sum over elements of ``-log p(x_i | z_i, c)``, ``kl_z`` = sum over
        elements of ``KL(q(z_i | x_i, c) || p(z_i | c))``, ``kl_c`` = ``KL(q(c | D) || N(0, I))``
        once per set; ``neg_bound`` = their sum.
        """
        weights = mask.to(x.dtype)
        embedded = self.embed(self._standardise(x))
        c_mean, c_logvar = self._context(embedded, mask)
        c = _sample(c_mean, c_logvar, generator)
        z_mean, z_logvar = self.latent(embedded, c)
        z = _sample(z_mean, z_logvar, generator)
        p_mean, p_logvar = _gaussian(self.prior_z(c))
        kl_z = gaussian_kl(z_mean, z_logvar, p_mean.unsqueeze(1), p_logvar.unsqueeze(1))
        out = self.decoder(torch.cat([z, c.unsqueeze(1).expand(-1, x.shape[1], -1)], -1))
        reconstruction = self._neg_log_likelihood(x, out)
        kl_c = gaussian_kl(c_mean, c_logvar, torch.zeros_like(c_mean), torch.zeros_like(c_logvar))
        terms = {
            "reconstruction": (reconstruction * weights).sum(1),
            "kl_z": (kl_z * weights).sum(1),
            "kl_c": kl_c,
        }
        terms["neg_bound"] = terms["reconstruction"] + terms["kl_z"] + terms["kl_c"]
        return terms

    def _neg_log_likelihood(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``(n_sets, set_size)`` ``-log p(x_i | z_i, c)`` (Gaussian: in the original units of ``x``)."""
        if self.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        mean = out * self.scale + self.shift
        log_scale = self.log_scale + self.scale.log()
        squared = ((x - mean) / log_scale.exp()).pow(2)
        return 0.5 * (squared + 2 * log_scale + _LOG_2PI).sum(-1)


def pad_sets(offsets: np.ndarray, sets: np.ndarray, max_size: int | None = None,
             rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the elements of each chosen set, padded: ``(len(sets), width)`` indices and mask.

    Set ``s`` owns rows ``offsets[s]:offsets[s+1]``. With ``max_size`` a set keeps at most that
    many elements: a uniformly random choice with ``rng``, its first ones without. Padding
    entries point at row 0 and are False in the mask.
    """
    starts, counts = offsets[sets], offsets[sets + 1] - offsets[sets]
    longest = int(counts.max(initial=0))
    width = max(1, min(longest, max_size) if max_size else longest)
    if rng is not None and max_size and longest > max_size:
        # A random permutation of each set's positions: sort random keys, padding keys last.
        keys = np.where(np.arange(longest) < counts[:, None], rng.random((sets.size, longest)), np.inf)
        positions = np.argsort(keys, axis=1)[:, :width]
    else:
        positions = np.broadcast_to(np.arange(width), (sets.size, width))
    mask = np.arange(width) < np.minimum(counts, width)[:, None]  # real elements come first in each row
    return np.where(mask, starts[:, None] + positions, 0), mask


@dataclass
class NeuralStatisticianConfig(EncoderConfig):
    hidden: int = 256
    context_dim: int = 32
    latent_dim: int = 16
    max_set_size: int = 16  # frames drawn per item per training step (all of them when encoding)
    features: Literal["context", "frames"] = "context"
    binarize: Literal["threshold", "sample"] = "threshold"
    batch_size: int = 32  # items (sets) per step


@register("neural-statistician")
class NeuralStatisticianEncoder(Encoder):
    """Items as sets of binarised frames; components = item context means (or per-frame latents)."""

    modality = "frames"
    config_class = NeuralStatisticianConfig
    config: NeuralStatisticianConfig
    test_overrides = {"hidden": 16, "context_dim": 4, "latent_dim": 3, "max_set_size": 2}

    @property
    def output_dim(self) -> int:
        return self.config.context_dim if self.config.features == "context" else self.config.latent_dim

    def _build(self, corpus: Corpus) -> nn.Module:
        if not isinstance(corpus, ImageCorpus):
            raise TypeError(f"neural-statistician trains on images (sets of frames), got a {type(corpus).__name__}")
        self.extra = {"image_shape": list(corpus.image_shape)}
        return self._build_from_extra()

    def _build_from_extra(self) -> nn.Module:
        config = self.config
        return NeuralStatistician(int(np.prod(self.extra["image_shape"])), config.hidden, config.context_dim,
                                  config.latent_dim, "bernoulli")

    def _sets(self, corpus: ImageCorpus, items: np.ndarray, x: torch.Tensor, max_size: int | None = None,
              rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(len(items), width, n_pixels)`` padded frames and ``(len(items), width)`` mask."""
        rows, mask = pad_sets(corpus.offsets, items, max_size, rng)
        return x[torch.from_numpy(rows)].to(self.device), torch.from_numpy(mask).to(self.device)

    def _with_frames(self, corpus: ImageCorpus) -> np.ndarray:
        return np.flatnonzero(np.diff(corpus.offsets) > 0)

    def _batches(self, corpus: Corpus, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.from_numpy(binarize_images(corpus.images, self.config.binarize, self.config.seed))  # type: ignore[union-attr]
        items = rng.permutation(self._with_frames(corpus))  # type: ignore[arg-type]
        for start in range(0, items.size, self.config.batch_size):
            yield self._sets(corpus, items[start : start + self.config.batch_size], x,  # type: ignore[arg-type]
                             self.config.max_set_size, rng)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        module: NeuralStatistician = self._require_module()  # type: ignore[assignment]
        x, mask = batch
        terms = module.bound_terms(x, mask)
        elements = mask.sum()
        loss = terms["neg_bound"].sum() / elements  # per frame, so the step size does not depend on set sizes
        return loss, {"kl_c": float(terms["kl_c"].detach().mean()),
                      "kl_z_per_frame": float(terms["kl_z"].detach().sum() / elements)}

    def _chunks(self, corpus: ImageCorpus, items: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """All frames of ``items``, 64 sets at a time: ``(items, x, mask)``."""
        x = torch.from_numpy(binarize_images(corpus.images, self.config.binarize, self.config.seed))
        for start in range(0, items.size, 64):
            chunk = items[start : start + 64]
            yield (chunk, *self._sets(corpus, chunk, x))

    def _encode(self, corpus: Corpus) -> Components:
        module: NeuralStatistician = self._require_module()  # type: ignore[assignment]
        corpus_images: ImageCorpus = corpus  # type: ignore[assignment]
        items = self._with_frames(corpus_images)
        vectors = []
        for _, x, mask in self._chunks(corpus_images, items):
            if self.config.features == "context":
                vectors.append(module.context(x, mask)[0])
            else:
                vectors.append(module.frame_latents(x, mask)[mask])
        matrix = torch.cat(vectors).cpu().numpy() if vectors else np.zeros((0, self.output_dim), np.float32)
        if self.config.features == "frames":
            return Components(matrix, corpus_images.offsets, corpus_images.item_ids)
        has_frames = (np.diff(corpus_images.offsets) > 0).astype(np.int64)
        return Components(matrix, np.concatenate([[0], np.cumsum(has_frames)]), corpus_images.item_ids)

    @torch.no_grad()
    def evaluate(self, corpus: Corpus) -> dict[str, float]:
        """Held-out bound with all of each item's frames (one seeded sample of ``c`` and ``z``).

        ``nll_bound_nats``: nats per frame (comparable across set sizes); ``nll_bound_nats_per_set``,
        ``kl_c`` (per set) and ``kl_z`` (per frame) break it down.
        """
        module: NeuralStatistician = self._require_module()  # type: ignore[assignment]
        was_training = module.training
        module.eval()
        generator = torch.Generator().manual_seed(self.config.seed)
        totals = {"neg_bound": 0.0, "kl_c": 0.0, "kl_z": 0.0}
        items = self._with_frames(corpus)  # type: ignore[arg-type]
        for _, x, mask in self._chunks(corpus, items):  # type: ignore[arg-type]
            terms = module.bound_terms(x, mask, generator)
            for key in totals:
                totals[key] += float(terms[key].sum())
        module.train(was_training)
        frames = max(int(np.diff(corpus.offsets).sum()), 1)
        sets = max(items.size, 1)
        return {
            "nll_bound_nats": totals["neg_bound"] / frames,
            "nll_bound_nats_per_set": totals["neg_bound"] / sets,
            "kl_c": totals["kl_c"] / sets,
            "kl_z": totals["kl_z"] / frames,
        }


class SetProfiler:
    """A user's content profile from the set of item vectors they consumed.

    A :class:`NeuralStatistician` with a Gaussian observation decoder, fitted on a list of sets
    (one ``(n_items_of_user, dim)`` array per user); :meth:`profile` gives the mean of
    ``q(c | set)`` ``(n_sets, context_dim)``, a vector that exists even for a user with one or
    two interactions and that the context prior keeps near zero when the evidence is thin.

    >>> profiler = SetProfiler(context_dim=8).fit([items[h] for h in histories])
    >>> profiles = profiler.profile([items[h] for h in new_histories])
    >>> profiler.save("runs/profiler"); SetProfiler.load("runs/profiler")
    """

    OPTIONS: ClassVar[tuple[str, ...]] = ("hidden", "context_dim", "latent_dim", "epochs", "batch_size", "lr",
                                          "max_set_size", "seed")
    KIND: ClassVar[str] = "set-profiler"

    def __init__(self, hidden: int = 64, context_dim: int = 8, latent_dim: int = 4, epochs: int = 50,
                 batch_size: int = 32, lr: float = 1e-3, max_set_size: int = 32, seed: int = 0) -> None:
        self.hidden, self.context_dim, self.latent_dim = hidden, context_dim, latent_dim
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.max_set_size, self.seed = max_set_size, seed
        self.module: NeuralStatistician | None = None
        self.history: list[float] = []

    @staticmethod
    def _ragged(sets: Sequence[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """``(n_vectors_total, dim)`` float32 and ``(n_sets + 1,)`` offsets; checks the shapes."""
        arrays = [np.asarray(s, dtype=np.float32) for s in sets]
        dims = {a.shape[1] for a in arrays if a.ndim == 2}
        bad = next((k for k, a in enumerate(arrays) if a.ndim != 2 or a.shape[0] == 0), None)
        if not arrays or bad is not None or len(dims) != 1:
            where = f"set {bad} has shape {arrays[bad].shape}" if bad is not None else f"dims {sorted(dims)}"
            raise ValueError(f"SetProfiler needs non-empty (n_i, dim) arrays of one dim; {where}")
        offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int64)
        return torch.from_numpy(np.concatenate(arrays)), offsets

    def fit(self, sets: Sequence[np.ndarray]) -> SetProfiler:
        """Train on the dataset-level bound (Adam, seeded shuffling; per-vector loss scale)."""
        x, offsets = self._ragged(sets)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        module = NeuralStatistician(x.shape[1], self.hidden, self.context_dim, self.latent_dim, "gaussian")
        module.shift.copy_(x.mean(0))
        module.scale.copy_(x.std(0).clamp(min=1e-6))
        optimizer = torch.optim.Adam(module.parameters(), lr=self.lr)
        n_sets = offsets.size - 1
        for _ in range(self.epochs):
            order = rng.permutation(n_sets)
            total = 0.0
            for start in range(0, n_sets, self.batch_size):
                rows, mask = pad_sets(offsets, order[start : start + self.batch_size], self.max_set_size, rng)
                mask_t = torch.from_numpy(mask)
                loss = module.bound_terms(x[torch.from_numpy(rows)], mask_t)["neg_bound"].sum() / mask_t.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * mask.shape[0]
            self.history.append(total / n_sets)
        self.module = module.eval()
        return self

    @torch.no_grad()
    def profile(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        """``(n_sets, context_dim)`` float32: the mean of ``q(c | set)`` of every set."""
        if self.module is None:
            raise RuntimeError("SetProfiler is not fitted: call fit() first")
        x, offsets = self._ragged(sets)
        if x.shape[1] != self.module.shift.numel():
            raise ValueError(f"SetProfiler was fitted on vectors of dim {self.module.shift.numel()}, got dim {x.shape[1]}")
        rows, mask = pad_sets(offsets, np.arange(offsets.size - 1))
        return self.module.context(x[torch.from_numpy(rows)], torch.from_numpy(mask))[0].numpy()

    def save(self, path: str | Path) -> Path:
        """Folder ``path`` (atomic): ``meta.json`` (options, input dim, history, version), ``state.pt``."""
        if self.module is None:
            raise RuntimeError("SetProfiler is not fitted: call fit() first")
        path = Path(path)
        meta = {
            "format_version": ENCODER_FORMAT_VERSION,
            "kind": self.KIND,
            "options": {name: getattr(self, name) for name in self.OPTIONS},
            "n_in": int(self.module.shift.numel()),
            "history": self.history,
        }
        with _atomic_dir(path) as tmp:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            torch.save(self.module.state_dict(), tmp / "state.pt")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SetProfiler:
        """A profiler saved by :meth:`save`; its profiles equal the saved one's."""
        meta_file = Path(path) / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved SetProfiler: meta.json is missing")
        meta = json.loads(meta_file.read_text())
        if meta.get("kind") != cls.KIND or meta.get("format_version") != ENCODER_FORMAT_VERSION:
            raise ValueError(f"{meta_file}: not a SetProfiler of format {ENCODER_FORMAT_VERSION} "
                             f"(kind {meta.get('kind')!r}, format_version {meta.get('format_version')!r})")
        profiler = cls(**meta["options"])
        profiler.history = list(meta["history"])
        module = NeuralStatistician(meta["n_in"], profiler.hidden, profiler.context_dim, profiler.latent_dim, "gaussian")
        module.load_state_dict(torch.load(Path(path) / "state.pt", weights_only=True))
        profiler.module = module.eval()
        return profiler
