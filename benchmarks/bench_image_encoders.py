"""Held-out NLL (nats per image) of the image encoders on binarised MNIST, beside published figures.

Data: the 10,000 MNIST test images in ``../shared/data/mnist`` (the only MNIST part shipped),
binarised stochastically (each pixel on with probability value/255, one fixed sample per image,
seed 0, as in the standard binarised MNIST; ``--binarize threshold`` thresholds at 128 instead),
shuffled with seed 0, the first 9,000 for training and the last 1,000 held out.

Every model trains for a budget of *process CPU seconds* (``--budget``, one torch thread), in
chunks of ``--steps`` optimiser steps resumed from the encoder's own checkpoint, then its held-out
NLL is measured. CPU time rather than wall time because the machine is shared. The published
figures (PixelRNN paper, Table 4) were trained on all 60,000 training images for days on GPUs, so
ours are higher; the ordering is what the table can show.

Rows are :data:`MODELS`, a list of ``(name, factory, published)``; a registered ``darn``
encoder is added automatically. Run::

    python benchmarks/bench_image_encoders.py [--budget 150] [--steps 50] [--only pixelcnn,row-lstm]

Measured (``--budget 90 --steps 20``, stochastic binarisation, a shared 2-core machine at a load
of about 10; held-out NLL in nats per image, published figures from 60k training images):

    independent-bernoulli 204.57 | pixelcnn 99.76 (30,080 images seen) | gated pixelcnn 99.63
    (7,040) | row-lstm 98.22 (10,240) | diagonal-bilstm 99.70 (4,480; paper 79.20) | darn 117.17
    (its default config, 238,000 images; paper 84.13) | NADE (paper) 88.33

90 CPU seconds is a fraction of one epoch for the PixelRNNs: the three autoregressive
convolutional/recurrent models are still budget-bound and within ~1.5 nats of each other.
With ``--budget 240`` (load lower): pixelcnn 94.63 (142,080 images seen), diagonal-bilstm 93.21
(15,360): the Diagonal BiLSTM pulls ahead on far fewer images, the paper's ordering. CPU seconds
buy fewer steps under heavy load (shared cores), so images-seen differ between runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import ImageCorpus, available_encoders, get_encoder  # noqa: E402
from encoders._image import sample_binarized  # noqa: E402

DEFAULT_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
# The PixelRNN paper's Table 4 (binarised MNIST, nats): NADE 88.33, DARN 84.13, Diagonal BiLSTM 79.20.
PUBLISHED = {"nade": 88.33, "darn": 84.13, "diagonal-bilstm": 79.20}
# Preference order of the likelihood keys the encoders' evaluate() reports.
NLL_KEYS = ("nll_nats", "nll_is_nats", "nll_bound_nats")


class IndependentBernoulli:
    """Baseline: every pixel an independent Bernoulli with its training marginal (add-one smoothed)."""

    name = "independent-bernoulli"

    def __init__(self) -> None:
        self.on: np.ndarray | None = None
        self.history: list[dict[str, float]] = []

    def fit(self, corpus: ImageCorpus, **_: Any) -> IndependentBernoulli:
        pixels = corpus.images >= 128
        self.on = (pixels.sum(0) + 1.0) / (pixels.shape[0] + 2.0)
        return self

    def evaluate(self, corpus: ImageCorpus) -> dict[str, float]:
        pixels = corpus.images >= 128
        log_p = np.where(pixels, np.log(self.on), np.log1p(-self.on))
        return {"nll_nats": float(-log_p.reshape(len(pixels), -1).sum(1).mean())}


def encoder_factory(name: str, **options: Any) -> Callable[[int], Any]:
    """A factory of a registered encoder with ``options`` (the step chunk is set by the runner)."""
    return lambda steps: get_encoder(name)(max_steps_per_epoch=steps, num_threads=1, seed=0, **options)


MODELS: list[tuple[str, Callable[[int], Any], float | None]] = [
    ("independent-bernoulli", lambda steps: IndependentBernoulli(), None),
    ("pixelcnn", encoder_factory("pixelcnn", hidden=16, n_layers=4, head_channels=32, batch_size=32, lr=2e-3), None),
    ("pixelcnn (gated)", encoder_factory("pixelcnn", gated=True, hidden=16, n_layers=4, head_channels=32, batch_size=32, lr=2e-3), None),
    ("row-lstm", encoder_factory("row-lstm", hidden=16, n_layers=2, head_channels=32, batch_size=32, lr=2e-3), None),
    ("diagonal-bilstm", encoder_factory("diagonal-bilstm", hidden=16, n_layers=2, head_channels=32, batch_size=32, lr=2e-3), PUBLISHED["diagonal-bilstm"]),
]


def models() -> list[tuple[str, Callable[[int], Any], float | None]]:
    rows = list(MODELS)
    if "darn" in available_encoders() and not any(name == "darn" for name, _, _ in rows):
        rows.append(("darn", encoder_factory("darn"), PUBLISHED["darn"]))
    return rows


def mnist_split(folder: Path, binarize: str) -> tuple[ImageCorpus, ImageCorpus]:
    from acfrec.datasets.catalogue import load_mnist_idx

    images, _ = load_mnist_idx(folder / "t10k-images-idx3-ubyte.gz")
    images = sample_binarized(images, seed=0) if binarize == "sample" else ((images >= 128) * 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    return ImageCorpus.single_images(images[order[:9000]]), ImageCorpus.single_images(images[order[9000:]])


def held_out_nll(figures: dict[str, float]) -> float:
    for key in NLL_KEYS:
        if key in figures:
            return figures[key]
    raise KeyError(f"no likelihood among {sorted(figures)}")


def train_within(factory: Callable[[int], Any], train: ImageCorpus, budget: float, steps: int, folder: Path) -> tuple[Any, dict]:
    """Chunks of ``steps`` steps (one "epoch" each, resumed from the checkpoint) until ``budget``
    CPU seconds are spent. Returns the model and {cpu_s, wall_s, steps}."""
    model = factory(steps)
    if isinstance(model, IndependentBernoulli):
        cpu, wall = time.process_time(), time.perf_counter()
        model.fit(train)
        return model, {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, "images": 0}
    cpu, wall, epoch = time.process_time(), time.perf_counter(), 0
    while time.process_time() - cpu < budget:
        epoch += 1
        model = factory(steps)
        model.config.epochs = epoch
        model.fit(train, checkpoint_dir=folder)
    return model, {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, "images": epoch * steps * model.config.batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--budget", type=float, default=150.0, help="CPU seconds of training per model")
    parser.add_argument("--steps", type=int, default=50, help="optimiser steps between budget checks")
    parser.add_argument("--binarize", choices=("sample", "threshold"), default="sample")
    parser.add_argument("--only", default="", help="comma-separated row names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = mnist_split(args.mnist, args.binarize)
    print(f"binarised MNIST ({args.binarize}): train {train.n_items}, held out {test.n_items}; budget {args.budget:.0f} CPU s per model, 1 thread")
    wanted = set(filter(None, args.only.split(",")))
    rows = []
    for name, factory, published in models():
        if wanted and name not in wanted:
            continue
        with tempfile.TemporaryDirectory() as folder:
            model, cost = train_within(factory, train, args.budget, args.steps, Path(folder))
        cpu = time.process_time()
        nll = held_out_nll(model.evaluate(test))
        train_nll = model.history[-1].get("nll_nats", float("nan")) if model.history else float("nan")
        rows.append((name, nll, published, cost, train_nll, time.process_time() - cpu))
        print(f"  {name}: {nll:.2f} nats ({cost['images']} training images seen, {cost['cpu_s']:.0f} CPU s, {cost['wall_s']:.0f} wall s)", flush=True)
    print()
    print("| model | held-out NLL (nats/image) | published (60k train) | training images seen | train CPU s | wall s | last-chunk train NLL |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, nll, published, cost, train_nll, _ in rows:
        shown = f"{published:.2f}" if published is not None else "-"
        print(f"| {name} | {nll:.2f} | {shown} | {cost['images']} | {cost['cpu_s']:.0f} | {cost['wall_s']:.0f} | {train_nll:.2f} |")
    print(f"| NADE (published only) | - | {PUBLISHED['nade']:.2f} | | | | |")


if __name__ == "__main__":
    main()
