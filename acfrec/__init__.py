"""acfrec: Attentive Collaborative Filtering for multimedia catalogues.

Content-aware attention recommenders and baselines, leave-one-out evaluation (full ranking and
sampled), MLflow tracking and FAISS serving. The names below are imported on first use, so
``import acfrec`` stays cheap (no torch or mlflow until needed)::

    import acfrec
    interactions = acfrec.read_interactions("ml-100k.inter")
    split = acfrec.leave_one_out(interactions)
    model = acfrec.get_model("bpr-mf")(dim=32, epochs=10).fit(split)
    print(acfrec.evaluate(model, split).table())
    rec = acfrec.load("runs/bpr-mf")     # a saved model folder or an MLflow URI, served by external ids
    rec.recommend(users=["196"], k=10)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "read_interactions": "acfrec.data.io",
    "Interactions": "acfrec.data.interactions",
    "leave_one_out": "acfrec.data.splitting",
    "Split": "acfrec.data.split",
    "IdMap": "acfrec.data.idmap",
    "get_model": "acfrec.models",
    "available_models": "acfrec.models",
    "Recommender": "acfrec.models",
    "evaluate": "acfrec.eval",
    "EvalResult": "acfrec.eval",
    "compare": "acfrec.eval",
    "format_table": "acfrec.eval",
    "planted_interactions": "acfrec.datasets",
    "Tracker": "acfrec.tracking",
    "load_run_config": "acfrec.config",
    "load": "acfrec.api",
    "RecommenderService": "acfrec.api",
    "RunConfig": "acfrec.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'acfrec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
