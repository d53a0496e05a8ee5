"""Models: one file per model, all of the :class:`~acfrec.models.base.Recommender` shape."""

import acfrec.models.acf  # noqa: F401  (registers the model)
import acfrec.models.bprmf  # noqa: F401  (registers the model)
import acfrec.models.fism  # noqa: F401  (registers the model)
import acfrec.models.implicit_models  # noqa: F401  (registers als, implicit-bpr)
import acfrec.models.itempop  # noqa: F401  (registers the model)
import acfrec.models.svdpp  # noqa: F401  (registers the model)
from acfrec.models.base import (
    ModelConfig,
    Recommender,
    TorchConfig,
    TorchRecommender,
    TrainData,
    available_models,
    get_model,
    register,
)

__all__ = [
    "ModelConfig",
    "Recommender",
    "TorchConfig",
    "TorchRecommender",
    "TrainData",
    "available_models",
    "get_model",
    "register",
]
