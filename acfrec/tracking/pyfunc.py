"""A saved acfrec model as an MLflow pyfunc model: log it, load it back, serve it.

::

    from acfrec.tracking import Tracker
    from acfrec.tracking.pyfunc import log_recommender

    model.save("runs/bpr-mf")                      # a model fitted on a Split (it keeps the id maps)
    with Tracker().run("bpr-mf") as run:
        uri = log_recommender(run, "runs/bpr-mf")  # "runs:/<run_id>/model"

    import mlflow
    mlflow.set_tracking_uri(Tracker().tracking_uri)   # where the run lives
    served = mlflow.pyfunc.load_model(uri)
    served.predict(pd.DataFrame({"user": ["196", "196"], "item": ["242", "302"]}))   # + column score
    served.predict(pd.DataFrame({"user": ["196", "186"], "k": [10, 5]}))   # user, rank, item, score
    served.predict(pd.DataFrame({"user": ["196"]}), params={"k": 3, "exclude_seen": False})

``acfrec.load(uri)`` loads the same URI as an :class:`acfrec.api.RecommenderService`.

Serving over HTTP (acfrec installed in the serving environment; ``--env-manager local`` uses the
current one)::

    MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db \\
        mlflow models serve -m runs:/<run_id>/model --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_split": {"columns": ["user"], "data": [["196"]]}, "params": {"k": 5}}'

Ids are strings in the signature (``"196"``, not ``196``). The logged model holds the model
folder as an artifact and a pickled :class:`RecommenderModel` that only refers to this module, so
loading it needs acfrec importable (its pip requirements list acfrec's own dependencies; install
acfrec itself from its source).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from acfrec.api import MLFLOW_ARTIFACT_KEY, RecommenderService, model_folder
from acfrec.data.idmap import IdMap
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.tracking.mlflow_tracker import TrackedRun, default_tracking_uri

DEFAULT_K = 10
SIGNATURE = ModelSignature(
    inputs=Schema(
        [ColSpec("string", "user"), ColSpec("string", "item", required=False), ColSpec("long", "k", required=False)]
    ),
    outputs=Schema(
        [
            ColSpec("string", "user"),
            ColSpec("long", "rank", required=False),
            ColSpec("string", "item"),
            ColSpec("float", "score"),
        ]
    ),
    params=ParamSchema([ParamSpec("k", "long", DEFAULT_K), ParamSpec("exclude_seen", "boolean", True)]),
)
# What the served model imports; pinned to the versions it was logged with.
_REQUIREMENTS = ("torch", "numpy", "scipy", "pandas", "polars", "pyarrow", "faiss-cpu", "implicit", "mlflow", "pyyaml")


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of :class:`acfrec.api.RecommenderService`; see :func:`predict_frame`."""

    def load_context(self, context: Any) -> None:
        self.service = RecommenderService.from_path(context.artifacts[MLFLOW_ARTIFACT_KEY])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return predict_frame(self.service, model_input, params)


