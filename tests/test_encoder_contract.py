"""One contract every registered encoder passes: fit, encode, save/load, determinism, resume.

An encoder class may set ``test_overrides`` (a dict of config fields) to make itself tiny here;
the contract always trains 2 epochs of at most 3 steps on a few dozen items. A frozen encoder
(``trainable = False``) passes the same suite with an empty history instead of a training curve.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from encoders import Components, Encoder, ImageCorpus, TextCorpus, available_encoders, get_encoder
from encoders.base import StaleCheckpointError

_WORDS = {
    "subject": ["the detective", "a young woman", "the old sailor", "two brothers", "the robot", "a small town"],
    "verb": ["finds", "loses", "hunts", "remembers", "builds", "destroys", "protects"],
    "object": ["a hidden treasure", "the lost city", "an ancient map", "the secret letter", "a strange machine"],
    "tail": ["at night", "in the war", "before winter", "with a friend", "after the storm", ""],
}


def tiny_images(n_items: int = 24, frames_per_item: int = 2, size: int = 12, seed: int = 0) -> ImageCorpus:
    """Binary-ish blob images: a bright square at an item-specific place on a dark background."""
    rng = np.random.default_rng(seed)
    n = n_items * frames_per_item
    images = np.zeros((n, 1, size, size), dtype=np.uint8)
    corners = rng.integers(0, size - 4, size=(n, 2))
    for index, (row, col) in enumerate(corners):  # test data, a few dozen images
        images[index, 0, row : row + 4, col : col + 4] = 255
    noise = rng.random(images.shape) < 0.03
    images[noise] = 255 - images[noise]
    offsets = np.arange(0, n + 1, frames_per_item, dtype=np.int64)
    return ImageCorpus(images, offsets, [f"i{k}" for k in range(n_items)])


def tiny_texts(n_items: int = 24, seed: int = 0) -> TextCorpus:
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(n_items):
        sentences = []
        for _ in range(int(rng.integers(1, 4))):
            words = [str(rng.choice(_WORDS[slot])) for slot in ("subject", "verb", "object", "tail")]
            sentences.append(" ".join(w for w in words if w) + ".")
        documents.append(sentences)
    documents[3] = []  # an item without text still gets an (empty) run of components
    return TextCorpus(documents, [f"t{k}" for k in range(n_items)])


def corpus_for(encoder_cls: type[Encoder]) -> ImageCorpus | TextCorpus:
    return tiny_texts() if encoder_cls.modality == "text" else tiny_images()


def make(encoder_cls: type[Encoder], **extra) -> Encoder:
    overrides = {"epochs": 2, "batch_size": 8, "max_steps_per_epoch": 3, "seed": 0}
    overrides.update(getattr(encoder_cls, "test_overrides", {}))
    overrides.update(extra)
    return encoder_cls(**overrides)


NAMES = available_encoders()
TRAINABLE = [name for name in NAMES if get_encoder(name).trainable]
FROZEN = [name for name in NAMES if not get_encoder(name).trainable]
# The annealed KL weight grows over the first steps, so the text VAE's objective itself rises
# while the model improves; with the full weight from step one it must fall like the others'.
LOSS_FALLS_OVERRIDES = {"text-vae": {"kl_anneal": "none"}}


def trained_epochs(encoder: Encoder) -> list[int]:
    return [int(record["epoch"]) for record in encoder.history]


def test_encoders_are_registered():
    assert NAMES, "no encoder is registered"


@pytest.mark.parametrize("name", NAMES)
class TestEncoderContract:
    def test_fit_encode_shapes(self, name):
        cls = get_encoder(name)
        corpus = corpus_for(cls)
        encoder = make(cls).fit(corpus)
        if cls.trainable:
            assert trained_epochs(encoder) == [1, 2] and np.isfinite(encoder.history[-1]["loss"])
        else:
            assert encoder.history == []
        components = encoder.encode(corpus)
        assert isinstance(components, Components)
        assert components.item_ids == corpus.item_ids
        assert components.matrix.shape[1] == encoder.output_dim
        assert components.matrix.dtype == np.float32 and np.isfinite(components.matrix).all()
        counts = np.diff(components.offsets)
        if cls.modality == "text":
            assert counts[3] == 0 and counts.sum() > 0  # one component per sentence
        else:
            assert (counts > 0).all()

    def test_save_load_identical(self, name, tmp_path):
        cls = get_encoder(name)
        corpus = corpus_for(cls)
        encoder = make(cls).fit(corpus)
        before = encoder.encode(corpus).matrix
        encoder.save(tmp_path / "enc")
        loaded = Encoder.load(tmp_path / "enc")
        assert type(loaded) is cls and loaded.output_dim == encoder.output_dim
        np.testing.assert_array_equal(loaded.encode(corpus).matrix, before)

    def test_seeded_runs_repeat(self, name):
        cls = get_encoder(name)
        corpus = corpus_for(cls)
        first = make(cls).fit(corpus).encode(corpus).matrix
        second = make(cls).fit(corpus).encode(corpus).matrix
        np.testing.assert_array_equal(first, second)

    def test_resume_from_checkpoint(self, name, tmp_path):
        cls = get_encoder(name)
        corpus = corpus_for(cls)
        straight = make(cls).fit(corpus).encode(corpus).matrix
        make(cls, epochs=1).fit(corpus, checkpoint_dir=tmp_path / "ckpt")
        resumed = make(cls).fit(corpus, checkpoint_dir=tmp_path / "ckpt")
        assert trained_epochs(resumed) == ([1, 2] if cls.trainable else [])
        assert (tmp_path / "ckpt" / "last.pt").is_file() == cls.trainable  # a frozen encoder has nothing to save
        np.testing.assert_allclose(resumed.encode(corpus).matrix, straight, rtol=1e-5, atol=1e-6)

    def test_evaluate_reports_finite_numbers(self, name):
        cls = get_encoder(name)
        corpus = corpus_for(cls)
        figures = make(cls).fit(corpus).evaluate(corpus)
        assert figures and all(np.isfinite(v) for v in figures.values())

    def test_modality_is_the_configs(self, name):
        cls = get_encoder(name)
        assert cls.modality in ("image", "frames", "text") and cls().modality == cls.modality

    def test_unfitted_encode_is_a_clear_error(self, name):
        cls = get_encoder(name)
        with pytest.raises(RuntimeError, match="not fitted"):
            make(cls).encode(corpus_for(cls))


@pytest.mark.parametrize("name", TRAINABLE)
def test_loss_falls_on_a_repeated_batch(name):
    cls = get_encoder(name)
    corpus = corpus_for(cls).subset(np.arange(8))  # one batch, seen once per epoch
    encoder = make(cls, epochs=6, lr=1e-2, batch_size=64, **LOSS_FALLS_OVERRIDES.get(name, {})).fit(corpus)
    losses = [record["loss"] for record in encoder.history]
    assert losses[-1] < losses[0] and losses[-1] == min(losses), losses


@pytest.mark.parametrize("name", FROZEN)
def test_frozen_encoder_trains_nothing_and_says_so(name, caplog):
    cls = get_encoder(name)
    with caplog.at_level("INFO", logger="encoders.base"):
        encoder = make(cls, epochs=3).fit(corpus_for(cls))
    assert encoder.history == [] and encoder.stopped_early is None
    assert f"{name} is frozen (trainable=False)" in caplog.text
    assert not any(parameter.requires_grad for parameter in encoder.module.parameters())


def test_a_time_budget_stops_after_a_step_checkpoints_and_resumes(tmp_path):
    cls = get_encoder("pixelcnn")
    corpus = corpus_for(cls)
    stopped = make(cls, epochs=3, max_seconds=1e-6).fit(corpus, checkpoint_dir=tmp_path / "ckpt")
    assert trained_epochs(stopped) == [1] and stopped.history[0]["steps"] == 1
    assert stopped.stopped_early == "time budget"
    stopped.save(tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "meta.json").read_text())["stopped_early"] == "time budget"
    assert Encoder.load(tmp_path / "enc").stopped_early == "time budget"
    resumed = make(cls, epochs=3).fit(corpus, checkpoint_dir=tmp_path / "ckpt")  # no budget now
    assert trained_epochs(resumed) == [1, 2, 3] and resumed.history[-1]["steps"] == 3
    assert resumed.stopped_early is None
    with pytest.raises(ValueError, match="max_seconds must be positive or None, got 0"):
        make(cls, max_seconds=0).fit(corpus)


def test_modality_follows_the_config_an_encoder_is_fitted_with(tmp_path):
    cls = get_encoder("pixelcnn")
    encoder = make(cls)
    assert encoder.modality == cls.modality == "image"  # regions by default
    encoder.fit(tiny_images(), dataclasses.replace(encoder.config, components="frames", epochs=1))
    assert encoder.modality == "frames" and cls.modality == "image"
    encoder.save(tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "meta.json").read_text())["modality"] == "frames"
    assert Encoder.load(tmp_path / "enc").modality == "frames"


def test_a_checkpoint_of_other_options_is_not_resumed(tmp_path):
    corpus = tiny_images()
    darn = get_encoder("darn")
    make(darn, epochs=1).fit(corpus, checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(StaleCheckpointError, match=r"ckpt/last.pt was made with other options \(lr: saved 0.0003, requested 0.01\)"):
        make(darn, lr=0.01).fit(corpus, checkpoint_dir=tmp_path / "ckpt")
    assert trained_epochs(make(darn, epochs=3).fit(corpus, checkpoint_dir=tmp_path / "ckpt")) == [1, 2, 3]
    restarted = make(darn, lr=0.01).fit(corpus, checkpoint_dir=tmp_path / "ckpt", restart_stale_checkpoint=True)
    assert trained_epochs(restarted) == [1, 2]  # afresh, and its checkpoint replaced the stale one
    assert trained_epochs(make(darn, lr=0.01, epochs=3).fit(corpus, checkpoint_dir=tmp_path / "ckpt")) == [1, 2, 3]


def test_unknown_encoder_names_the_choices():
    with pytest.raises(KeyError, match="available"):
        get_encoder("no-such-encoder")


def test_encoders_package_does_not_import_acfrec():
    """encoders/ depends on torch/torchvision only (acfrec imports encoders, never the reverse)."""
    import subprocess
    import sys

    code = "import sys, encoders; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'acfrec'); print(bad); sys.exit(bool(bad))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
