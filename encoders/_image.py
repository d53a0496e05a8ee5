"""Shared pieces of the image encoders: pixel preparation, masked convolutions, the discrete
output head, region pooling and the training/encoding plumbing of autoregressive image models.

Colour images follow the PixelRNN/PixelCNN channel order (R before G before B): every feature
map's channels are split into ``n_colors`` *interleaved* groups (channel ``k`` belongs to colour
``k % n_colors``), so that splitting a map into gate halves or LSTM gates keeps groups aligned.
At the current pixel, a mask-A layer lets colour ``c`` see only colours ``< c``; mask B also
``c`` itself. For one-channel images this is the familiar "centre off / centre on" rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.base import Encoder, EncoderConfig, modality_from_config
from encoders.corpus import Components, Corpus, ImageCorpus

OUTPUTS = ("bernoulli", "softmax256")
COMPONENT_KINDS = ("regions", "frames")


# ---------------------------------------------------------------------------- pixels
def binarize(images: np.ndarray | torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """``(n, c, h, w)`` uint8 -> float {0, 1}: a pixel is on when ``>= threshold``."""
    return (torch.as_tensor(np.asarray(images)) >= threshold).float()


def sample_binarized(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Stochastic binarisation: pixel on with probability ``value / 255``, one fixed sample per
    image (``seed``), returned as uint8 {0, 255} so that :func:`binarize` keeps it unchanged."""
    rng = np.random.default_rng(seed)
    on = rng.random(images.shape) < images.astype(np.float64) / 255.0
    return (on * 255).astype(np.uint8)


def model_inputs(images: np.ndarray, output: str, threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input and target of a batch ``(n, c, h, w)`` uint8.

    Bernoulli: both the binarised image (float {0,1}). 256-way softmax: input ``pixels / 255``
    (float), target the pixel values (int64 0..255).
    """
    if output == "bernoulli":
        x = binarize(images, threshold)
        return x, x
    target = torch.as_tensor(np.asarray(images)).long()
    return target.float() / 255.0, target


def check_output(output: str, components: str, grid: Any) -> tuple[int, int]:
    """Validate the shared options; returns ``grid`` as a ``(rows, cols)`` tuple."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if components not in COMPONENT_KINDS:
        raise ValueError(f"components must be one of {COMPONENT_KINDS}, got {components!r}")
    grid = tuple(int(g) for g in grid)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be two positive ints (rows, cols), got {grid}")
    return grid  # type: ignore[return-value]


def require_images(corpus: Corpus | None, who: str) -> ImageCorpus:
    if not isinstance(corpus, ImageCorpus):
        raise TypeError(f"{who} encodes images: expected an ImageCorpus, got {type(corpus).__name__}")
    if corpus.images.shape[0] == 0:
        raise ValueError(f"{who}: the corpus holds no images")
    return corpus


# ---------------------------------------------------------------------------- masked convolution
def colour_groups(n_channels: int, n_colors: int) -> torch.Tensor:
    """``(n_channels,)`` colour group of each channel (interleaved: ``k % n_colors``)."""
    return torch.arange(n_channels) % n_colors


class MaskedConv2d(nn.Conv2d):
    """Convolution that sees only pixels before the centre in raster order, and at the centre only
    earlier colours (mask ``"A"``) or earlier-or-same colours (mask ``"B"``).

    Kernel ``(kh, kw)`` odd sizes, "same" padding: ``(n, in, h, w) -> (n, out, h, w)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], mask_type: str, n_colors: int = 1
    ) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"masked convolution kernels must have odd sizes, got {(kh, kw)}")
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2))
        mask = torch.ones(out_channels, in_channels, kh, kw)
        mask[:, :, kh // 2, kw // 2 :] = 0  # the centre and everything right of it ...
        mask[:, :, kh // 2 + 1 :] = 0  # ... and every row below
        out_group = colour_groups(out_channels, n_colors)[:, None]
        in_group = colour_groups(in_channels, n_colors)[None, :]
        centre = in_group < out_group if mask_type == "A" else in_group <= out_group
        mask[:, :, kh // 2, kw // 2] = centre.float()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class DiscreteHead(nn.Module):
    """The output layers of both papers: ReLU, 1x1 mask-B conv, ReLU, 1x1 mask-B conv to logits.

    ``(n, channels, h, w) -> logits``: Bernoulli ``(n, colors, h, w)``; softmax
    ``(n, 256, colors, h, w)``.
    """

    def __init__(self, channels: int, head_channels: int, n_colors: int, output: str) -> None:
        super().__init__()
        self.output, self.n_colors = output, n_colors
        n_out = n_colors if output == "bernoulli" else 256 * n_colors
        self.hidden = MaskedConv2d(channels, head_channels, 1, "B", n_colors)
        self.logits = MaskedConv2d(head_channels, n_out, 1, "B", n_colors)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.logits(F.relu(self.hidden(F.relu(features))))
        if self.output == "bernoulli":
            return logits
        n, _, h, w = logits.shape  # channel v * n_colors + c is value v of colour c
        return logits.view(n, 256, self.n_colors, h, w)

    def nll(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(n,)`` negative log-likelihood of each image in nats."""
        if self.output == "bernoulli":
            return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)
        return F.cross_entropy(logits, target, reduction="none").flatten(1).sum(1)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """``(n, c, H, W)``: every row moved one down (zeros in row 0), so row ``i`` holds row ``i - 1``."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


FIRST_KERNEL = 7  # both papers' 7x7 mask-A first layer


class MaskedStack(nn.Module):
    """7x7 mask-A convolution to ``2h`` channels, then ``blocks`` (each ``(n, 2h, H, W)`` to the
    same, residual inside): ``(n, colors, H, W) -> (n, 2h, H, W)``."""

    def __init__(self, n_colors: int, hidden: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.first = MaskedConv2d(n_colors, 2 * hidden, FIRST_KERNEL, "A", n_colors)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.first(x))


class AutoregressiveNet(nn.Module):
    """``body`` (image -> causal feature map ``(n, channels, h, w)``) followed by the head."""

    def __init__(self, body: nn.Module, head: DiscreteHead) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, colors, h, w)`` -> (logits, features ``(n, channels, h, w)``)."""
        features = self.body(x)
        return self.head(features), features