def predict_frame(service: RecommenderService, frame: pd.DataFrame, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Answer one pyfunc request.

    * columns ``user, item``: the input with a ``score`` column added (pair scoring);
    * column ``user`` (and optional ``k``, per row): top-``k`` per user, a frame ``user, rank,
      item, score`` (rank 0 = top); ``params["k"]`` (default 10) where the column is absent or
      null, ``params["exclude_seen"]`` (default True) drops training items.
    """
    if not isinstance(frame, pd.DataFrame) or "user" not in frame.columns:
        columns = list(frame.columns) if isinstance(frame, pd.DataFrame) else type(frame).__name__
        raise DataValidationError(f"the input must be a DataFrame with a 'user' column, got {columns}")
    params = dict(params or {})
    users = frame["user"].astype(str).tolist()
    if "item" in frame.columns and frame["item"].notna().any():
        scored = service.score_pairs(users, frame["item"].astype(str).tolist())
        return frame.assign(score=scored["score"].to_numpy())
    default_k = int(params.get("k") or DEFAULT_K)
    ks = frame["k"].fillna(default_k).astype(np.int64).to_numpy() if "k" in frame.columns else np.full(len(users), default_k)
    # one request per distinct user, as deep as the largest k asked for it
    wanted = pd.DataFrame({"user": users, "k": ks}).groupby("user", sort=False)["k"].max()
    top = service.recommend(wanted.index.tolist(), k=int(wanted.max()), exclude_seen=bool(params.get("exclude_seen", True)))
    return top[top["rank"].to_numpy() < wanted.reindex(top["user"]).to_numpy()].reset_index(drop=True)


def log_recommender(run: TrackedRun, model_dir: str | Path, artifact_path: str = "model") -> str:
    """Log the saved model folder ``model_dir`` to ``run`` as an MLflow pyfunc model.

    The folder must hold a model fitted on a Split (``users.json`` / ``items.json`` next to
    ``meta.json``). Returns the model URI ``runs:/<run_id>/<artifact_path>`` for
    ``mlflow.pyfunc.load_model`` (with the run's tracking URI set) or ``acfrec.load``.
    """
    model_dir = Path(model_dir)
    missing = [name for name in ("meta.json", "users.json", "items.json") if not (model_dir / name).is_file()]
    if missing:
        raise ArtifactError(
            f"{model_dir} cannot be logged as a servable model: {', '.join(missing)} missing "
            "(save a model fitted on a Split with model.save)"
        )
    example = pd.DataFrame({"user": IdMap.load(model_dir / "users.json").external_ids[:1].tolist()})
    with tempfile.TemporaryDirectory(prefix="acfrec-pyfunc-") as tmp, _quiet_downloads(), _quiet_save():
        local = Path(tmp) / artifact_path.rstrip("/").rsplit("/", 1)[-1]
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=RecommenderModel(),
            artifacts={MLFLOW_ARTIFACT_KEY: str(model_dir.resolve())},
            signature=SIGNATURE,
            input_example=example,  # MLflow checks it against the model once, and shows it with the model
            pip_requirements=_requirements(),
        )
        run.log_artifact(local, artifact_path)
    return f"runs:/{run.run_id}/{artifact_path}"


def download_model(uri: str, destination: str | Path, tracking_uri: str | None = None) -> Path:
    """Download the MLflow model at ``uri`` into ``destination``; returns the acfrec model folder inside it.

    ``models:/<name>/<version>``, ``models:/<name>@<alias>`` and ``models:/<name>/latest`` are
    looked up in the registry of ``tracking_uri`` (MLflow itself would use its global registry).
    """
    store = tracking_uri or default_tracking_uri()
    try:
        if uri.startswith("models:/"):
            uri = _registered_model_source(uri, MlflowClient(tracking_uri=store, registry_uri=store))
        with _quiet_downloads():
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination), tracking_uri=store)
    except mlflow.exceptions.MlflowException as error:
        raise ArtifactError(f"cannot download the MLflow model {uri!r}: {error}") from error
    return model_folder(local)


def _registered_model_source(uri: str, client: MlflowClient) -> str:
    """``models:/name/version``, ``models:/name@alias`` or ``models:/name/latest`` -> the version's artifact URI."""
    name, _, rest = uri[len("models:/") :].strip("/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    elif rest == "latest":
        version = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    elif rest.isdigit():
        version = rest
    else:
        raise ArtifactError(f"{uri!r}: give models:/<name>/<version>, models:/<name>@<alias> or models:/<name>/latest")
    return client.get_model_version_download_uri(name, str(version))


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No per-file progress bar while acfrec copies or downloads a model (an explicit setting wins)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


@contextlib.contextmanager
def _quiet_save() -> Iterator[None]:
    """Hide MLflow's generic notes on saving (cloudpickle caution, pip version, example check).

    acfrec's PythonModel is a small class of this package, not user code; the notes would
    repeat on every logged model and bury the run's own output.
    """
    loggers = [logging.getLogger(name) for name in ("mlflow.pyfunc", "mlflow.utils.environment", "mlflow.models")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _requirements() -> list[str]:
    pinned = []
    for name in _REQUIREMENTS:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned
