"""Models: one file per model, all of the :class:`~acfrec.models.base.Recommender` shape."""

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
