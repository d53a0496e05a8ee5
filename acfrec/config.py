"""Run configuration: dataclasses filled from YAML files and ``--set key=value`` overrides.

A run config (:class:`RunConfig`) has the sections ``data``, ``models``, ``eval``,
``tracking`` and ``output_dir``; see ``acfrec/configs/*.yaml`` for complete examples. Every key
is checked: an unknown key or a value of the wrong type raises :class:`ConfigError` naming the
key and the file it came from.

Overrides are ``dotted.key=value`` strings whose value is parsed as YAML, so ``eval.ks=[10,20]``
gives a list, ``data.rating_threshold=4`` a number and ``tracking.uri=null`` None.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from acfrec.errors import DataValidationError

T = TypeVar("T")

TieRule = Literal["file_order", "item_id", "random"]
Protocol = Literal["full", "sampled", "cold"]
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


class ConfigError(DataValidationError):
    """A configuration file or override is invalid; the message names the key and its source."""


@dataclass
class DataConfig:
    """Where interactions come from and how the leave-one-out split is made.

    ``path`` (read with :func:`acfrec.data.io.read_interactions`) or ``planted`` (keyword
    arguments of :func:`acfrec.datasets.planted_interactions`, generated data) must be set.
    ``components``: a ComponentStore folder of the items' content (``acfrec encode`` writes one),
    used by the cold protocol and by ACF models without their own ``components_path``; the
    planted image catalogue makes its own when it is unset.
    """

    path: str | None = None
    format: str | None = None
    sep: str | None = None
    user_col: str | None = None
    item_col: str | None = None
    timestamp_col: str | None = None
    rating_col: str | None = None
    rating_threshold: float | None = None
    min_user_interactions: int = 1
    min_item_interactions: int = 1
    tie_rule: TieRule = "file_order"
    seed: int = 0
    n_negatives: int = 99
    min_interactions: int = 3
    planted: dict[str, Any] | None = None
    components: str | None = None


@dataclass
class ModelSpec:
    """One model to train: its registry name and config overrides (fields of its config dataclass)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """How models are scored and compared.

    ``metric``/``test`` choose the paired significance test against the best model (on the
    first protocol); ``table_metrics`` the metric columns printed (None: HR, NDCG at the
    smallest k, and MRR). Protocol ``cold`` (``acfrec compare`` only) holds out ``cold_share``
    of the items entirely and ranks them from content (:mod:`acfrec.coldstart`); ``full`` or
    ``sampled`` next to it measure the warm items.
    """

    protocols: list[Protocol] = field(default_factory=lambda: ["full", "sampled"])
    ks: list[int] = field(default_factory=lambda: [10, 20, 50, 100])
    target: Literal["valid", "test"] = "test"
    metric: str = "NDCG@10"
    test: Literal["wilcoxon", "bootstrap"] = "wilcoxon"
    table_metrics: list[str] | None = None
    cold_share: float = 0.2


@dataclass
class TrackingConfig:
    """MLflow: ``uri`` None means the default store (see :mod:`acfrec.tracking`)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "acfrec"


@dataclass
class RunConfig:
    """A whole experiment: data + split, the models, evaluation, tracking and the output folder."""

    data: DataConfig = field(default_factory=DataConfig)
    models: list[ModelSpec] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str | None = None


SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))


# --------------------------------------------------------------------------- YAML and overrides
def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ConfigError names the file (and line) when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"config file {path}{where} is not valid YAML: {problem}") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def parse_override(override: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> ``(["a", "b"], 1)``, the value parsed as YAML."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {override!r} must look like key=value or section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({error})") from error
    return parts, value


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``config`` with each ``dotted.key=value`` set (missing sections are created)."""
    result = copy.deepcopy(dict(config))
    for override in overrides:
        parts, value = parse_override(override)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {override!r}: {where} is a {type(child).__name__}, not a section")
            node = child
        node[parts[-1]] = value
    return result


