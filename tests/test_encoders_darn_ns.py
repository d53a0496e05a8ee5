"""DARN and the Neural Statistician: the properties that make them what they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_encoder_contract import tiny_images

from encoders import Encoder, ImageCorpus, get_encoder
from encoders.darn import AutoregressiveBernoulli, DARNModule, LearningSignal, binarize_images
from encoders.neural_statistician import NeuralStatistician, SetProfiler, pad_sets


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # torch.testing's first call imports torch._dynamo: tens of seconds on a busy machine.
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-5)


TINY_DARN = {"layers": (8,), "baseline_hidden": 8, "eval_samples": 8, "batch_size": 16, "seed": 0}


def _strictly_causal_jacobian(layer: AutoregressiveBernoulli, n_cond: int) -> torch.Tensor:
    """d logit_k / d v_j for a random binary ``v`` ``(n_units, n_units)``."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()  # nonzero lateral weights, so only the mask can zero a gradient
    v = (torch.rand(1, layer.n_units) < 0.5).float()
    cond = torch.rand(1, n_cond) if n_cond else None
    return torch.autograd.functional.jacobian(lambda inputs: layer.logits(inputs, cond)[0], v)[:, 0, :]


@pytest.mark.parametrize(("n_cond", "hidden"), [(0, 0), (5, 0), (5, 6)])
def test_autoregressive_layer_never_sees_current_or_later_units(n_cond, hidden):
    jacobian = _strictly_causal_jacobian(AutoregressiveBernoulli(7, n_cond, hidden=hidden), n_cond)
    upper = torch.triu(torch.ones(7, 7, dtype=torch.bool))  # j >= k
    assert torch.count_nonzero(jacobian[upper]) == 0
    assert torch.count_nonzero(jacobian[~upper]) == 21  # and every earlier unit is seen


def test_darn_prior_and_decoder_are_autoregressive():
    module = DARNModule(n_pixels=9, config=get_encoder("darn").config_class(layers=(6,)))
    assert module.prior.autoregressive and module.prior.cond is None
    assert all(layer.autoregressive for layer in module.decoder)  # p(x | h) over pixels
    factorised = DARNModule(9, get_encoder("darn").config_class(layers=(6,), autoregressive_encoder=False))
    assert not factorised.encoder[0].autoregressive


def test_sampling_matches_teacher_forced_probabilities():
    """Unit-by-unit sampling gives the same conditionals as the parallel (masked) logits."""
    layer = AutoregressiveBernoulli(6, 4)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()
    cond = torch.rand(5, 4)
    v, probs = layer.sample(cond, 5, torch.Generator().manual_seed(0))
    _assert_close(probs, torch.sigmoid(layer.logits(v, cond)))


def test_learning_signal_is_centred_and_normalised():
    signal = LearningSignal(momentum=0.8)
    first = torch.tensor([10.0, 20.0, 30.0, 40.0])
    out = signal(first, torch.zeros(4))  # the first batch initialises mean and variance
    assert signal.mean.item() == pytest.approx(25.0) and signal.var.item() == pytest.approx(125.0)
    _assert_close(out, (first - 25.0) / 125.0**0.5)
    second = torch.tensor([0.0, 2.0])
    baseline = torch.tensor([1.0, 1.0])
    out = signal(second, baseline)  # centred signal [-1, 1]: mean 0, variance 1
    assert signal.mean.item() == pytest.approx(0.8 * 25.0)
    assert signal.var.item() == pytest.approx(0.8 * 125.0 + 0.2 * 1.0)
    _assert_close(out, (second - baseline - 20.0) / (100.2**0.5))
    signal.eval()  # no updates outside training
    signal(torch.tensor([1e6]), torch.zeros(1))
    assert signal.mean.item() == pytest.approx(20.0)
    small = LearningSignal()  # a tiny variance is never divided by (max(1, sqrt(v)))
    small(torch.tensor([0.0, 0.1]), torch.zeros(2))
    small.eval()
    assert small(torch.tensor([0.1]), torch.zeros(1)).item() == pytest.approx(0.05)


def test_darn_codes_are_binary_and_probabilities_are_probabilities():
    corpus = tiny_images()
    codes = get_encoder("darn")(epochs=1, features="codes", **TINY_DARN).fit(corpus).encode(corpus).matrix
    assert set(np.unique(codes)) <= {0.0, 1.0} and codes.shape == (48, 8)
    both = get_encoder("darn")(epochs=1, features="both", layers=(8, 4), baseline_hidden=8).fit(corpus)
    matrix = both.encode(corpus).matrix
    assert matrix.shape == (48, 24) and both.output_dim == 24
    probs, binary = matrix[:, :12], matrix[:, 12:]
    assert ((probs >= 0) & (probs <= 1)).all() and set(np.unique(binary)) <= {0.0, 1.0}
    np.testing.assert_array_equal(binary, (probs > 0.5).astype(np.float32))  # the greedy code


def test_darn_bound_falls_and_importance_sampling_is_tighter():
    corpus = tiny_images(n_items=48)
    encoder = get_encoder("darn")(epochs=6, lr=3e-3, **TINY_DARN).fit(corpus)
    losses = [record["loss"] for record in encoder.history]
    assert losses[-1] < losses[0] - 10, losses  # nats per 144-pixel image
    figures = encoder.evaluate(corpus)
    assert figures["nll_is_nats"] <= figures["nll_bound_nats"]
    assert figures["nll_bound_nats"] < 144 * np.log(2)  # beats coding every pixel with a fair coin
    assert encoder.evaluate(corpus) == figures  # seeded


def test_darn_with_deterministic_hidden_layers(tmp_path):
    corpus = tiny_images(n_items=48)
    encoder = get_encoder("darn")(epochs=6, lr=3e-3, deterministic_hidden=16, features="both", **TINY_DARN).fit(corpus)
    module = encoder.module
    paths = [layer.cond for layer in [*module.encoder, *module.decoder]]
    assert all(isinstance(path, torch.nn.Sequential) and path[0].out_features == 16 for path in paths)
    assert module.prior.cond is None
    losses = [record["loss"] for record in encoder.history]
    assert losses[-1] < losses[0] - 10, losses
    matrix = encoder.encode(corpus).matrix
    probs, codes = matrix[:, :8], matrix[:, 8:]
    assert matrix.shape == (96, 16) and set(np.unique(codes)) <= {0.0, 1.0}  # one row per frame
    np.testing.assert_array_equal(codes, (probs > 0.5).astype(np.float32))
    encoder.save(tmp_path / "darn")
    loaded = Encoder.load(tmp_path / "darn")
    assert loaded.config.deterministic_hidden == 16
    np.testing.assert_array_equal(loaded.encode(corpus).matrix, matrix)
    assert loaded.evaluate(corpus) == encoder.evaluate(corpus)


def test_sampled_binarisation_depends_on_the_image_only():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 1, 6, 6), dtype=np.uint8)
    binary = binarize_images(images, "sample", seed=0)
    np.testing.assert_array_equal(binarize_images(images[::-1], "sample", seed=0), binary[::-1])
    assert abs(binary.mean() - images.mean() / 255) < 0.03
    np.testing.assert_array_equal(binarize_images(images, "threshold", 0), (images >= 128).reshape(50, -1))


# ---------------------------------------------------------------- Neural Statistician
def test_pad_sets_subsamples_without_padding_leaks():
    offsets = np.array([0, 3, 3, 8])
    rows, mask = pad_sets(offsets, np.array([0, 1, 2]), max_size=4, rng=np.random.default_rng(0))
    assert rows.shape == (3, 4) and mask.sum(1).tolist() == [3, 0, 4]
    assert set(rows[2][mask[2]]) <= set(range(3, 8)) and len(set(rows[2][mask[2]])) == 4
    rows, mask = pad_sets(offsets, np.array([2, 0]))
    assert rows[0].tolist() == [3, 4, 5, 6, 7] and mask.sum(1).tolist() == [5, 3]


