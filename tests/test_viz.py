"""plot_attention: a real PNG of an explained score; bad frames are refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from acfrec.errors import DataValidationError
from acfrec.viz import catalogue_frames, plot_attention

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _explanation() -> dict:
    return {
        "user": 3,
        "item": 10,
        "score": 1.25,
        "history": [
            {"item": 4, "alpha": 0.6, "contribution": 0.5,
             "components": [{"component": 1, "beta": 0.7}, {"component": 0, "beta": 0.2}]},
            {"item": 9, "alpha": 0.3, "contribution": 0.1, "components": [{"component": 2, "beta": 0.5}]},
            {"item": 2, "alpha": 0.1, "contribution": 0.0, "components": []},  # an item without content
        ],
    }


def _frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8) for n in (3, 4, 2)]


def test_writes_a_png_of_sensible_size(tmp_path):
    path = plot_attention(_explanation(), _frames(), tmp_path / "sub" / "attention.png", item_names={4: "i4"})
    data = path.read_bytes()
    assert path == tmp_path / "sub" / "attention.png" and data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    # Three rows of frames, four frame columns plus the label column, at 100 dpi.
    assert 400 <= width <= 1000 and 250 <= height <= 600
    assert 5_000 < len(data) < 1_000_000
    assert [p.name for p in path.parent.iterdir()] == ["attention.png"]  # no temporary left behind


def test_frames_by_item_and_from_a_catalogue_layout(tmp_path):
    frames = np.arange(9 * 8 * 8, dtype=np.uint8).reshape(9, 8, 8)
    offsets = np.array([0, 2, 5, 9])
    stacks = catalogue_frames(frames, offsets, [2, 0])
    assert [s.shape[0] for s in stacks] == [4, 2] and np.array_equal(stacks[1], frames[:2])
    by_item = dict(zip((4, 9, 2), _frames(), strict=True))
    assert plot_attention(_explanation(), by_item, tmp_path / "a.png").stat().st_size > 5_000
    with pytest.raises(DataValidationError, match=r"items \[3\] are outside the frame layout of 3 items"):
        catalogue_frames(frames, offsets, [3])


def test_bad_input_is_named_and_nothing_is_written(tmp_path):
    path = tmp_path / "bad.png"
    with pytest.raises(DataValidationError, match="frames holds 2 image arrays but the explanation has 3 history"):
        plot_attention(_explanation(), _frames()[:2], path)
    short = _frames()
    short[0] = short[0][:1]  # item 4 keeps one frame, but its component 1 is weighted
    with pytest.raises(DataValidationError, match="history item 4 has 1 frames but the explanation weights component 1"):
        plot_attention(_explanation(), short, path)
    with pytest.raises(DataValidationError, match=r"frames has no images for history item\(s\) \[2\]"):
        plot_attention(_explanation(), dict(zip((4, 9), _frames(), strict=False)), path)
    with pytest.raises(DataValidationError, match="non-empty 'history'"):
        plot_attention({"user": 1, "history": []}, [], path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_external_ids_as_the_service_explains_them(tmp_path):
    """RecommenderService.explain names items by external id; the picture takes those as they are."""
    explanation = _explanation()
    for entry, name in zip(explanation["history"], ("i4", "i9", "i2"), strict=True):
        entry["item"] = name
    by_id = dict(zip(("i4", "i9", "i2"), _frames(), strict=True))
    assert plot_attention(explanation, by_id, tmp_path / "ids.png").stat().st_size > 5_000
