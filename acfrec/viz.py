"""Pictures of ACF's attention: which history items a score rests on, and which of their frames.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global backend change),
so it runs on servers and inside tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from acfrec.errors import DataValidationError
from acfrec.utils import atomic_file

# Inches per frame cell and for the text column on the left of each row.
_CELL, _LABEL_WIDTH = 1.1, 1.9


def plot_attention(
    explanation: Mapping[str, Any],
    frames: Sequence[np.ndarray] | Mapping[Any, np.ndarray],
    path: str | Path,
    item_names: Mapping[Any, str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw one explained score as a PNG: a row per history item (its alpha), its frames (beta).

    Args:
        explanation: what :meth:`acfrec.models.acf.ACF.explain` returns: ``{"user", "item",
            "score", "history": [{"item", "alpha", "components": [{"component", "beta"}]}]}``.
            Frames the explanation does not list are drawn with beta 0 (ask ``explain`` for
            ``top_components`` >= the longest item to see every weight).
        frames: the images of every history item, ``(n_frames, h, w)`` grey or
            ``(n_frames, h, w, 3)`` RGB arrays: a list in the order of ``explanation["history"]``,
            or a mapping from the history item (as the explanation names it: index or external id) to its array.
        path: the PNG to write (atomically: a temporary file, then a rename).
        item_names: optional display names (e.g. external ids) of the items.
        title: defaults to the user, the explained item and the score.
    Returns:
        ``path``.
    Raises:
        DataValidationError: when the explanation has no history, ``frames`` does not give one
            image array per history item, or a weighted component has no frame.
    """
    history = _history(explanation)
    images = _frames_per_entry(history, frames)
    names = item_names or {}
    width = max(image.shape[0] for image in images)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(_LABEL_WIDTH + _CELL * width, 0.4 + _CELL * len(history)), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(len(history), width + 1, width_ratios=[_LABEL_WIDTH / _CELL] + [1.0] * width)
    for row, (entry, stack) in enumerate(zip(history, images, strict=True)):
        label = figure.add_subplot(grid[row, 0])
        label.axis("off")
        name = names.get(entry["item"], f"item {entry['item']}")
        label.text(0.0, 0.5, f"{name}\nalpha = {float(entry['alpha']):.3f}", va="center", fontsize=9)
        beta = _betas(entry, stack.shape[0])
        for column in range(width):
            axes = figure.add_subplot(grid[row, column + 1])
            axes.set_xticks([])
            axes.set_yticks([])
            if column >= stack.shape[0]:
                axes.axis("off")
                continue
            axes.imshow(stack[column], cmap="gray_r" if stack.ndim == 3 else None)
            # The frame's border grows with its weight, so the eye finds the attended frames.
            for spine in axes.spines.values():
                spine.set_color("tab:red")
                spine.set_linewidth(0.5 + 6.0 * beta[column])
            axes.set_title(f"beta {beta[column]:.2f}", fontsize=8)
    figure.suptitle(title or _default_title(explanation), fontsize=10)
    path = Path(path)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def catalogue_frames(frames: np.ndarray, item_offsets: np.ndarray, items: Sequence[int]) -> list[np.ndarray]:
    """The frames of each of ``items`` from a ragged frame array.

    Args:
        frames: ``(n_frames, h, w)`` images of every item, item ``k`` owning
            ``frames[item_offsets[k]:item_offsets[k + 1]]``.
        item_offsets: ``(n_items + 1,)``.
        items: item positions in that layout.
    Returns:
        one ``(n_frames_k, h, w)`` array per item.
    """
    n_items = len(item_offsets) - 1
    bad = [int(k) for k in items if not 0 <= int(k) < n_items]
    if bad:
        raise DataValidationError(f"items {bad[:5]} are outside the frame layout of {n_items} items")
    return [frames[item_offsets[k] : item_offsets[k + 1]] for k in map(int, items)]


def _history(explanation: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    history = explanation.get("history") if isinstance(explanation, Mapping) else None
    if not history:
        raise DataValidationError(
            "plot_attention needs an explanation with a non-empty 'history' list (what ACF.explain returns)"
        )
    return list(history)


def _frames_per_entry(
    history: list[Mapping[str, Any]], frames: Sequence[np.ndarray] | Mapping[Any, np.ndarray]
) -> list[np.ndarray]:
    """One ``(n_frames, h, w[, 3])`` array per history entry, checked."""
    items = [entry["item"] for entry in history]
    if isinstance(frames, Mapping):
        missing = [item for item in items if item not in frames]
        if missing:
            raise DataValidationError(f"frames has no images for history item(s) {missing}")
        stacks = [np.asarray(frames[item]) for item in items]
    else:
        if len(frames) != len(history):
            raise DataValidationError(
                f"frames holds {len(frames)} image arrays but the explanation has {len(history)} history "
                f"items {items}: give one (n_frames, h, w) array per history item, in order"
            )
        stacks = [np.asarray(stack) for stack in frames]
    for item, stack in zip(items, stacks, strict=True):
        if stack.ndim not in (3, 4) or stack.shape[0] == 0 or (stack.ndim == 4 and stack.shape[3] != 3):
            raise DataValidationError(
                f"frames of history item {item} must be (n_frames >= 1, h, w) or (n_frames, h, w, 3); got {stack.shape}"
            )
    return stacks


def _betas(entry: Mapping[str, Any], n_frames: int) -> np.ndarray:
    """``(n_frames,)`` beta of every frame of a history entry (0 where not listed)."""
    beta = np.zeros(n_frames)
    for component in entry.get("components", []):
        index = int(component["component"])
        if not 0 <= index < n_frames:
            raise DataValidationError(
                f"history item {entry['item']} has {n_frames} frames but the explanation weights "
                f"component {index}: the frames do not belong to this item"
            )
        beta[index] = float(component["beta"])
    return beta


def _default_title(explanation: Mapping[str, Any]) -> str:
    parts = [f"{key} {explanation[key]}" for key in ("user", "item") if key in explanation]
    if "score" in explanation:
        parts.append(f"score {float(explanation['score']):.3f}")
    return ", ".join(parts) + ": history items by alpha, frames by beta"


__all__ = ["catalogue_frames", "plot_attention"]
