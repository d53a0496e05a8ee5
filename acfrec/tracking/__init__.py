"""Experiment tracking (MLflow). The only place acfrec imports mlflow; importing it costs seconds,
so the CLI imports it only when a command tracks."""

from acfrec.tracking.mlflow_tracker import (
    TrackedRun,
    Tracker,
    dataframe_markdown,
    default_tracking_uri,
    flatten,
    metric_key,
    sqlite_uri,
)

__all__ = [
    "TrackedRun",
    "Tracker",
    "dataframe_markdown",
    "default_tracking_uri",
    "flatten",
    "metric_key",
    "sqlite_uri",
]
