"""PixelCNN (van den Oord, Kalchbrenner, Kavukcuoglu 2016, "Pixel Recurrent Neural Networks") and
its gated variant (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

Plain: a 7x7 mask-A convolution, then residual blocks (ReLU, 1x1 conv 2h->h, ReLU, 3x3 mask-B
conv, ReLU, 1x1 conv h->2h, added to the block's input), then ReLU / 1x1 mask-B / ReLU / 1x1
mask-B output layers to a Bernoulli or 256-way softmax per pixel and colour.

Gated (``gated=True``): a vertical stack (a ``(k//2 + 1) x k`` convolution over the current and
earlier rows, fed to the horizontal stack only after a one-row downward shift) and a horizontal
stack (a ``1 x (k//2 + 1)`` convolution over the current row up to the current pixel, mask A in
the first layer), each with the gated activation ``tanh(a) * sigmoid(b)``; the horizontal stack
adds a 1x1 projection of the shifted vertical stack and has residual connections. Together the
stacks cover every pixel above and to the left: no blind spot.

Components: the last hidden feature map (the horizontal stack when gated), ``2h`` channels,
average-pooled to ``grid`` regions per image, or to one vector per frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from encoders._image import (
    FIRST_KERNEL,
    AutoregressiveImageConfig,
    AutoregressiveImageEncoder,
    MaskedConv2d,
    MaskedStack,
    shift_down,
)
from encoders.base import EncoderConfig, register


@dataclass
class PixelCNNConfig(AutoregressiveImageConfig):
    gated: bool = False  # vertical + horizontal gated stacks instead of residual blocks
    kernel_size: int = 3  # kernel of the mask-B convolutions after the first layer


class ResidualBlock(nn.Module):
    """PixelCNN residual block, ``(n, 2h, H, W) -> (n, 2h, H, W)``."""

    def __init__(self, hidden: int, kernel_size: int, n_colors: int) -> None:
        super().__init__()
        self.reduce = MaskedConv2d(2 * hidden, hidden, 1, "B", n_colors)
        self.conv = MaskedConv2d(hidden, hidden, kernel_size, "B", n_colors)
        self.expand = MaskedConv2d(hidden, 2 * hidden, 1, "B", n_colors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(F.relu(self.conv(F.relu(self.reduce(F.relu(x))))))


def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation ``tanh(a) * sigmoid(b)`` of the two channel halves ``(n, 2p, ...) -> (n, p, ...)``."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated PixelCNN layer on ``(vertical, horizontal)`` maps of ``p`` channels each.

    The first layer (``first=True``) takes the image in both stacks, uses mask A in the
    horizontal convolution and has no residual connection.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, n_colors: int, first: bool) -> None:
        super().__init__()
        self.kernel_size, self.first = kernel_size, first
        # The vertical stack sees rows <= i; only its down-shifted copy reaches the horizontal stack.
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (kernel_size // 2 + 1, kernel_size))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        # A 1 x k masked kernel is the 1 x (k//2 + 1) convolution over the row up to the pixel.
        self.horizontal = MaskedConv2d(in_channels, 2 * channels, (1, kernel_size), "A" if first else "B", n_colors)
        self.horizontal_out = MaskedConv2d(channels, channels, 1, "B", n_colors)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.kernel_size
        v_pre = self.vertical(F.pad(v, (k // 2, k // 2, k // 2, 0)))
        h_pre = self.horizontal(h) + self.vertical_to_horizontal(shift_down(v_pre))
        h_out = self.horizontal_out(gate(h_pre))
        return gate(v_pre), h_out if self.first else h + h_out


class GatedPixelCNNBody(nn.Module):
    """A 7x7 first gated layer then ``n_layers`` gated layers: ``(n, colors, H, W) -> (n, 2h, H, W)``."""

    def __init__(self, n_colors: int, hidden: int, n_layers: int, kernel_size: int) -> None:
        super().__init__()
        channels = 2 * hidden
        self.layers = nn.ModuleList(
            [GatedLayer(n_colors, channels, FIRST_KERNEL, n_colors, first=True)]
            + [GatedLayer(channels, channels, kernel_size, n_colors, first=False) for _ in range(n_layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h)
        return h


@register("pixelcnn")
class PixelCNNEncoder(AutoregressiveImageEncoder):
    """PixelCNN (plain or gated) trained by maximum likelihood on the catalogue's images."""

    config_class: ClassVar[type[EncoderConfig]] = PixelCNNConfig
    config: PixelCNNConfig
    test_overrides: ClassVar[dict] = {"hidden": 4, "n_layers": 1, "head_channels": 8}

    def _body(self, n_colors: int) -> nn.Module:
        cfg = self.config
        if cfg.kernel_size % 2 == 0 or cfg.kernel_size < 1:
            raise ValueError(f"kernel_size must be odd and positive, got {cfg.kernel_size}")
        if cfg.gated:
            return GatedPixelCNNBody(n_colors, cfg.hidden, cfg.n_layers, cfg.kernel_size)
        blocks = [ResidualBlock(cfg.hidden, cfg.kernel_size, n_colors) for _ in range(cfg.n_layers)]
        return MaskedStack(n_colors, cfg.hidden, blocks)