# ---------------------------------------------------------------------------- components
def pool_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(n, dim, h, w)`` -> ``(n, rows * cols, dim)``: average of each grid cell, row-major."""
    pooled = F.adaptive_avg_pool2d(features, grid)
    return pooled.flatten(2).transpose(1, 2)


def image_chunks(n_images: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n_images, batch_size):
        yield np.arange(start, min(start + batch_size, n_images))


def encode_regions(
    corpus: ImageCorpus, feature_map: Callable[[np.ndarray], torch.Tensor], grid: tuple[int, int], batch_size: int
) -> Components:
    """Components of every item: each of its images gives ``rows * cols`` pooled region vectors.

    ``feature_map`` maps a uint8 batch ``(b, c, h, w)`` to ``(b, dim, h', w')``.
    """
    parts = [pool_grid(feature_map(corpus.images[rows]), grid).cpu() for rows in image_chunks(len(corpus.images), batch_size)]
    per_image = torch.cat(parts)  # (n_images, rows * cols, dim)
    matrix = per_image.reshape(-1, per_image.shape[-1]).numpy()
    return Components(matrix, corpus.offsets * per_image.shape[1], list(corpus.item_ids))


def component_modality(config: Any) -> str:
    """The modality a config's ``components`` gives: ``"frames"`` (a vector per image) or ``"image"`` (regions)."""
    return "frames" if config.components == "frames" else "image"


def component_grid(components: str, grid: tuple[int, int]) -> tuple[int, int]:
    """Regions: the configured grid; frames: one vector per image (a 1 x 1 grid)."""
    return (1, 1) if components == "frames" else grid


# ---------------------------------------------------------------------------- encoder base
@dataclass
class AutoregressiveImageConfig(EncoderConfig):
    """Options shared by PixelCNN and PixelRNN."""

    hidden: int = 16  # h of the papers: feature maps have 2h channels, LSTM states h
    n_layers: int = 4  # residual blocks / LSTM layers / gated layers after the first layer
    head_channels: int = 32  # width of the first 1x1 mask-B output layer
    output: str = "bernoulli"  # "bernoulli" (binarised images) or "softmax256" (256-way per colour)
    threshold: int = 128  # binarisation: a pixel is on when >= threshold (Bernoulli output)
    components: str = "regions"  # "regions": grid cells of each image; "frames": one vector per image
    grid: tuple[int, int] = (2, 2)  # (rows, cols) of region pooling


