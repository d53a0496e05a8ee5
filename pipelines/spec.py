"""The pipeline YAML: its schema, its checks, and how step references become paths.

A pipeline file is a mapping::

    name: demo                  # default: the file's stem
    workdir: runs/demo          # every step writes to <workdir>/<step name>; default runs/<name>
    seed: 0                     # default seed of the data split and of every model
    backend: local              # local | ray: where topn and encode run
    ray: {address: null, num_cpus: null, shards: null, runtime_env: null}
    tracking: {enabled: true, uri: null, experiment: acfrec}
    steps:                      # run in this order
      prepare: {data: {...}}
      train: {models: [...]}
      ...

A step's ``type`` defaults to its name, so ``train:`` is a train step; two steps of one type
need ``type:`` (``train-big: {type: train, ...}``). Options that name an input (``split``,
``models``, ``model``, ``components``, ``content``, ``data.path``) take either a path or the
name of an earlier step, optionally followed by a path inside its output (``train/bpr-mf``).
Relative paths are relative to the folder the command runs in, like every ``acfrec`` command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from acfrec.config import ConfigError, TrackingConfig, apply_overrides, build_config, load_yaml

STEP_TYPES = ("prepare", "encode", "train", "add_items", "evaluate", "topn")
Backend = Literal["local", "ray"]


class PipelineError(ConfigError):
    """A pipeline file, a step reference or a step's input is wrong; the message says which."""


@dataclass
class RayConfig:
    """Where the Ray-backed steps run.

    Attributes:
        address: None starts a private Ray instance on this machine; "auto" joins the cluster this
            machine belongs to; "ray://host:10001" connects a Ray client to a remote head.
        num_cpus: CPUs of the private instance (None: all); ignored when joining a cluster.
        shards: tasks a step is split into (None: the cluster's CPU count).
        runtime_env: Ray runtime environment for the tasks (e.g. env_vars, pip).
    """

    address: str | None = None
    num_cpus: int | None = None
    shards: int | None = None
    runtime_env: dict[str, Any] | None = None


@dataclass
class PipelineConfig:
    """The top level of a pipeline file (each step's options are checked by its step class)."""

    steps: dict[str, dict[str, Any]]
    name: str | None = None
    workdir: str | None = None
    seed: int | None = None
    backend: Backend = "local"
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class StepSpec:
    """One step as written: its name, type and raw options (without ``type``)."""

    name: str
    type: str
    options: dict[str, Any]


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineConfig, list[StepSpec]]:
    """Read and check a pipeline file; ``overrides`` are ``dotted.key=value`` strings (YAML values).

    Raises:
        PipelineError: unknown top-level key, unknown step type, empty or malformed ``steps``.
    """
    path = Path(path)
    raw = apply_overrides(load_yaml(path), overrides or [])
    source = f"{path} with --set" if overrides else str(path)
    try:
        config = build_config(PipelineConfig, raw, source)
    except ConfigError as error:
        raise PipelineError(str(error)) from error
    if not config.steps:
        raise PipelineError(f"{source}: `steps` is empty; list at least one of {', '.join(STEP_TYPES)}")
    config.name = config.name or path.stem
    config.workdir = config.workdir or str(Path("runs") / config.name)
    return config, [_step_spec(name, options, source) for name, options in config.steps.items()]


def _step_spec(name: str, options: Any, source: str) -> StepSpec:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise PipelineError(f"{source}: steps.{name} must be a mapping of options, got {type(options).__name__} {options!r}")
    options = dict(options)
    step_type = options.pop("type", name)
    if step_type not in STEP_TYPES:
        raise PipelineError(
            f"{source}: steps.{name}: unknown step type {step_type!r}; known types: {', '.join(STEP_TYPES)} "
            "(a step named otherwise needs `type:`)"
        )
    if "/" in name or name.startswith("."):
        raise PipelineError(f"{source}: steps.{name}: a step name may not contain '/' or start with '.'")
    return StepSpec(name, step_type, options)


def resolve_ref(value: str, outputs: dict[str, Path], later: set[str], where: str) -> tuple[Path, str | None]:
    """A path, or ``step[/sub/path]`` inside an earlier step's output -> ``(absolute path, step or None)``.

    Args:
        outputs: output folder of each step that runs before this one.
        later: names of the steps that run after this one (referring to them is an error).
        where: the option being resolved, for errors (``steps.train.split``).
    """
    head, _, rest = str(value).partition("/")
    if head in outputs:
        base = outputs[head]
        return (base / rest if rest else base).absolute(), head
    if head in later:
        raise PipelineError(f"{where}: {value!r} refers to step {head!r}, which runs later; reorder the steps")
    return Path(value).expanduser().absolute(), None
