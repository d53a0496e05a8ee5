"""MLflow tracking: the only module of acfrec that imports mlflow.

Where runs go (first match wins):

1. ``tracking_uri`` passed to :class:`Tracker` (the CLI's ``--tracking-uri``);
2. the ``ACFREC_TRACKING_URI`` environment variable;
3. the ``MLFLOW_TRACKING_URI`` environment variable;
4. an embedded SQLite store in the working folder: ``./mlruns/mlflow.db``, with artefacts in
   ``./mlruns/artifacts``. MLflow 3 refuses its old ``./mlruns`` file store unless
   ``MLFLOW_ALLOW_FILE_STORE`` is set and recommends ``sqlite:///mlflow.db``; SQLite needs no
   server, and only its first use pays the one-off table creation (about ten seconds).

View the runs with ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``.

Metric names: MLflow allows only alphanumerics and ``_ - . : / space`` in a name, so
:func:`metric_key` writes ``@`` as ``_at_`` and any other character as ``_``:
``test.full.HR@10`` -> ``test.full.HR_at_10``. Param keys are sanitised the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from acfrec.errors import ArtifactError

if TYPE_CHECKING:
    import pandas as pd

    from acfrec.data.split import Split

# A library should not report usage on its users' behalf; an explicit setting still wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402  (after the telemetry default)
from mlflow.tracking import MlflowClient  # noqa: E402

DEFAULT_STORE_DIR = "mlruns"
ENV_VARS = ("ACFREC_TRACKING_URI", "MLFLOW_TRACKING_URI")
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
# MLflow's store setup logs every schema migration at INFO and trips SQLAlchemy deprecations
# that are MLflow's to fix; neither is actionable for an acfrec user.
_NOISY_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic")

Callback = Callable[[int, Mapping[str, Any]], None]


def default_tracking_uri(workdir: str | Path | None = None) -> str:
    """The tracking URI used when none is given (see the module docstring for the order)."""
    for name in ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return sqlite_uri(Path(workdir or Path.cwd()) / DEFAULT_STORE_DIR / "mlflow.db")


def sqlite_uri(path: str | Path) -> str:
    """``sqlite:////abs/path/mlflow.db`` for a database file."""
    return f"sqlite:///{Path(path).resolve()}"


def metric_key(name: str) -> str:
    """An MLflow-safe metric or param name: ``@`` -> ``_at_``, other disallowed characters -> ``_``."""
    return _BAD_NAME_CHARS.sub("_", name.replace("@", "_at_"))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings (and dataclasses) -> one level with dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _param_text(value: Any) -> str:
    text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= _MAX_PARAM_LENGTH else text[: _MAX_PARAM_LENGTH - 3] + "..."


def _as_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


def _quiet_mlflow() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*noload.*", category=DeprecationWarning)