def test_dataset_bound_counts_the_context_kl_once_per_set_and_ignores_padding():
    torch.manual_seed(0)
    model = NeuralStatistician(n_in=5, hidden=8, context_dim=3, latent_dim=2, likelihood="gaussian")
    x = torch.randn(2, 4, 5)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    terms = model.bound_terms(x, mask, torch.Generator().manual_seed(1))
    _assert_close(terms["neg_bound"], terms["reconstruction"] + terms["kl_z"] + terms["kl_c"])
    assert (terms["kl_c"] > 0).all()
    garbage = x.clone()
    garbage[~mask] = 1e3  # padding must not move the context or the bound
    again = model.bound_terms(garbage, mask, torch.Generator().manual_seed(1))
    _assert_close(again["neg_bound"], terms["neg_bound"])
    mean, _ = model.context(x, mask)
    _assert_close(mean[1], model.context(x[1:2, :2], mask[1:2, :2])[0][0])


def test_item_encoder_gives_one_context_per_item_and_its_bound_falls():
    corpus = tiny_images(n_items=32, frames_per_item=3)
    encoder = get_encoder("neural-statistician")(epochs=6, hidden=32, context_dim=4, latent_dim=4, batch_size=8,
                                                 lr=3e-3, seed=0).fit(corpus)
    assert encoder.history[-1]["loss"] < encoder.history[0]["loss"] - 5
    components = encoder.encode(corpus)
    assert components.matrix.shape == (32, 4) and np.diff(components.offsets).tolist() == [1] * 32
    empty = ImageCorpus(corpus.images[:3], np.array([0, 3, 3]), ["a", "b"])  # item b has no frames
    assert np.diff(encoder.encode(empty).offsets).tolist() == [1, 0]
    frames = get_encoder("neural-statistician")(epochs=1, features="frames", hidden=16, context_dim=4,
                                                latent_dim=3).fit(corpus).encode(corpus)
    assert frames.matrix.shape == (96, 3)
    figures = encoder.evaluate(corpus)
    assert figures["kl_c"] > 0 and np.isfinite(figures["nll_bound_nats"])


def _planted_histories(n_users: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Users whose 2-6 consumed item vectors all come from one of three planted classes."""
    centres = rng.normal(0.0, 2.0, size=(3, 6))
    items = np.concatenate([centres[c] + rng.normal(0.0, 1.0, size=(40, 6)) for c in range(3)])
    classes = rng.integers(0, 3, size=n_users)
    sizes = rng.integers(2, 7, size=n_users)
    sets = [items[cls * 40 + rng.choice(40, size=size, replace=False)] for cls, size in zip(classes, sizes, strict=True)]
    return sets, classes


def test_user_profiles_separate_users_of_different_planted_classes():
    rng = np.random.default_rng(0)
    train_sets, _ = _planted_histories(240, rng)
    test_sets, classes = _planted_histories(90, rng)
    profiler = SetProfiler(hidden=32, context_dim=4, latent_dim=2, epochs=25, seed=0).fit(train_sets)
    assert profiler.history[-1] < profiler.history[0]
    profiles = profiler.profile(test_sets)
    assert profiles.shape == (90, 4)
    centroids = np.stack([profiles[classes == c].mean(0) for c in range(3)])
    nearest = np.linalg.norm(profiles[:, None] - centroids[None], axis=2).argmin(1)
    assert (nearest == classes).mean() > 0.9
    np.testing.assert_array_equal(profiler.profile(test_sets[:5]), profiles[:5])  # deterministic, per set
    with pytest.raises(ValueError, match="set 1 has shape"):
        profiler.profile([test_sets[0], np.zeros((0, 6))])


def test_user_profiler_save_load_gives_identical_profiles(tmp_path):
    rng = np.random.default_rng(1)
    train_sets, _ = _planted_histories(40, rng)
    test_sets, _ = _planted_histories(10, rng)
    profiler = SetProfiler(hidden=16, context_dim=3, latent_dim=2, epochs=2, seed=3).fit(train_sets)
    profiler.save(tmp_path / "profiler")
    loaded = SetProfiler.load(tmp_path / "profiler")
    np.testing.assert_array_equal(loaded.profile(test_sets), profiler.profile(test_sets))
    assert (loaded.hidden, loaded.context_dim, loaded.seed, loaded.history) == (16, 3, 3, profiler.history)
    with pytest.raises(ValueError, match="fitted on vectors of dim 6, got dim 5"):
        loaded.profile([np.zeros((2, 5))])
    with pytest.raises(RuntimeError, match="not fitted"):
        SetProfiler().save(tmp_path / "unfitted")
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        SetProfiler.load(tmp_path / "unfitted")
