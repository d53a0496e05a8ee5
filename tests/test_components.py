"""ComponentStore: write/open round trip, validation errors, atomicity, alignment; featurisers."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from acfrec.data.components import ComponentStore, hashed_bow_sentences, pca_pixels
from acfrec.data.idmap import IdMap
from acfrec.errors import ArtifactError, DataValidationError


def _items(rng: np.random.Generator, counts: list[int], dim: int = 4) -> list[np.ndarray]:
    return [rng.normal(size=(n, dim)).astype(np.float32) for n in counts]


def test_round_trip_list_and_ragged_forms(tmp_path):
    rng = np.random.default_rng(0)
    parts = _items(rng, [2, 0, 3])
    store = ComponentStore.write(tmp_path / "a", ["x", "y", "z"], parts, meta={"encoder": "test", "encoder_config": {"k": 1}})
    assert isinstance(store.matrix, np.memmap)
    assert store.offsets.tolist() == [0, 2, 2, 5]
    assert (store.meta["encoder"], store.meta["dim"], store.meta["dtype"]) == ("test", 4, "float32")
    assert store.meta["encoder_config"] == {"k": 1} and store.meta["format_version"] == 1 and store.meta["created"]
    np.testing.assert_array_equal(store.item_components("z"), parts[2])
    assert store.item_components("y").shape == (0, 4)

    matrix = np.concatenate(parts)
    half = ComponentStore.write(tmp_path / "b", ["x", "y", "z"], (matrix, np.array([0, 2, 2, 5])), dtype="float16")
    reopened = ComponentStore.open(tmp_path / "b")
    assert reopened.matrix.dtype == np.float16 and reopened.n_components == 5
    np.testing.assert_allclose(np.asarray(half.matrix, dtype=np.float32), matrix, atol=1e-2)


def test_write_rejects_nan_bad_dims_and_bad_offsets(tmp_path):
    rng = np.random.default_rng(1)
    parts = _items(rng, [2, 2])
    parts[1][1, 3] = np.nan
    with pytest.raises(DataValidationError, match=r"row 3, item 1"):
        ComponentStore.write(tmp_path / "s", ["a", "b"], parts)
    with pytest.raises(DataValidationError, match=r"item 1 has components of shape \(2, 5\)"):
        ComponentStore.write(tmp_path / "s", ["a", "b"], [np.zeros((1, 4)), np.zeros((2, 5))])
    matrix = np.zeros((4, 3))
    with pytest.raises(DataValidationError, match=r"offsets decrease at item 1 \(3 -> 2\)"):
        ComponentStore.write(tmp_path / "s", ["a", "b"], (matrix, np.array([0, 3, 2])))
    with pytest.raises(DataValidationError, match="offsets end at 3 but the component matrix has 4 rows"):
        ComponentStore.write(tmp_path / "s", ["a", "b"], (matrix, np.array([0, 1, 3])))
    with pytest.raises(DataValidationError, match="3 component arrays for 2 item ids"):
        ComponentStore.write(tmp_path / "s", ["a", "b"], [np.zeros((1, 3))] * 3)
    with pytest.raises(DataValidationError, match="duplicate external id 'a'"):
        ComponentStore.write(tmp_path / "s", ["a", "a"], [np.zeros((1, 3))] * 2)
    with pytest.raises(DataValidationError, match="after conversion to float16"):
        ComponentStore.write(tmp_path / "s", ["a"], [np.full((1, 3), 1e6)], dtype="float16")
    assert not (tmp_path / "s").exists()


def test_open_validates_files_against_meta(tmp_path):
    path = tmp_path / "s"
    ComponentStore.write(path, ["a", "b", "c"], _items(np.random.default_rng(2), [1, 2, 1]))

    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "dim": 8}))
    with pytest.raises(ArtifactError, match=r"components.npy: component dim 4 disagrees with meta.json dim 8"):
        ComponentStore.open(path)
    (path / "meta.json").write_text(json.dumps({**meta, "dtype": "float16"}))
    with pytest.raises(ArtifactError, match="dtype float32 disagrees"):
        ComponentStore.open(path)
    (path / "meta.json").write_text(json.dumps(meta))

    matrix = np.load(path / "components.npy")
    matrix[2, 0] = np.inf
    np.save(path / "components.npy", matrix)
    with pytest.raises(ArtifactError, match=r"NaN or inf in component row 2, item 1 \(id 'b'\)"):
        ComponentStore.open(path)
    matrix[2, 0] = 0.0
    np.save(path / "components.npy", matrix)

    np.save(path / "offsets.npy", np.array([0, 2, 1, 4]))
    with pytest.raises(ArtifactError, match="offsets.npy: offsets decrease at item 1"):
        ComponentStore.open(path)
    np.save(path / "offsets.npy", np.array([0, 1, 3]))
    with pytest.raises(ArtifactError, match=r"shape \(n_items \+ 1,\) = \(4,\)"):
        ComponentStore.open(path)
    (path / "offsets.npy").unlink()
    with pytest.raises(ArtifactError, match="offsets.npy is missing"):
        ComponentStore.open(path)


def test_failed_write_leaves_previous_store_intact(tmp_path):
    path = tmp_path / "s"
    good = _items(np.random.default_rng(3), [2, 1])
    ComponentStore.write(path, ["a", "b"], good)
    bad = [np.zeros((1, 4)), np.full((1, 4), np.nan)]
    with pytest.raises(DataValidationError):
        ComponentStore.write(path, ["a", "b"], bad)
    np.testing.assert_array_equal(ComponentStore.open(path).item_components("a"), good[0])

    class Boom(Exception):
        pass

    def exploding():
        yield np.zeros((1, 4))
        raise Boom

    with pytest.raises(Boom):
        ComponentStore.write(path, ["a", "b"], list(exploding()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folder left behind
    np.testing.assert_array_equal(ComponentStore.open(path).item_components("b"), good[1])


def test_align_maps_ids_reports_missing_and_unknown(tmp_path, caplog):
    rng = np.random.default_rng(4)
    parts = _items(rng, [3, 1, 5, 2])
    store = ComponentStore.write(tmp_path / "s", ["a", "b", "c", "d"], parts)
    model_items = IdMap(["c", "new", "a", "b"], kind="item")
    with caplog.at_level(logging.WARNING):
        aligned = store.align(model_items, max_components=4)
    assert "no components for 1 of 4 model items" in caplog.text
    assert (aligned.n_missing, aligned.n_unknown, aligned.n_truncated) == (1, 1, 1)
    assert tuple(aligned.features.shape) == (4, 4, 4)
    assert aligned.mask.sum(dim=1).tolist() == [4, 0, 3, 1]
    np.testing.assert_allclose(aligned.features[0, :4].numpy(), parts[2][:4])
    np.testing.assert_allclose(aligned.features[2, :3].numpy(), parts[0])
    assert float(aligned.features[1].abs().sum()) == 0.0 and not aligned.has_content[1]
    narrow = store.align(IdMap(["b", "d"]), max_components=10)
    assert tuple(narrow.features.shape) == (2, 2, 4)  # padded only as wide as needed
    with pytest.raises(DataValidationError, match="max_components must be >= 1"):
        store.align(model_items, 0)


def test_hashed_bow_sentences():
    texts = [["The cat sat.", "A dog ran!"], [], ["the CAT sat", ""]]
    matrix, offsets = hashed_bow_sentences(texts, dim=64, seed=0)
    assert matrix.shape == (4, 64) and matrix.dtype == np.float32
    assert offsets.tolist() == [0, 2, 2, 4]
    np.testing.assert_allclose(np.linalg.norm(matrix[:3], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(matrix[0], matrix[2])  # case and punctuation do not matter
    assert not matrix[3].any()  # an empty sentence stays zero
    again, _ = hashed_bow_sentences(texts, dim=64, seed=0)
    other, _ = hashed_bow_sentences(texts, dim=64, seed=1)
    np.testing.assert_array_equal(matrix, again)
    assert not np.array_equal(matrix, other)
    assert abs(float(matrix[0] @ matrix[1])) < 0.5


def test_pca_pixels_is_repeatable_and_keeps_digit_classes():
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = pca_pixels(digits.images, dim=16, seed=0)
    assert features.shape == (1797, 16) and features.dtype == np.float32
    np.testing.assert_array_equal(features, pca_pixels(digits.images.reshape(1797, 64), dim=16, seed=0))
    assert abs(float((features**2).mean()) - 1.0) < 1e-4
    # Nearest class centroid on the features still tells the digits apart.
    centroids = np.stack([features[digits.target == c].mean(axis=0) for c in range(10)])
    predicted = np.argmin(((features[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == digits.target).mean() > 0.85
    with pytest.raises(DataValidationError, match="dim <= min"):
        pca_pixels(digits.images[:5], dim=16)
