"""A frozen torchvision backbone (ResNet-18 by default) as a region-feature extractor.

The backbone's last convolutional feature map, average-pooled to ``grid`` cells, gives the region
components of each image (or, with ``components="frames"``, one vector per frame). Weights come
from a local file the user names (``weights_path``: a ``state_dict`` saved with ``torch.save``,
e.g. torchvision's released ``resnet18-f37072fd.pth``); nothing is ever downloaded. Random weights
are used only with ``allow_random_weights=True``: a warning is logged and ``extra`` (hence
``meta.json``, ``evaluate`` and every saved encoder) records ``random_weights: true``.

Frozen means ``trainable = False``: :meth:`fit` builds the network and loads the weights, and
trains nothing (no epochs, no checkpoints, an empty history). :meth:`evaluate` reports feature
statistics instead of a likelihood.

Images are scaled to ``[0, 1]``, one-channel images repeated to three channels, resized to
``resize`` pixels (0 keeps their size) and normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders._image import (
    check_output,
    component_grid,
    component_modality,
    encode_regions,
    image_chunks,
    require_images,
)
from encoders.base import Encoder, EncoderConfig, modality_from_config, register
from encoders.corpus import Components, Corpus

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneConfig(EncoderConfig):
    arch: str = "resnet18"  # any torchvision classification model with .features or ResNet's layer4
    weights_path: str = ""  # local state_dict file; required unless allow_random_weights
    allow_random_weights: bool = False  # explicit opt-in to an untrained backbone (logged, recorded)
    resize: int = 224  # square input side in pixels; 0 keeps the corpus' image size
    components: str = "regions"  # "regions": grid cells of each image; "frames": one vector per image
    grid: tuple[int, int] = (2, 2)  # (rows, cols) of region pooling
    epochs: int = 1  # unused: a frozen backbone is never trained


def torchvision_model(arch: str) -> nn.Module:
    """An untrained torchvision classification model by name (never downloads)."""
    import torchvision

    try:
        return torchvision.models.get_model(arch, weights=None)
    except ValueError as error:
        raise ValueError(f"unknown torchvision model {arch!r}: {error}") from error


def feature_extractor(model: nn.Module, arch: str) -> nn.Module:
    """The convolutional trunk of ``model``: ``(n, 3, H, W) -> (n, dim, H', W')``."""
    if hasattr(model, "layer4"):  # ResNet / ResNeXt / wide ResNet: everything before avgpool and fc
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        return nn.Sequential(*(getattr(model, name) for name in names))
    if isinstance(getattr(model, "features", None), nn.Module):  # VGG, DenseNet, MobileNet, EfficientNet, ConvNeXt...
        return model.features
    raise ValueError(f"{arch}: cannot find the last feature map (neither .layer4 nor .features)")


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a ``state_dict`` file into ``model``; errors name the file and the mismatched keys."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors of many kinds
        raise ValueError(f"cannot read backbone weights {path}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the model's parameters: {error}") from error


class Normalised(nn.Module):
    """uint8-scaled input ``(n, c, H, W)`` in [0, 1] -> ImageNet-normalised 3-channel trunk features."""

    def __init__(self, trunk: nn.Module, resize: int) -> None:
        super().__init__()
        self.trunk, self.resize = trunk, resize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return self.trunk((x - self.mean) / self.std)


@register("backbone")
class BackboneEncoder(Encoder):
    """Region features of a frozen, pre-trained torchvision backbone."""

    modality = modality_from_config(component_modality)  # type: ignore[assignment]
    config_class: ClassVar[type[EncoderConfig]] = BackboneConfig
    trainable: ClassVar[bool] = False
    config: BackboneConfig
    test_overrides: ClassVar[dict] = {"allow_random_weights": True, "resize": 32}

    @property
    def output_dim(self) -> int:
        if "output_dim" not in self.extra:
            raise RuntimeError(f"{self.name} encoder is not fitted: call fit() or load() first")
        return int(self.extra["output_dim"])

    def _network(self, weights: Path | None) -> nn.Module:
        """The normalising wrapper around the trunk; ``weights`` fill the whole torchvision model."""
        cfg = self.config
        check_output("bernoulli", cfg.components, cfg.grid)
        model = torchvision_model(cfg.arch)
        if weights is not None:
            load_weights(model, weights)
        network = Normalised(feature_extractor(model, cfg.arch), cfg.resize)
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        return network.eval()

    def _build(self, corpus: Corpus) -> nn.Module:
        images = require_images(corpus, self.name)
        if images.image_shape[0] not in (1, 3):
            raise ValueError(f"{self.name} takes 1- or 3-channel images, got shape {images.image_shape}")
        cfg = self.config
        if not cfg.weights_path and not cfg.allow_random_weights:
            raise ValueError(
                f"{self.name}: no weights for {cfg.arch}: set weights_path to a local state_dict file "
                "(nothing is downloaded), or allow_random_weights=True to use an untrained network on purpose"
            )
        if not cfg.weights_path:
            logger.warning("%s: %s has RANDOM weights (allow_random_weights=True): its features are not pre-trained", self.name, cfg.arch)
        network = self._network(Path(cfg.weights_path) if cfg.weights_path else None)
        with torch.no_grad():
            probe = network(torch.zeros(1, *images.image_shape))
        self.extra = {
            "arch": cfg.arch,
            "random_weights": not cfg.weights_path,
            "weights_file": Path(cfg.weights_path).name if cfg.weights_path else None,
            "output_dim": int(probe.shape[1]),
        }
        return network

    def _build_from_extra(self) -> nn.Module:
        return self._network(None)  # the saved state dict supplies the weights

    def _features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``(b, c, H, W)`` -> trunk feature map ``(b, dim, H', W')``."""
        x = torch.as_tensor(images).float().div(255.0).to(self.device)
        return self._require_module()(x)

    def _encode(self, corpus: Corpus) -> Components:
        images = require_images(corpus, self.name)
        grid = component_grid(self.config.components, tuple(self.config.grid))  # type: ignore[arg-type]
        return encode_regions(images, self._features, grid, self.config.batch_size)

    def evaluate(self, corpus: Corpus) -> dict[str, float]:
        """Feature statistics of the region components (there is no likelihood to report)."""
        images = require_images(corpus, self.name)
        module = self._require_module()
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                maps = torch.cat([self._features(images.images[rows]).cpu() for rows in image_chunks(len(images.images), self.config.batch_size)])
        finally:
            module.train(was_training)
        pooled = F.adaptive_avg_pool2d(maps, 1).flatten(1)  # (n_images, dim)
        return {
            "feature_mean": float(maps.mean()),
            "feature_std": float(maps.std()),
            "zero_fraction": float((maps == 0).float().mean()),
            "image_vector_norm": float(pooled.norm(dim=1).mean()),
            "random_weights": float(bool(self.extra.get("random_weights"))),
        }
