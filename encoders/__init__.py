"""Content encoders: self-supervised models that turn raw items (images, video frames, texts)
into component features for acfrec's component store. Depends on torch/torchvision only.

Every module of this package that defines an encoder registers it with
``@register("name")``; importing the package imports them all, so ``get_encoder(name)`` finds
them. A new encoder is one file here.
"""

from __future__ import annotations

import importlib
import pkgutil

from encoders.base import Encoder, EncoderConfig, available_encoders, get_encoder, register
from encoders.corpus import Components, Corpus, ImageCorpus, TextCorpus

_SUPPORT_MODULES = {"base", "corpus"}

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _SUPPORT_MODULES and not _module.startswith("_"):
        importlib.import_module(f"encoders.{_module}")

__all__ = [
    "Components",
    "Corpus",
    "Encoder",
    "EncoderConfig",
    "ImageCorpus",
    "TextCorpus",
    "available_encoders",
    "get_encoder",
    "register",
]