# --------------------------------------------------------------------------- typed building
def build_config(cls: type[T], values: Mapping[str, Any] | None, source: str = "<config>", where: str = "") -> T:
    """Fill dataclass ``cls`` from a mapping, checking every key and type (nested dataclasses too).

    Args:
        source: names the origin in errors (a file path, "--set", ...).
        where: dotted path of this section inside the whole config, for errors.
    Raises:
        ConfigError: unknown key (with the closest known one), missing required key, wrong type.
    """
    label = where or "the top level"
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: {label} must be a mapping, got {type(values).__name__} {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {_dotted(where, key)!r}{_suggest(str(key), fields)}")
    kwargs = {name: _coerce(values[name], hints[name], source, _dotted(where, name)) for name in fields if name in values}
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: {label} is missing required key(s) {', '.join(_dotted(where, m) for m in missing)}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, source: str, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, source, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, source, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where} must be a list, got {type(value).__name__} {value!r}")
        item_hint = args[0] if args else Any
        items = [_coerce(v, item_hint, source, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {where} must be a mapping, got {type(value).__name__} {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_hint, source, _dotted(where, str(k))) for k, v in value.items()}
    return _coerce_scalar(value, hint, source, where)


def _coerce_union(value: Any, args: tuple[Any, ...], source: str, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, arg, source, where)
        except ConfigError as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise ConfigError(f"{source}: {where} must be {names}, got {type(value).__name__} {value!r}")


# YAML 1.1 (PyYAML) reads "1e-6" (no dot) as a string; a float option takes it as the number it is.
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _coerce_scalar(value: Any, hint: Any, source: str, where: str) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: {where} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is float:
        raise ConfigError(f"{source}: {where} must be a number, got {type(value).__name__} {value!r}")
    return value


def _dotted(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _suggest(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} known keys: {', '.join(known)}"


# --------------------------------------------------------------------------- run configs
def build_run_config(values: Mapping[str, Any], source: str = "<config>") -> RunConfig:
    """A :class:`RunConfig` from a raw mapping; model entries may be bare names (``- itempop``)."""
    values = dict(values)
    models = values.get("models")
    if isinstance(models, list):
        values["models"] = [{"name": m} if isinstance(m, str) else m for m in models]
    return build_config(RunConfig, values, source)


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path`` (a file, or the name of a packaged config such as ``"demo"``), apply overrides, check."""
    raw = load_yaml(resolve_config_path(path)) if path is not None else {}
    source = str(path) if path is not None else "--set"
    if overrides:
        source = f"{source} with --set" if path is not None else source
    return build_run_config(apply_overrides(raw, overrides), source)


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or a packaged config name (``demo``, ``ml100k``) when no such file exists."""
    candidate = Path(path)
    packaged = PACKAGED_CONFIGS / f"{path}.yaml"
    if not candidate.exists() and candidate.suffix == "" and packaged.is_file():
        return packaged
    return candidate


def packaged_configs() -> list[str]:
    """Names of the configs shipped with acfrec (``acfrec/configs/*.yaml``)."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def split_overrides(overrides: Sequence[str], model_names: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Route ``--set`` overrides to the run config or to models.

    * ``data.* / eval.* / tracking.* / output_dir`` -> the run config;
    * ``<model>.key=value`` (a listed model) -> that model's params;
    * a bare ``key=value`` or ``*.key=value`` -> every listed model (filtered later to those
      whose config has the key).
    Returns ``(run overrides, {model name: ["key=value", ...]})``, the model name ``"*"``
    holding the every-model ones.
    """
    run: list[str] = []
    per_model: dict[str, list[str]] = {}
    for override in overrides:
        parts, _ = parse_override(override)
        value = override.partition("=")[2]
        if parts[0] in SECTIONS:
            run.append(override)
        elif len(parts) == 1 or parts[0] == "*":
            rest = parts[1:] if parts[0] == "*" else parts
            per_model.setdefault("*", []).append(f"{'.'.join(rest)}={value}")
        elif parts[0] in model_names:
            per_model.setdefault(parts[0], []).append(f"{'.'.join(parts[1:])}={value}")
        else:
            raise ConfigError(
                f"--set {override!r}: {parts[0]!r} is neither a config section ({', '.join(SECTIONS)}) "
                f"nor one of the models being run ({', '.join(model_names) or 'none'})"
            )
    return run, per_model


def model_params(
    spec: ModelSpec, config_class: type, overrides: Mapping[str, Sequence[str]], source: str = "--set"
) -> Any:
    """The model's config dataclass: ``spec.params`` then its overrides, checked against ``config_class``.

    Every-model (``"*"``) overrides apply only when ``config_class`` has the key.
    """
    known = {f.name for f in dataclasses.fields(config_class)}
    shared = [o for o in overrides.get("*", ()) if parse_override(o)[0][0] in known]
    params = apply_overrides(spec.params, [*shared, *overrides.get(spec.name, ())])
    return build_config(config_class, params, source, where=spec.name)


def unused_shared_overrides(overrides: Mapping[str, Sequence[str]], config_classes: Sequence[type]) -> list[str]:
    """Every-model overrides whose key no model has (so a typo does not pass silently)."""
    known = {f.name for cls in config_classes for f in dataclasses.fields(cls)}
    return [o for o in overrides.get("*", ()) if parse_override(o)[0][0] not in known]


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain dicts/lists (for YAML dumps and MLflow params)."""
    return dataclasses.asdict(config)