class AutoregressiveImageEncoder(Encoder):
    """Training, likelihood and encoding for models whose network is an :class:`AutoregressiveNet`.

    A subclass implements ``_body(n_colors) -> nn.Module`` mapping ``(n, colors, h, w)`` to a
    causal feature map ``(n, 2 * hidden, h, w)``. Components are that map pooled to the grid.
    """

    modality = modality_from_config(component_modality)  # type: ignore[assignment]
    config_class: ClassVar[type[EncoderConfig]] = AutoregressiveImageConfig
    config: AutoregressiveImageConfig

    def _body(self, n_colors: int) -> nn.Module:
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        return 2 * self.config.hidden

    def _build(self, corpus: Corpus) -> nn.Module:
        images = require_images(corpus, self.name)
        self.extra = {"image_shape": list(images.image_shape)}
        return self._build_from_extra()

    def _build_from_extra(self) -> nn.Module:
        cfg = self.config
        check_output(cfg.output, cfg.components, cfg.grid)
        n_colors = int(self.extra["image_shape"][0])
        if cfg.hidden % n_colors or cfg.head_channels % n_colors:
            raise ValueError(f"hidden ({cfg.hidden}) and head_channels ({cfg.head_channels}) must be multiples of {n_colors} colours")
        head = DiscreteHead(2 * cfg.hidden, cfg.head_channels, n_colors, cfg.output)
        return AutoregressiveNet(self._body(n_colors), head)

    def _check_shape(self, corpus: ImageCorpus) -> None:
        if list(corpus.image_shape) != self.extra["image_shape"]:
            raise ValueError(f"{self.name} was trained on images {self.extra['image_shape']}, got {list(corpus.image_shape)}")

    def _batches(self, corpus: Corpus, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images = require_images(corpus, self.name).images
        order = rng.permutation(len(images))
        for start in range(0, len(order), self.config.batch_size):
            x, target = model_inputs(images[order[start : start + self.config.batch_size]], self.config.output, self.config.threshold)
            yield x.to(self.device), target.to(self.device)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, target = batch
        net: AutoregressiveNet = self._require_module()  # type: ignore[assignment]
        logits, _ = net(x)
        nll = net.head.nll(logits, target).mean()
        return nll, {"nll_nats": float(nll.detach())}

    def nll_per_image(self, corpus: ImageCorpus) -> np.ndarray:
        """``(n_images,)`` negative log-likelihood in nats of every image of ``corpus``."""
        net: AutoregressiveNet = self._require_module()  # type: ignore[assignment]
        corpus = require_images(corpus, self.name)
        self._check_shape(corpus)
        parts = []
        with torch.no_grad():
            for rows in image_chunks(len(corpus.images), self.config.batch_size):
                x, target = model_inputs(corpus.images[rows], self.config.output, self.config.threshold)
                logits, _ = net(x.to(self.device))
                parts.append(net.head.nll(logits, target.to(self.device)).cpu())
        return torch.cat(parts).numpy()

    def evaluate(self, corpus: Corpus) -> dict[str, float]:
        """Held-out likelihood: mean NLL in nats per image and in bits per pixel dimension."""
        images = require_images(corpus, self.name)
        nll = float(self.nll_per_image(images).mean())
        return {"nll_nats": nll, "bits_per_dim": nll / (np.log(2) * int(np.prod(images.image_shape)))}

    def _encode(self, corpus: Corpus) -> Components:
        images = require_images(corpus, self.name)
        self._check_shape(images)
        net: AutoregressiveNet = self._require_module()  # type: ignore[assignment]

        def feature_map(batch: np.ndarray) -> torch.Tensor:
            x, _ = model_inputs(batch, self.config.output, self.config.threshold)
            return net.body(x.to(self.device))

        grid = component_grid(self.config.components, tuple(self.config.grid))  # type: ignore[arg-type]
        return encode_regions(images, feature_map, grid, self.config.batch_size)
