"""`acfrec encode` and encode_to_store: content readers, stores ACF can align, resume, MLflow, errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from test_encoder_contract import tiny_images, tiny_texts

from acfrec.cli import main
from acfrec.config import ConfigError
from acfrec.data.components import ComponentStore
from acfrec.data.idmap import IdMap
from acfrec.encode import encode_to_store, holdout_items, read_content
from acfrec.errors import DataValidationError
from acfrec.tracking import sqlite_uri

TINY_DARN = ["epochs=2", "layers=[8]", "baseline_hidden=8", "eval_samples=4", "batch_size=16"]
TINY_DARN_CONFIG = {"epochs": 2, "layers": [8], "baseline_hidden": 8, "eval_samples": 4, "batch_size": 16}


@pytest.fixture()
def images_npz(tmp_path: Path) -> Path:
    corpus = tiny_images()
    path = tmp_path / "images.npz"
    np.savez(path, images=corpus.images, offsets=corpus.offsets, item_ids=np.array(corpus.item_ids))
    return path


@pytest.fixture()
def texts_csv(tmp_path: Path) -> Path:
    corpus = tiny_texts()
    path = tmp_path / "plots.csv"
    texts = [" ".join(s[0].upper() + s[1:] for s in document) for document in corpus.documents]  # sentence starts
    pd.DataFrame({"item_id": corpus.item_ids, "text": texts}).to_csv(path, index=False)
    return path


def test_encode_images_end_to_end_is_tracked_and_acf_can_align(tmp_path, images_npz, capsys):
    store_path = tmp_path / "store"
    tracking = ["--tracking-uri", sqlite_uri(tmp_path / "mlruns" / "mlflow.db"), "--experiment", "encode-test"]
    argv = ["encode", "--encoder", "darn", "--content", str(images_npz), "--out", str(store_path),
            "--set", *TINY_DARN, "features=codes", *tracking]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "darn: 24 items, 48 components of dim 8" in captured.out
    assert "components of dim" not in captured.err  # said once, not also by the log
    store = ComponentStore.open(store_path)
    assert store.meta["encoder"] == "darn" and store.meta["encoder_config"]["features"] == "codes"
    assert store.meta["n_heldout_items"] == 2 and np.isfinite(store.meta["heldout"]["nll_is_nats"])
    aligned = store.align(IdMap(["i3", "i0", "not-in-store"], kind="item"), max_components=4)
    assert tuple(aligned.features.shape) == (3, 2, 8) and aligned.n_missing == 1
    assert aligned.mask.tolist() == [[True, True], [True, True], [False, False]]
    assert set(np.unique(aligned.features.numpy())) <= {0.0, 1.0}

    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path / "mlruns" / "mlflow.db"))
    (run,) = client.search_runs([client.get_experiment_by_name("encode-test").experiment_id])
    curve = client.get_metric_history(run.info.run_id, "train.loss")
    assert sorted(m.step for m in curve) == [1, 2]
    assert "heldout.nll_bound_nats" in run.data.metrics and run.data.params["encoder.layers"] == "[8]"

    # A second run finds the saved encoder next to the store and only encodes (same components).
    assert main([*argv[:-4], "--no-track"]) == 0
    np.testing.assert_array_equal(ComponentStore.open(store_path).matrix, store.matrix)
    assert json.loads((tmp_path / "store.encoder" / "meta.json").read_text())["encoder"] == "darn"


def test_encode_text_csv_with_a_builtin_featuriser(tmp_path, texts_csv):
    assert main(["encode", "--encoder", "hashed-bow", "--content", str(texts_csv), "--out", str(tmp_path / "bow"),
                 "--set", "dim=16", "--no-track"]) == 0
    store = ComponentStore.open(tmp_path / "bow")
    expected = tiny_texts()
    assert store.n_items == 24 and store.dim == 16 and store.counts().tolist() == [len(d) for d in expected.documents]
    aligned = store.align(IdMap(["t3", "t0"], kind="item"), max_components=2)
    assert aligned.mask[0].sum() == 0 and aligned.mask[1].sum() == min(2, len(expected.documents[0]))


def test_sentence_rows_and_image_folders_are_read(tmp_path):
    pd.DataFrame({"item_id": ["b", "a", "b"], "sentence": ["One.", "Two.", "Three."]}).to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    texts = read_content(tmp_path / "s.tsv")
    assert texts.item_ids == ["b", "a"] and texts.documents == [["One.", "Three."], ["Two."]]
    frames = tmp_path / "videos"
    for item, count in (("v1", 2), ("v2", 3)):
        (frames / item).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(np.full((5, 4), 40 * k, dtype=np.uint8)).save(frames / item / f"{k:03d}.png")
    corpus = read_content(frames)
    assert corpus.item_ids == ["v1", "v2"] and corpus.offsets.tolist() == [0, 2, 5]
    assert corpus.images.shape == (5, 1, 5, 4) and corpus.images[4, 0, 0, 0] == 80
    singles = tmp_path / "posters"
    singles.mkdir()
    for item in ("p2", "p1"):
        Image.fromarray(np.zeros((3, 3, 3), dtype=np.uint8)).save(singles / f"{item}.jpg")
    posters = read_content(singles)
    assert posters.item_ids == ["p1", "p2"] and posters.images.shape == (2, 3, 3, 3)  # RGB stays 3 channels
    pixels = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"".join(v.to_bytes(4, "big") for v in (2051, 2, 4, 3)) + pixels.tobytes())
    digits = read_content(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert digits.item_ids == ["0", "1"] and np.array_equal(digits.images[:, 0], pixels)
    Image.fromarray(np.zeros((6, 4, 3), dtype=np.uint8)).save(frames / "v2" / "odd.png")
    with pytest.raises(DataValidationError, match=r"odd.png: image of shape \(1, 6, 4\)"):
        read_content(frames)


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, images_npz):
    straight = encode_to_store("darn", images_npz, tmp_path / "straight", config=TINY_DARN_CONFIG, progress=False)
    checkpoints = tmp_path / "ckpt"
    # The first run stops after epoch 1 (its checkpoint stays); the rerun picks up at epoch 2.
    encode_to_store("darn", images_npz, tmp_path / "first", config={**TINY_DARN_CONFIG, "epochs": 1},
                    checkpoint_dir=checkpoints, progress=False)
    assert (checkpoints / "last.pt").is_file()
    resumed = encode_to_store("darn", images_npz, tmp_path / "resumed", config=TINY_DARN_CONFIG,
                              checkpoint_dir=checkpoints, progress=False)
    history = json.loads((tmp_path / "resumed.encoder" / "meta.json").read_text())["history"]
    assert [int(r["epoch"]) for r in history] == [1, 2]
    np.testing.assert_allclose(ComponentStore.open(resumed).matrix, ComponentStore.open(straight).matrix, atol=1e-6)


def test_a_saved_encoder_of_other_options_is_refused_until_retrain(tmp_path, images_npz, capsys):
    store_path, checkpoints = tmp_path / "store", tmp_path / "ckpt"
    encode_to_store("darn", images_npz, store_path, config=TINY_DARN_CONFIG, checkpoint_dir=checkpoints, progress=False)
    encoder_dir = tmp_path / "store.encoder"
    first_state = (encoder_dir / "state.pt").read_bytes()
    wider = {**TINY_DARN_CONFIG, "layers": [16], "lr": 0.003}
    with pytest.raises(ConfigError) as refused:
        encode_to_store("darn", images_npz, store_path, config=wider, progress=False)
    message = str(refused.value)
    assert str(encoder_dir) in message and "--retrain" in message and "another --encoder-dir" in message
    assert "layers: saved [8], requested [16]" in message and "lr: saved 0.0003, requested 0.003" in message
    assert "epochs" not in message  # only the options that differ are named
    with pytest.raises(ConfigError, match=r"holds a 'darn' encoder, not 'neural-statistician': .*--retrain"):
        encode_to_store("neural-statistician", images_npz, store_path, encoder_dir=encoder_dir, progress=False)
    # Runtime options do not change what was learned: the saved encoder is reused as it is.
    encode_to_store("darn", images_npz, store_path, config={**TINY_DARN_CONFIG, "num_threads": 1}, progress=False)
    assert (encoder_dir / "state.pt").read_bytes() == first_state
    # The checkpoints of the old options are no more resumed than the saved encoder is reused.
    with pytest.raises(ConfigError, match=r"ckpt/last.pt was made with other options \(layers: saved \[8\].*--retrain"):
        encode_to_store("darn", images_npz, tmp_path / "other", config=wider, checkpoint_dir=checkpoints, progress=False)

    argv = ["encode", "--encoder", "darn", "--content", str(images_npz), "--out", str(store_path), "--no-track",
            "--checkpoint-dir", str(checkpoints), "--set", *TINY_DARN, "layers=[16]", "lr=0.003"]
    assert main(argv) == 2
    assert "acfrec encode: error: encoder dir" in capsys.readouterr().err
    assert main([*argv, "--retrain"]) == 0
    saved = json.loads((encoder_dir / "meta.json").read_text())
    assert saved["config"]["layers"] == [16] and saved["config"]["lr"] == 0.003
    assert [int(r["epoch"]) for r in saved["history"]] == [1, 2]  # trained afresh, not resumed
    assert list(torch.load(checkpoints / "last.pt", weights_only=False)["config"]["layers"]) == [16]
    assert ComponentStore.open(store_path).dim == 16
    assert not list(tmp_path.glob(".store.encoder*"))  # the old encoder is gone, no temporary folder left


def test_a_frozen_backbone_is_loaded_not_trained_and_the_run_says_so(tmp_path, images_npz):
    uri = sqlite_uri(tmp_path / "mlruns" / "mlflow.db")
    assert main(["encode", "--encoder", "backbone", "--content", str(images_npz), "--out", str(tmp_path / "store"),
                 "--set", "allow_random_weights=true", "resize=32", "grid=[1,1]",
                 "--tracking-uri", uri, "--experiment", "frozen"]) == 0
    saved = json.loads((tmp_path / "store.encoder" / "meta.json").read_text())
    assert saved["trainable"] is False and saved["history"] == []
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("frozen").experiment_id])
    assert run.data.params["encoder.trainable"] == "False"
    assert "heldout.feature_mean" in run.data.metrics and not any(k.startswith("train.") for k in run.data.metrics)
    assert ComponentStore.open(tmp_path / "store").dim == 512


def test_a_time_budget_stops_training_and_the_store_says_so(tmp_path, images_npz, capsys):
    out = tmp_path / "store"
    assert main(["encode", "--encoder", "darn", "--content", str(images_npz), "--out", str(out), "--no-track",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--set", *TINY_DARN, "epochs=5", "max_seconds=0.000001"]) == 0
    assert "training stopped early: time budget (max_seconds)" in capsys.readouterr().out
    assert ComponentStore.open(out).meta["encoder_stopped_early"] == "time budget"
    saved = json.loads((tmp_path / "store.encoder" / "meta.json").read_text())
    assert saved["stopped_early"] == "time budget" and [r["steps"] for r in saved["history"]] == [1.0]
    assert (tmp_path / "ckpt" / "last.pt").is_file()


def test_holdout_is_seeded_and_never_empty():
    train, held = holdout_items(24, 0.1, seed=0)
    assert held.size == 2 and np.intersect1d(train, held).size == 0 and train.size + held.size == 24
    assert np.array_equal(holdout_items(24, 0.1, seed=0)[1], held)
    assert holdout_items(3, 0.01, seed=0)[1].size == 1 and holdout_items(5, 0.0, seed=0)[1].size == 0


@pytest.mark.parametrize(
    ("content", "encoder", "message"),
    [
        ("no_images.npz", "darn", r"no_images.npz: no 'images' array \(found: pixels\)"),
        ("no_text.csv", "hashed-bow", r"no_text.csv: column 'text \(or sentence\)' is missing"),
        ("plots.csv", "darn", r"encoder 'darn' encodes images, but content .*plots.csv holds text"),
        ("plots.csv", "no-such-encoder", r"unknown encoder 'no-such-encoder'; available: .*darn.*hashed-bow"),
        ("missing.npz", "darn", r"content .*missing.npz does not exist"),
    ],
)
def test_bad_content_is_one_clear_error(tmp_path, texts_csv, capsys, content, encoder, message):
    np.savez(tmp_path / "no_images.npz", pixels=np.zeros((2, 3, 3), dtype=np.uint8))
    pd.DataFrame({"item_id": ["a"], "body": ["x"]}).to_csv(tmp_path / "no_text.csv", index=False)
    status = main(["encode", "--encoder", encoder, "--content", str(tmp_path / content),
                   "--out", str(tmp_path / "store"), "--no-track"])
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("acfrec encode: error: ") and re.search(message, error), error
    with pytest.raises(DataValidationError, match=message):
        encode_to_store(encoder, tmp_path / content, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