class TrackedRun:
    """One open MLflow run; every ``log_*`` call writes to it. Made by :meth:`Tracker.run`."""

    def __init__(self, client: MlflowClient, run_id: str, name: str | None) -> None:
        self.client = client
        self.run_id = run_id
        self.name = name
        self._params: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"TrackedRun(name={self.name!r}, run_id={self.run_id!r})"

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        """Log params; nested mappings are flattened with dots (``model.dim``).

        Re-logging a key with the same value is a no-op; MLflow params are immutable, so a
        different value raises ValueError naming the key.
        """
        fresh: dict[str, str] = {}
        for key, value in flatten(params, prefix).items():
            name, text = metric_key(key), _param_text(value)
            if name in self._params:
                if self._params[name] != text:
                    raise ValueError(
                        f"param {name!r} is already logged in run {self.run_id} as {self._params[name]!r}; "
                        f"cannot change it to {text!r}"
                    )
                continue
            fresh[name] = text
        if fresh:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in fresh.items()])
            self._params.update(fresh)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, _param_text(v)) for k, v in tags.items()])

    def log_config(self, config: Any, artifact_file: str = "config.yaml", prefix: str = "") -> None:
        """Log a config (dict or dataclass) as flattened params and as a YAML artefact."""
        values = _as_dict(config)
        self.log_params(values, prefix)
        self.log_text(yaml.safe_dump(_plain(values), sort_keys=False), artifact_file)

    def log_metrics(self, metrics: Mapping[str, Any], prefix: str = "", step: int = 0) -> dict[str, float]:
        """Log numeric metrics; nested mappings flatten with dots, names go through :func:`metric_key`.

        ``{"full": {"HR@10": 0.5}}`` with ``prefix="test"`` is logged as ``test.full.HR_at_10``.
        None, NaN and non-numeric values are skipped. Returns what was logged ``{mlflow name: value}``.
        """
        now = int(time.time() * 1000)
        logged = {
            metric_key(key): float(value)
            for key, value in flatten(metrics, prefix).items()
            if _is_number(value) and math.isfinite(float(value))
        }
        if logged:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in logged.items()])
        return logged

    def epoch_callback(self, prefix: str = "train") -> Callback:
        """A ``callback(epoch, metrics)`` for ``model.callbacks``: logs every numeric value with ``step=epoch``.

        The ``epoch`` entry itself is not logged (it is the step); names are ``<prefix>.<key>``.
        """

        def log_epoch(epoch: int, metrics: Mapping[str, Any]) -> None:
            values = {k: v for k, v in metrics.items() if k != "epoch"}
            self.log_metrics(values, prefix=prefix, step=int(epoch))

        return log_epoch

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, table: pd.DataFrame | str, artifact_file: str) -> None:
        """Log a table artefact: ``.csv`` writes CSV, ``.md`` markdown; a str is written as given."""
        if isinstance(table, str):
            text = table
        elif artifact_file.endswith(".md"):
            text = dataframe_markdown(table)
        else:
            text = table.to_csv(index=False)
        self.log_text(text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a whole folder."""
        path = Path(path)
        if not path.exists():
            raise ArtifactError(f"cannot log artefact {path}: it does not exist")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_split(self, split: Split) -> None:
        """Log the split's summary as ``split.*`` params and its fingerprint as a tag too."""
        meta = split.meta or {}
        params = dict(split.summary())
        params.update({k: meta[k] for k in ("source", "tie_rule", "seed", "n_negatives") if meta.get(k) is not None})
        self.log_params(params, prefix="split")
        self.set_tags({"split.fingerprint": split.fingerprint})


class Tracker:
    """Logs acfrec runs to MLflow.

    ``with tracker.run("bpr-mf", params={...}) as run:`` opens a run; a run opened inside
    another becomes its child (``mlflow.parentRunId``), which the MLflow UI nests. The
    ``log_*`` methods of the tracker write to the innermost open run.

    Args:
        experiment: MLflow experiment name, created when missing.
        tracking_uri: where runs go; None: :func:`default_tracking_uri`.
        run_name: default name of runs opened without one.
    """

    def __init__(self, experiment: str = "acfrec", tracking_uri: str | None = None, run_name: str | None = None) -> None:
        self.experiment = experiment
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.run_name = run_name
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._stack: list[TrackedRun] = []

    def __repr__(self) -> str:
        return f"Tracker(experiment={self.experiment!r}, tracking_uri={self.tracking_uri!r})"

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            _quiet_mlflow()
            database = self._sqlite_path()
            if database is not None:
                database.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """The experiment's id, creating it (artefacts next to a SQLite store) when missing."""
        if self._experiment_id is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                found = self.client.get_experiment_by_name(self.experiment)
                self._experiment_id = (
                    found.experiment_id
                    if found is not None
                    else self.client.create_experiment(self.experiment, artifact_location=self._artifact_location())
                )
        return self._experiment_id

    def _artifact_location(self) -> str | None:
        # For SQLite MLflow would put artefacts in ./mlruns of whatever folder the first run
        # happened in; keep them beside the database instead, so the store is one movable folder.
        database = self._sqlite_path()
        if database is None:
            return None
        return (database.parent / "artifacts" / self.experiment).resolve().as_uri()

    def _sqlite_path(self) -> Path | None:
        prefix = "sqlite:///"
        return Path(self.tracking_uri[len(prefix) :]) if self.tracking_uri.startswith(prefix) else None

    @property
    def active(self) -> TrackedRun:
        """The innermost open run; ArtifactError when none is open."""
        if not self._stack:
            raise ArtifactError("no MLflow run is open: use `with tracker.run(...)` first")
        return self._stack[-1]

    @contextlib.contextmanager
    def run(
        self, name: str | None = None, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
    ) -> Iterator[TrackedRun]:
        """Open a run (a child of the open one, if any); it ends FINISHED, or FAILED on an exception."""
        all_tags = {k: _param_text(v) for k, v in (tags or {}).items()}
        if self._stack:
            all_tags[PARENT_TAG] = self._stack[-1].run_id
        name = name or self.run_name
        created = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run = TrackedRun(self.client, created.info.run_id, name)
        self._stack.append(run)
        status = "FAILED"
        try:
            if params:
                run.log_params(params)
            yield run
            status = "FINISHED"
        finally:
            self._stack.pop()
            self.client.set_terminated(run.run_id, status=status)

    # The tracker's log_* methods write to the innermost open run.
    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        self.active.log_params(params, prefix)

    def log_config(self, config: Any, artifact_file: str = "config.yaml", prefix: str = "") -> None:
        self.active.log_config(config, artifact_file, prefix)

    def log_metrics(self, metrics: Mapping[str, Any], prefix: str = "", step: int = 0) -> dict[str, float]:
        return self.active.log_metrics(metrics, prefix, step)

    def epoch_callback(self, prefix: str = "train") -> Callback:
        return self.active.epoch_callback(prefix)

    def log_table(self, table: pd.DataFrame | str, artifact_file: str) -> None:
        self.active.log_table(table, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.active.log_text(text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.active.log_artifact(path, artifact_path)

    def log_split(self, split: Split) -> None:
        self.active.log_split(split)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.active.set_tags(tags)


def dataframe_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as a markdown table (floats to ``digits`` places), without extra dependencies."""

    def cell(value: Any) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    header = [str(c) for c in frame.columns]
    rows = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _plain(value: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python, so ``yaml.safe_dump`` accepts the config."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


__all__ = [
    "Tracker",
    "TrackedRun",
    "dataframe_markdown",
    "default_tracking_uri",
    "flatten",
    "metric_key",
    "sqlite_uri",
]
