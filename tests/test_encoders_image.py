"""Properties that make PixelCNN, PixelRNN and the backbone what they are.

Causality is checked exactly: the gradient of every output of pixel k (each logit of each colour)
with respect to the input at pixels k, k+1, ... (and at pixel k's own and later colours) is zero,
and the model's probabilities over every binary image of a tiny size sum to one.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import Encoder, ImageCorpus, get_encoder
from encoders._image import AutoregressiveNet, binarize, sample_binarized
from encoders.pixelrnn import skew, unskew

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
TINY = {"hidden": 6, "n_layers": 2, "head_channels": 6}
AUTOREGRESSIVE = [
    ("pixelcnn", {}),
    ("pixelcnn", {"gated": True}),
    ("row-lstm", {}),
    ("diagonal-bilstm", {}),
]
IDS = ["pixelcnn", "gated-pixelcnn", "row-lstm", "diagonal-bilstm"]


def untrained(name: str, shape: tuple[int, int, int], **options) -> AutoregressiveNet:
    """The network of ``name`` for images ``(colors, h, w)``, built by a zero-epoch fit."""
    images = np.zeros((2, *shape), dtype=np.uint8)
    encoder = get_encoder(name)(epochs=0, seed=0, **{**TINY, **options})
    return encoder.fit(ImageCorpus.single_images(images)).module  # type: ignore[return-value]


def input_gradients(net: AutoregressiveNet, shape: tuple[int, int, int], output: str) -> torch.Tensor:
    """``|d logit / d input|`` for every output of every pixel, one backward pass.

    Returns ``(pixels, colors, n_values, colors_in, pixels_in)``: the gradient of the logit of value
    ``v`` (1 value for Bernoulli, 256 for softmax) of colour ``c`` at a pixel, in raster order.
    """
    colors, height, width = shape
    n_values = 1 if output == "bernoulli" else 256
    n_pixels = height * width
    torch.manual_seed(0)
    # Batch element b asks for one output; elements are independent, so one backward gives all.
    x = torch.rand(1, *shape).repeat(n_pixels * colors * n_values, 1, 1, 1).requires_grad_(True)
    logits, _ = net(x)
    logits = logits.view(len(x), n_values, colors, height, width)
    b = torch.arange(len(x))
    pixel, colour, value = b // (colors * n_values), (b // n_values) % colors, b % n_values
    logits[b, value, colour, pixel // width, pixel % width].sum().backward()
    return x.grad.abs().view(n_pixels, colors, n_values, colors, n_pixels)


@pytest.mark.parametrize(("name", "options"), AUTOREGRESSIVE, ids=IDS)
@pytest.mark.parametrize(
    ("shape", "output"), [((1, 7, 7), "bernoulli"), ((3, 6, 6), "bernoulli"), ((1, 3, 3), "softmax256")], ids=["gray", "rgb", "softmax"]
)
def test_no_output_sees_its_own_or_a_later_pixel(name, options, shape, output):
    net = untrained(name, shape, output=output, **options)
    grads = input_gradients(net, shape, output)
    colors, n_pixels = shape[0], shape[1] * shape[2]
    for pixel, colour in itertools.product(range(n_pixels), range(colors)):
        seen = grads[pixel, colour]  # (n_values, colors_in, pixels_in)
        assert torch.all(seen[:, :, pixel + 1 :] == 0), f"pixel {pixel} colour {colour} sees a later pixel"
        assert torch.all(seen[:, colour:, pixel] == 0), f"pixel {pixel} colour {colour} sees its own or a later colour"
        if pixel > 0:
            assert seen[:, :, :pixel].sum() > 0, f"pixel {pixel} sees no earlier pixel"
    # Colour c reads colours < c of its own pixel (a single pixel may miss it through dead ReLUs).
    same_pixel = grads[torch.arange(n_pixels), :, :, :, torch.arange(n_pixels)]  # (pixels, colors, n_values, colors_in)
    for colour in range(1, colors):
        assert same_pixel[:, colour, :, :colour].sum() > 0, f"colour {colour} never reads the earlier colours"


@pytest.mark.parametrize("n_layers", [1, 2])
def test_diagonal_bilstm_sees_the_whole_causal_context(n_layers):
    """Left-to-right covers everything above-left, the shifted right-to-left direction everything
    above-right: every earlier pixel is seen, already with one layer. One exception is inherent
    to the paper's shift: the last pixel of the previous row, (i-1, W-1), reaches the right-to-left
    direction only through a feature at a later position of row i-1, which does not exist; it is
    seen only when the 7x7 first layer covers it (j >= W - 4)."""
    height = width = 6
    grads = input_gradients(untrained("diagonal-bilstm", (1, height, width), n_layers=n_layers), (1, height, width), "bernoulli")
    for pixel in range(height * width):
        row, col = divmod(pixel, width)
        expected = np.arange(height * width) < pixel
        if row > 0 and col < width - 4:
            expected[row * width - 1] = False
        np.testing.assert_array_equal((grads[pixel, 0, 0, 0] > 0).numpy(), expected, err_msg=f"pixel {(row, col)}")


def test_gated_pixelcnn_has_no_blind_spot():
    """Plain PixelCNN (7x7 mask A + one 3x3 mask-B block) cannot see pixel (5, 10) from (6, 6) of a
    12x12 image, up and right of it; the gated stacks with the same kernels can."""
    shape, target, blind = (1, 12, 12), 6 * 12 + 6, 5 * 12 + 10
    plain = input_gradients(untrained("pixelcnn", shape, n_layers=1), shape, "bernoulli")
    gated = input_gradients(untrained("pixelcnn", shape, n_layers=1, gated=True), shape, "bernoulli")
    assert plain[target, 0, 0, 0, blind] == 0
    assert gated[target, 0, 0, 0, blind] > 0
    rows_above = [r * 12 + c for r in range(2, 6) for c in range(2, 11)]  # the 4 rows above, 4 columns each side
    assert torch.all(gated[target, 0, 0, 0, rows_above] > 0)


@pytest.mark.parametrize(("name", "options"), AUTOREGRESSIVE, ids=IDS)
@pytest.mark.parametrize("shape", [(1, 3, 3), (3, 2, 2)], ids=["gray-3x3", "rgb-2x2"])
def test_probabilities_of_all_binary_images_sum_to_one(name, options, shape):
    """Only a properly causal model is a normalised distribution over images."""
    bits = int(np.prod(shape))
    every_image = (np.array(list(itertools.product([0, 255], repeat=bits)), dtype=np.uint8)).reshape(-1, *shape)
    encoder = get_encoder(name)(epochs=0, seed=0, batch_size=4096, **{**TINY, **options})
    corpus = ImageCorpus.single_images(every_image)
    nll = encoder.fit(corpus).nll_per_image(corpus)
    assert np.exp(-nll.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-4)


def test_skew_and_unskew_invert_each_other():
    x = torch.randn(2, 3, 5, 7)
    skewed = skew(x)
    assert skewed.shape == (2, 3, 5, 11)
    assert torch.equal(unskew(skewed), x)
    for row in range(5):  # row i moves i to the right; the rest is zeros
        assert torch.equal(skewed[:, :, row, row : row + 7], x[:, :, row])
        assert not skewed[:, :, row, :row].any() and not skewed[:, :, row, row + 7 :].any()
    tall = torch.randn(1, 1, 9, 4)
    assert torch.equal(unskew(skew(tall)), tall)


def _digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[:n] * (255 / 16)).round().astype(np.uint8)


@pytest.mark.parametrize(("name", "options"), AUTOREGRESSIVE, ids=IDS)
def test_loss_falls_on_digits(name, options):
    corpus = ImageCorpus.single_images(_digits(320))
    encoder = get_encoder(name)(epochs=3, batch_size=32, max_steps_per_epoch=5, lr=1e-2, seed=0, hidden=8, n_layers=1, **options)
    before = get_encoder(name)(epochs=0, seed=0, hidden=8, n_layers=1, **options).fit(corpus).evaluate(corpus)["nll_nats"]
    encoder.fit(corpus)
    losses = [record["loss"] for record in encoder.history]
    assert losses[-1] < 0.85 * losses[0], losses
    assert encoder.evaluate(corpus)["nll_nats"] < 0.8 * before


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["pixelcnn", "diagonal-bilstm"])
def test_loss_falls_on_binarised_mnist(name):
    if not MNIST.is_file():
        pytest.skip(f"{MNIST} is absent (shared data)")
    from acfrec.datasets.catalogue import load_mnist_idx

    images, _ = load_mnist_idx(MNIST)
    corpus = ImageCorpus.single_images(sample_binarized(images[:200], seed=0))
    encoder = get_encoder(name)(epochs=3, batch_size=16, max_steps_per_epoch=5, lr=1e-2, seed=0, hidden=8, n_layers=1)
    losses = [record["loss"] for record in encoder.fit(corpus).history]
    assert losses[-1] < 0.85 * losses[0], losses
    assert encoder.evaluate(corpus)["nll_nats"] < 0.8 * losses[0]


def test_binarisation():
    images = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    assert binarize(images).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    sampled = sample_binarized(np.full((200, 200), 64, dtype=np.uint8), seed=1)
    assert set(np.unique(sampled)) == {0, 255} and abs((sampled > 0).mean() - 64 / 255) < 0.01
    assert np.array_equal(sample_binarized(sampled, seed=2), sampled)  # binary stays binary


@pytest.mark.parametrize(("components", "per_image"), [("regions", 6), ("frames", 1)])
def test_components_are_grid_regions_or_frames(components, per_image):
    images = _digits(10).reshape(5, 2, 8, 8)[:, :, None]  # 5 items of 2 frames
    corpus = ImageCorpus(images.reshape(10, 1, 8, 8), np.arange(0, 11, 2), [f"v{k}" for k in range(5)])
    encoder = get_encoder("pixelcnn")(epochs=1, max_steps_per_epoch=1, components=components, grid=(2, 3), **TINY).fit(corpus)
    out = encoder.encode(corpus)
    assert np.diff(out.offsets).tolist() == [2 * per_image] * 5
    assert out.matrix.shape == (10 * per_image, encoder.output_dim)
    assert encoder.modality == ("frames" if components == "frames" else "image")
    if components == "frames":  # a frame's vector is the mean of its feature map
        with torch.no_grad():
            features = encoder.module.body(binarize(corpus.images[:1]))
        np.testing.assert_allclose(out.matrix[0], features.mean((2, 3))[0].numpy(), rtol=1e-5, atol=1e-6)


def test_bad_options_and_inputs_are_clear_errors():
    corpus = ImageCorpus.single_images(_digits(4))
    with pytest.raises(ValueError, match="output must be one of"):
        get_encoder("pixelcnn")(epochs=0, output="gaussian").fit(corpus)
    with pytest.raises(ValueError, match="components must be one of"):
        get_encoder("row-lstm")(epochs=0, components="pixels").fit(corpus)
    trained = get_encoder("pixelcnn")(epochs=0, **TINY).fit(corpus)
    with pytest.raises(ValueError, match=r"trained on images \[1, 8, 8\]"):
        trained.encode(ImageCorpus.single_images(np.zeros((2, 1, 9, 9), np.uint8)))


# ---------------------------------------------------------------------------- backbone
def _backbone_corpus() -> ImageCorpus:
    return ImageCorpus.single_images(_digits(6))


def test_backbone_refuses_to_run_without_weights_or_the_flag():
    with pytest.raises(ValueError, match="weights_path.*allow_random_weights"):
        get_encoder("backbone")(resize=32).fit(_backbone_corpus())
    with pytest.raises(FileNotFoundError, match="no-such-file.pth"):
        get_encoder("backbone")(resize=32, weights_path="/nonexistent/no-such-file.pth").fit(_backbone_corpus())


def test_backbone_random_weights_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="encoders.backbone"):
        encoder = get_encoder("backbone")(resize=32, allow_random_weights=True).fit(_backbone_corpus())
    assert "RANDOM weights" in caplog.text
    assert encoder.extra["random_weights"] is True
    assert encoder.evaluate(_backbone_corpus())["random_weights"] == 1.0


def test_backbone_loads_weights_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    corpus = _backbone_corpus()
    encoder = get_encoder("backbone")(resize=32, weights_path=str(tmp_path / "resnet18.pth"), grid=(1, 1)).fit(corpus)
    assert encoder.extra["random_weights"] is False and encoder.output_dim == 512
    assert encoder.evaluate(corpus)["random_weights"] == 0.0
    # The component is ResNet-18's own pooled feature (its fc input) on the normalised image.
    x = torch.as_tensor(corpus.images).float().div(255).expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = reference(x).numpy()
    np.testing.assert_allclose(encoder.encode(corpus).matrix, expected, rtol=1e-4, atol=1e-5)
    # The saved encoder holds the weights: the file is no longer needed.
    (tmp_path / "resnet18.pth").unlink()
    encoder.save(tmp_path / "enc")
    np.testing.assert_array_equal(Encoder.load(tmp_path / "enc").encode(corpus).matrix, encoder.encode(corpus).matrix)


def test_backbone_rejects_a_weights_file_of_another_model(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth does not match"):
        get_encoder("backbone")(resize=32, weights_path=str(tmp_path / "other.pth")).fit(_backbone_corpus())
