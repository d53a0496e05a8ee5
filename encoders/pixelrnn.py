"""PixelRNN (van den Oord, Kalchbrenner, Kavukcuoglu 2016, "Pixel Recurrent Neural Networks"):
Row LSTM and Diagonal BiLSTM.

Both networks are: a 7x7 mask-A convolution to ``2h`` feature maps, ``n_layers`` LSTM layers
with residual connections (the layer's ``h``-channel output is taken back to ``2h`` channels by
a 1x1 mask-B convolution and added to its input), then ReLU / 1x1 mask-B / ReLU / 1x1 mask-B
output layers to a Bernoulli (binarised MNIST) or 256-way softmax per pixel and colour.

* Row LSTM: the input-to-state component is a ``1 x 3`` mask-B convolution over each row (all
  rows at once); the state-to-state component a ``1 x 3`` convolution over the previous row's
  hidden state. Rows are processed top to bottom: triangular receptive field.
* Diagonal BiLSTM: the input map is skewed (row ``i`` shifted right by ``i``) so that each
  diagonal becomes a column; the input-to-state component is a 1x1 mask-B convolution, the
  state-to-state component a ``2 x 1`` convolution over the previous column (the pixel above and
  the pixel to the left). The right-to-left direction runs on the mirrored image, and its output
  is shifted down one row before being added, so no pixel at or after the current one is seen.
  Full receptive field over everything above and to the left.

Components: the last LSTM layer's ``2h`` feature map pooled to ``grid`` regions per image, or to
one vector per frame.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from encoders._image import AutoregressiveImageEncoder, MaskedConv2d, MaskedStack, shift_down
from encoders.base import register

ROW_KERNEL = 3  # the paper's k = 3 for both Row LSTM convolutions


def lstm_update(gates: torch.Tensor, cell: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step from pre-activations ``[o, f, i, g]`` stacked along ``dim`` (4x the state)."""
    out_gate, forget_gate, in_gate, candidate = gates.chunk(4, dim=dim)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(in_gate) * torch.tanh(candidate)
    return torch.sigmoid(out_gate) * torch.tanh(cell), cell


def skew(x: torch.Tensor) -> torch.Tensor:
    """``(n, c, H, W) -> (n, c, H, W + H - 1)``: row ``i`` shifted right by ``i`` (zeros elsewhere),
    so the image's diagonals become columns."""
    n, c, height, width = x.shape
    padded = F.pad(x, (0, height))  # rows of width W + H, laid end to end ...
    flat = padded.reshape(n, c, height * (width + height))[..., : height * (width + height - 1)]
    return flat.reshape(n, c, height, width + height - 1)  # ... re-cut one shorter: row i moves i right


def unskew(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`skew`: ``(n, c, H, W + H - 1) -> (n, c, H, W)``."""
    n, c, height, skewed_width = x.shape
    width = skewed_width - height + 1
    flat = F.pad(x.reshape(n, c, height * skewed_width), (0, height))
    return flat.reshape(n, c, height, skewed_width + 1)[..., :width]


class RowLSTMLayer(nn.Module):
    """Row LSTM layer with its residual connection, ``(n, 2h, H, W) -> (n, 2h, H, W)``."""

    def __init__(self, hidden: int, n_colors: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.input_to_state = MaskedConv2d(2 * hidden, 4 * hidden, (1, ROW_KERNEL), "B", n_colors)
        # The row above is entirely in the past: no mask, every colour of it may be seen.
        self.state_to_state = nn.Conv1d(hidden, 4 * hidden, ROW_KERNEL, padding=ROW_KERNEL // 2)
        self.output = MaskedConv2d(hidden, 2 * hidden, 1, "B", n_colors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        gates_from_input = self.input_to_state(x)  # (n, 4h, H, W), every row at once
        state = x.new_zeros(n, self.hidden, width)
        cell = x.new_zeros(n, self.hidden, width)
        rows = []
        # unbind, not indexing: one backward node for all rows instead of a full-size zero tensor per row
        for gates_of_row in gates_from_input.unbind(dim=2):  # the recurrence runs over image rows
            state, cell = lstm_update(gates_of_row + self.state_to_state(state), cell)
            rows.append(state)
        return x + self.output(torch.stack(rows, dim=2))


class DiagonalBiLSTMLayer(nn.Module):
    """Diagonal BiLSTM layer with its residual connection, ``(n, 2h, H, W) -> (n, 2h, H, W)``.

    Both directions run in one column loop: their states are stacked on the channel axis and the
    ``2 x 1`` state-to-state convolution is grouped by direction.
    """

    def __init__(self, hidden: int, n_colors: int) -> None:
        super().__init__()
        self.hidden = hidden
        # 4h gate pre-activations for the left-to-right direction, then 4h for right-to-left.
        self.input_to_state = MaskedConv2d(2 * hidden, 8 * hidden, 1, "B", n_colors)
        # Kernel 2 over rows (i - 1, i) of the previous column = the pixels above and to the left.
        self.state_to_state = nn.Conv1d(2 * hidden, 8 * hidden, 2, groups=2)
        self.output = MaskedConv2d(hidden, 2 * hidden, 1, "B", n_colors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        h = self.hidden
        gates = self.input_to_state(x)
        # A 1x1 convolution commutes with mirroring, so mirror its right-to-left half afterwards.
        skewed = skew(torch.cat([gates[:, : 4 * h], gates[:, 4 * h :].flip(-1)], dim=1))
        state = x.new_zeros(n, 2 * h, height)
        cell = x.new_zeros(n, 2, h, height)
        columns = []
        for gates_of_column in skewed.unbind(dim=-1):  # the recurrence runs over the skewed columns
            pre = gates_of_column + self.state_to_state(F.pad(state, (1, 0)))
            new_state, cell = lstm_update(pre.view(n, 2, 4 * h, height), cell, dim=2)
            state = new_state.reshape(n, 2 * h, height)
            columns.append(state)
        both = unskew(torch.stack(columns, dim=-1))  # (n, 2h, H, W)
        left, right = both[:, :h], both[:, h:].flip(-1)
        # Unshifted, the mirrored direction at (i, j) has seen (i, j..W-1): the current and later pixels.
        return x + self.output(left + shift_down(right))


class PixelRNNEncoder(AutoregressiveImageEncoder):
    """PixelRNN trained by maximum likelihood; subclasses choose the LSTM layer."""

    layer_class: ClassVar[type[nn.Module]]
    test_overrides: ClassVar[dict] = {"hidden": 4, "n_layers": 1, "head_channels": 8}

    def _body(self, n_colors: int) -> nn.Module:
        cfg = self.config
        return MaskedStack(n_colors, cfg.hidden, [self.layer_class(cfg.hidden, n_colors) for _ in range(cfg.n_layers)])


@register("row-lstm")
class RowLSTMEncoder(PixelRNNEncoder):
    layer_class = RowLSTMLayer


@register("diagonal-bilstm")
class DiagonalBiLSTMEncoder(PixelRNNEncoder):
    layer_class = DiagonalBiLSTMLayer
