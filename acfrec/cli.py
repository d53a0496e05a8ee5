"""The ``acfrec`` command: prepare splits, train, evaluate, compare models, run the demo.

Every command that trains or evaluates is tracked in MLflow (see :mod:`acfrec.tracking`) unless
``--no-track`` is given. Bad input (an acfrec error) prints one line and exits with status 2.
Heavy imports (torch, mlflow) happen inside the commands so ``acfrec --help`` stays quick.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acfrec.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelSpec,
    RunConfig,
    apply_overrides,
    build_run_config,
    load_yaml,
    model_params,
    packaged_configs,
    resolve_config_path,
    split_overrides,
    to_dict,
    unused_shared_overrides,
)
from acfrec.errors import AcfrecError
from acfrec.utils import atomic_file, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl

    from acfrec.data.split import Split
    from acfrec.datasets.catalogue import Catalogue
    from acfrec.eval.evaluate import EvalResult
    from acfrec.models.base import Recommender

log = logging.getLogger("acfrec")

DEMO_MODELS = ("itempop", "bpr-mf", "fism", "svdpp", "als", "acf")
# Dimension of the demo's frame components (pixel PCA of the catalogue's digit frames).
DEMO_COMPONENT_DIM = 32
# `acfrec demo --small`: a data set and training budget small enough for a smoke test.
DEMO_SMALL_OVERRIDES = (
    "data.planted.n_users=150",
    "data.planted.n_items=120",
    "data.planted.interactions_per_user=[8, 20]",
    "*.epochs=3",
    "*.iterations=3",
    "*.dim=16",
    "*.factors=16",
)
TRAINING_RECORD = "training.json"


# ============================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``acfrec`` argument parser (global options work before or after the subcommand)."""
    parser = argparse.ArgumentParser(
        prog="acfrec",
        description="Attentive Collaborative Filtering and baselines with leave-one-out evaluation.",
        epilog=_epilog(
            "acfrec demo --small",
            "acfrec compare --data ../shared/data/ml-100k/ml-100k.inter --models itempop bpr-mf fism",
            "acfrec <command> --help",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_globals(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, handler, help_text, examples) in _COMMANDS.items():
        sub = commands.add_parser(
            name, help=help_text, description=help_text, epilog=_epilog(*examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add(sub)
        _add_globals(sub, suppress=True)
        sub.set_defaults(handler=handler)
    return parser


def _epilog(*examples: str) -> str:
    return "examples:\n" + "\n".join(f"  {example}" for example in examples)


def _add_globals(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # In subcommands the defaults are suppressed so `acfrec --seed 1 train ...` is not undone.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    group.add_argument("--tracking-uri", default=default(None),
                       help="MLflow tracking URI (default: $ACFREC_TRACKING_URI, $MLFLOW_TRACKING_URI, "
                            "else sqlite:///./mlruns/mlflow.db)")
    group.add_argument("--experiment", default=default(None), help="MLflow experiment name (default: acfrec)")
    group.add_argument("--no-track", action="store_true", default=default(False), help="do not log to MLflow")
    group.add_argument("--seed", type=int, default=default(None), help="seed of the split and of every model")
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="more output (debug logging)")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="only results and errors")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and split")
    group.add_argument("--format", help="csv, tsv, parquet, ml-100k, ml-1m or recbole (default: from the file name)")
    group.add_argument("--sep", help="field separator, overriding the format's")
    group.add_argument("--user-col", help="user id column (default: guessed)")
    group.add_argument("--item-col", help="item id column (default: guessed)")
    group.add_argument("--timestamp-col", help="timestamp column (default: guessed, optional)")
    group.add_argument("--rating-col", help="rating column (default: guessed, optional)")
    group.add_argument("--rating-threshold", type=float, help="keep ratings >= this (implicit feedback)")
    group.add_argument("--min-user-interactions", type=int, help="drop users with fewer interactions")
    group.add_argument("--min-item-interactions", type=int, help="drop items with fewer interactions")
    group.add_argument("--tie-rule", choices=("file_order", "item_id", "random"),
                       help="which of a user's equally recent interactions is the test item (default: file_order)")
    group.add_argument("--n-negatives", type=int, help="negatives per user for the sampled protocol (default: 99)")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML",
                        help=f"run config file, or a packaged one: {', '.join(packaged_configs())}")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override a config value (YAML-typed): data.seed=1, eval.ks=[10,20], "
                             "fism.dim=32 (one model), epochs=5 (every model that has it)")


def _add_eval_options(parser: argparse.ArgumentParser, target: bool = True, cold: bool = False) -> None:
    choices, extra = (("full", "sampled", "cold"), "; cold: new items ranked from content") if cold else (("full", "sampled"), "")
    parser.add_argument("--protocols", nargs="+", choices=choices, help=f"default: full sampled{extra}")
    parser.add_argument("--ks", nargs="+", type=int, help="metric cutoffs (default: 10 20 50 100)")
    if target:
        parser.add_argument("--target", choices=("valid", "test"), help="held-out item to rank (default: test)")


def _add_prepare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="PATH", help="interactions file (or MovieLens folder)")
    parser.add_argument("--out", required=True, metavar="SPLIT_DIR", help="folder to write the split to")
    parser.add_argument("--export-recbole", metavar="DIR", help="also write RecBole atomic files here")
    parser.add_argument("--name", help="RecBole data set name (default: the data file's stem)")
    _add_config_options(parser)
    _add_data_options(parser)


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", required=True, metavar="SPLIT_DIR", help="a split written by `acfrec prepare`")
    parser.add_argument("--model", required=True, metavar="NAME", help="registered model name, e.g. bpr-mf")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="folder to save the fitted model to")
    _add_config_options(parser)
    _add_eval_options(parser, target=False)  # train reports both valid and test


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", required=True, metavar="SPLIT_DIR", help="the split the model was trained on")
    parser.add_argument("--model-dir", required=True, metavar="MODEL_DIR", help="a model saved by `acfrec train`")
    parser.add_argument("--out", metavar="DIR", help="where per-user ranks go (default: MODEL_DIR/eval-TARGET)")
    _add_eval_options(parser)


def _add_compare(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="PATH", help="interactions file to split (leave-one-out)")
    source.add_argument("--split", metavar="SPLIT_DIR", help="a split written by `acfrec prepare`")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="models to train (default: the config's)")
    parser.add_argument("--out", metavar="DIR", help="write results.csv, results.md and per-user ranks here")
    parser.add_argument("--metric", help="metric of the paired test against the best model (default: NDCG@10)")
    parser.add_argument("--test", choices=("wilcoxon", "bootstrap"), help="paired test (default: wilcoxon)")
    parser.add_argument("--components", metavar="STORE",
                        help="component store of the items' content (cold protocol, ACF without components)")
    parser.add_argument("--cold-share", type=float, help="share of items held out by the cold protocol (default 0.2)")
    _add_config_options(parser)
    _add_eval_options(parser, cold=True)
    _add_data_options(parser)


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="acfrec-demo", metavar="DIR", help="output folder (default: acfrec-demo)")
    parser.add_argument("--small", action="store_true", help="a tiny data set and few epochs (seconds)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override the demo config (acfrec/configs/demo.yaml)")


# ============================================================================ entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``acfrec`` command line; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        return args.handler(args)
    except AcfrecError as error:
        print(f"acfrec {args.command}: error: {error}", file=sys.stderr)
        return 2


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (so captured output in tests works)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _configure_logging(args: argparse.Namespace) -> None:
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)


def _show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not args.quiet


# ============================================================================ configuration
@dataclass
class _Setup:
    """What a command runs with: the checked run config and the per-model ``--set`` overrides."""

    config: RunConfig
    model_overrides: dict[str, list[str]]
    source: str


def _setup(args: argparse.Namespace, model_names: Sequence[str] | None = None, base: str | None = None) -> _Setup:
    """Config file (or packaged ``base``) + ``--seed`` + ``--set`` + command-line flags -> checked config."""
    path = getattr(args, "config", None) or base
    raw = load_yaml(resolve_config_path(path)) if path else {}
    overrides = list(getattr(args, "overrides", []))
    source = " + ".join(s for s in (str(path) if path else "", "--set" if overrides else "") if s) or "defaults"
    if model_names is None:
        model_names = [spec.name for spec in build_run_config(raw, source).models]
    run_overrides, model_overrides = split_overrides(overrides, model_names)
    if not model_names and model_overrides:
        first = next(iter(model_overrides.values()))[0]
        raise ConfigError(f"--set {first!r}: `acfrec {args.command}` trains no model; set data.*, eval.* or tracking.*")
    if args.seed is not None:
        run_overrides.insert(0, f"data.seed={args.seed}")
        model_overrides.setdefault("*", []).insert(0, f"seed={args.seed}")
    config = build_run_config(apply_overrides(raw, run_overrides), source)
    _apply_flags(config, args)
    return _Setup(config, model_overrides, source)


_DATA_FLAGS = ("format", "sep", "user_col", "item_col", "timestamp_col", "rating_col", "rating_threshold",
               "min_user_interactions", "min_item_interactions", "tie_rule", "n_negatives")


def _apply_flags(config: RunConfig, args: argparse.Namespace) -> None:
    """Explicit command-line flags win over the config file."""
    data = {name: getattr(args, name) for name in (*_DATA_FLAGS, "components") if getattr(args, name, None) is not None}
    if getattr(args, "data", None):
        data.update(path=args.data, planted=None)
    config.data = dataclasses.replace(config.data, **data)
    evals = {name: getattr(args, name) for name in ("protocols", "ks", "target", "metric", "test", "cold_share")
             if getattr(args, name, None) is not None}
    config.eval = dataclasses.replace(config.eval, **evals)
    if args.tracking_uri:
        config.tracking.uri = args.tracking_uri
    if args.experiment:
        config.tracking.experiment = args.experiment
    if args.no_track:
        config.tracking.enabled = False
    if getattr(args, "out", None) and args.command in ("compare", "demo"):
        config.output_dir = args.out


def _model_class(name: str) -> type[Recommender]:
    from acfrec.models import available_models, get_model

    if name not in available_models():
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return get_model(name)


def _build_models(setup: _Setup, specs: Sequence[ModelSpec], progress: bool) -> list[Recommender]:
    """Every model, built before any training so a bad option fails in seconds, not after an hour."""
    names = [spec.name for spec in specs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"model(s) listed twice: {', '.join(duplicated)}")
    classes = [_model_class(spec.name) for spec in specs]
    unused = unused_shared_overrides(setup.model_overrides, [cls.config_class for cls in classes])
    if unused:
        raise ConfigError(f"--set {unused[0]!r}: none of the models ({', '.join(names)}) has that option")
    models = []
    for spec, cls in zip(specs, classes, strict=True):
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        defaults = {"progress": progress} if "progress" in fields else {}
        spec = ModelSpec(spec.name, {**defaults, **spec.params})
        models.append(cls(model_params(spec, cls.config_class, setup.model_overrides, setup.source)))
    return models


def _specs(config: RunConfig, names: Sequence[str] | None) -> list[ModelSpec]:
    """The models to run: ``names`` (keeping the config's params for them) or the config's list."""
    if not names:
        if not config.models:
            raise ConfigError("no models to run: pass --models NAME ... or a config with a `models` list")
        return list(config.models)
    configured = {spec.name: spec for spec in config.models}
    return [configured.get(name, ModelSpec(name)) for name in names]


# ============================================================================ data
def make_split(data: DataConfig, catalogue: Catalogue | None = None) -> Split:
    """Read (or generate, with ``data.planted``) the interactions and split them leave-one-out.

    ``catalogue``: an already generated :func:`planted_catalogue_of` ``data`` (not generated twice).
    """
    from acfrec.data.splitting import leave_one_out

    interactions = _interactions(data, catalogue)
    return leave_one_out(
        interactions, tie_rule=data.tie_rule, seed=data.seed,
        n_negatives=data.n_negatives, min_interactions=data.min_interactions,
    )


def planted_catalogue_of(data: DataConfig) -> Catalogue | None:
    """The planted image catalogue ``data.planted`` asks for with ``generator: catalogue``, else None.

    ``preset: NAME`` starts from :data:`acfrec.datasets.catalogue.PRESETS` (the other keys override it).
    """
    if not data.planted or data.planted.get("generator") != "catalogue":
        return None
    from acfrec.datasets.catalogue import planted_catalogue, planted_preset

    options = {key: value for key, value in data.planted.items() if key not in ("generator", "preset")}
    options = {"seed": data.seed, **options}
    try:
        if "preset" in data.planted:
            return planted_preset(str(data.planted["preset"]), **options)
        return planted_catalogue(**options)
    except TypeError as error:
        raise ConfigError(f"data.planted (generator: catalogue): {error}") from None


def _interactions(data: DataConfig, catalogue: Catalogue | None = None) -> Any:
    if data.path is not None:
        from acfrec.data.io import read_interactions

        return read_interactions(
            data.path, format=data.format, sep=data.sep, user_col=data.user_col, item_col=data.item_col,
            timestamp_col=data.timestamp_col, rating_col=data.rating_col, rating_threshold=data.rating_threshold,
            min_user_interactions=data.min_user_interactions, min_item_interactions=data.min_item_interactions,
        )
    if data.planted is not None:
        from acfrec.data.interactions import Interactions
        from acfrec.datasets import planted_interactions

        catalogue = catalogue or planted_catalogue_of(data)
        if catalogue is not None:
            frame = catalogue.interactions
        else:
            options = {key: value for key, value in data.planted.items() if key != "generator"}
            frame = planted_interactions(**{"seed": data.seed, **options}).frame
        return Interactions.from_frame(
            frame, user_col="user", item_col="item", timestamp_col="timestamp", source="planted",
            min_user_interactions=data.min_user_interactions, min_item_interactions=data.min_item_interactions,
        )
    raise ConfigError("no data: pass --data PATH (or --split SPLIT_DIR), or set data.path in the config")


def _load_split(path: str) -> Split:
    from acfrec.data.split import Split

    return Split.load(path)


# ============================================================================ tracking
class _NullRun:
    """Stands in for a tracked run under ``--no-track``: every log call does nothing."""

    run_id: str | None = None

    def log_params(self, *args: Any, **kwargs: Any) -> None: ...
    def log_config(self, *args: Any, **kwargs: Any) -> None: ...
    def log_metrics(self, *args: Any, **kwargs: Any) -> None: ...
    def log_table(self, *args: Any, **kwargs: Any) -> None: ...
    def log_text(self, *args: Any, **kwargs: Any) -> None: ...
    def log_artifact(self, *args: Any, **kwargs: Any) -> None: ...
    def log_split(self, *args: Any, **kwargs: Any) -> None: ...
    def set_tags(self, *args: Any, **kwargs: Any) -> None: ...

    def epoch_callback(self, prefix: str = "train") -> Callable[[int, Mapping[str, Any]], None]:
        return lambda epoch, metrics: None


class _NullTracker:
    tracking_uri: str | None = None

    @contextlib.contextmanager
    def run(self, *args: Any, **kwargs: Any) -> Iterator[_NullRun]:
        yield _NullRun()


def _tracker(config: RunConfig) -> Any:
    if not config.tracking.enabled:
        return _NullTracker()
    from acfrec.tracking import Tracker

    return Tracker(experiment=config.tracking.experiment, tracking_uri=config.tracking.uri)


def _report_tracking(tracker: Any) -> None:
    uri = tracker.tracking_uri
    if uri is None:
        return
    log.info("MLflow runs: %s (experiment %r)", uri, tracker.experiment)
    if uri.startswith("sqlite:///"):
        log.info("  view them: mlflow ui --backend-store-uri %s", uri)


# ============================================================================ fit + evaluate
def fit_and_evaluate(
    model: Recommender, split: Split, eval_config: EvalConfig, run: Any, targets: Sequence[str]
) -> dict[str, EvalResult]:
    """Fit ``model`` on ``split`` with per-epoch metrics logged to ``run``; evaluate on each target.

    Returns ``{target: EvalResult}``; the run gets params, the model config artefact, the split
    fingerprint, ``train.*`` per-epoch metrics and ``<target>.<protocol>.<metric>`` finals.
    """
    from acfrec.eval.evaluate import evaluate

    run.log_split(split)
    run.log_config({"name": model.name, **dataclasses.asdict(model.config)}, prefix="model")
    run.set_tags({"acfrec.model": model.name})
    model.callbacks.append(run.epoch_callback("train"))
    start = time.perf_counter()
    model.fit(split)
    seconds = time.perf_counter() - start
    log.info("  %s: fitted in %.1f s", model.name, seconds)
    run.log_metrics({"fit_seconds": seconds})
    results = {}
    for target in targets:
        result = evaluate(model, split, target=target, protocols=eval_config.protocols, ks=eval_config.ks)
        run.log_metrics(result.metrics, prefix=target)
        results[target] = result
    return results


@dataclass
class CompareOutcome:
    """What :func:`run_compare` produced: per-model results, the comparison and its rendering."""

    results: dict[str, EvalResult]
    models: dict[str, Recommender]
    table: pd.DataFrame
    text: str
    best: str
    run_id: str | None


def run_compare(
    config: RunConfig,
    split: Split,
    models: Sequence[Recommender],
    tracker: Any,
    finish: Callable[[Any, dict[str, Recommender], str], None] | None = None,
) -> CompareOutcome:
    """Train and evaluate every model on ``split``; one parent MLflow run with a child per model.

    ``finish(parent_run, models_by_name, best_name)`` runs last inside the parent run, so what it
    writes (lists, a model, pictures) can be logged there.
    """
    from acfrec.eval.compare import compare, format_table

    target, eval_config = config.eval.target, config.eval
    with tracker.run("compare", tags={"acfrec.command": "compare"}) as parent:
        parent.log_split(split)
        parent.log_config(to_dict(config))
        results = {}
        for model in models:
            log.info("training %s ...", model.name)
            with tracker.run(model.name, tags={"acfrec.command": "compare"}) as child:
                results[model.name] = fit_and_evaluate(model, split, eval_config, child, [target])[target]
        table = compare(results, metric=eval_config.metric, protocol=eval_config.protocols[0],
                        test=eval_config.test, seed=config.data.seed)
        text = format_table(table, metrics=_table_metrics(eval_config), markdown=True, bold_best=True)
        best = str(table.loc[table["best"], "model"].iloc[0])
        parent.log_table(table, "results.csv")
        parent.log_table(text + "\n", "results.md")
        parent.set_tags({"acfrec.best_model": best})
        if finish is not None:
            finish(parent, {m.name: m for m in models}, best)
    return CompareOutcome(results, {m.name: m for m in models}, table, text, best, parent.run_id)


def _table_metrics(eval_config: EvalConfig) -> list[str]:
    if eval_config.table_metrics:
        return list(eval_config.table_metrics)
    k = min(eval_config.ks)
    return [f"HR@{k}", f"NDCG@{k}", "MRR"]


def _significance_note(outcome: CompareOutcome, eval_config: EvalConfig) -> str:
    return (
        f"best: {outcome.best} by {eval_config.protocols[0]} {eval_config.metric}; vs/diff/p_value: paired "
        f"{eval_config.test} test of each model against it over the same users"
    )


def _write_compare_outputs(outcome: CompareOutcome, out: Path) -> None:
    from acfrec.eval.compare import write_comparison

    write_comparison(out, outcome.table, outcome.text, outcome.results)


def _metrics_text(result: EvalResult) -> str:
    """One model's metrics as text: rows = metrics, columns = protocols."""
    frame = result.table().pivot(index="metric", columns="protocol", values="value")
    order = list(next(iter(result.metrics.values())))
    return frame.reindex(order).to_string(float_format=lambda v: f"{v:.4f}")


# ============================================================================ commands
def cmd_prepare(args: argparse.Namespace) -> int:
    setup = _setup(args, model_names=[])
    split = make_split(setup.config.data)
    split.save(args.out)
    print(json.dumps(split.summary(), indent=2))
    log.info("split written to %s", args.out)
    if args.export_recbole:
        name = args.name or Path(args.data).stem
        paths = split.export_recbole(args.export_recbole, name)
        log.info("RecBole atomic files: %s", ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from acfrec.train.distributed import torchrun_process_group

    with torchrun_process_group() as replicas:  # several processes only when launched by torchrun
        return _train(args, replicas.is_main)


def _train(args: argparse.Namespace, is_main: bool) -> int:
    setup = _setup(args, model_names=[args.model])
    split = _load_split(args.split)
    (model,) = _build_models(setup, _specs(setup.config, [args.model]), _show_progress(args))
    if not is_main:  # ranks > 0 train in step with rank 0, which evaluates, tracks and saves
        model.fit(split)
        return 0
    tracker = _tracker(setup.config)
    with tracker.run(f"train {model.name}", tags={"acfrec.command": "train"}) as run:
        results = fit_and_evaluate(model, split, setup.config.eval, run, ["valid", "test"])
        model.save(args.out)
        record = {
            "model": model.name,
            "split": str(Path(args.split).resolve()),
            "split_fingerprint": split.fingerprint,
            "mlflow_run_id": run.run_id,
            "metrics": {target: result.metrics for target, result in results.items()},
        }
        atomic_write_text(Path(args.out) / TRAINING_RECORD, json.dumps(record, indent=2))
    print(f"{model.name} on {args.split} (test):")
    print(_metrics_text(results["test"]))
    log.info("model saved to %s", args.out)
    _report_tracking(tracker)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from acfrec.eval.evaluate import evaluate
    from acfrec.models.base import Recommender

    setup = _setup(args, model_names=[])
    eval_config = setup.config.eval
    split = _load_split(args.split)
    model = Recommender.load(args.model_dir)
    _check_trained_on(Path(args.model_dir), split, args.split)
    result = evaluate(model, split, target=eval_config.target, protocols=eval_config.protocols, ks=eval_config.ks)
    out = Path(args.out or Path(args.model_dir) / f"eval-{eval_config.target}")
    result.save(out)
    tracker = _tracker(setup.config)
    with tracker.run(f"evaluate {model.name}", tags={"acfrec.command": "evaluate", "acfrec.model": model.name}) as run:
        run.log_split(split)
        run.log_params({"model_dir": str(Path(args.model_dir).resolve()), "target": eval_config.target})
        run.log_metrics(result.metrics, prefix=eval_config.target)
        run.log_table(result.table(), "results.csv")
        run.log_artifact(out, "eval")
    print(f"{model.name} on {args.split} ({eval_config.target}):")
    print(_metrics_text(result))
    log.info("per-user ranks written to %s", out / "ranks.parquet")
    _report_tracking(tracker)
    return 0


def _check_trained_on(model_dir: Path, split: Split, split_path: str) -> None:
    """Refuse to score a model on a split other than its training one (same shape is not enough)."""
    from acfrec.errors import DataValidationError

    record_path = model_dir / TRAINING_RECORD
    if not record_path.is_file():
        return
    expected = json.loads(record_path.read_text()).get("split_fingerprint")
    if expected and expected != split.fingerprint:
        raise DataValidationError(
            f"{model_dir} was trained on a split with fingerprint {expected}, but {split_path} has "
            f"{split.fingerprint}: evaluate it on the split it was trained on"
        )


def cmd_compare(args: argparse.Namespace) -> int:
    setup = _setup(args, model_names=args.models)
    specs = _specs(setup.config, args.models)
    models = _build_models(setup, specs, _show_progress(args))
    if "cold" in setup.config.eval.protocols:
        return _compare_cold(setup, args, models)
    if setup.config.data.components:
        _default_components(models, setup.config.data.components)
    split = _load_split(args.split) if args.split else make_split(setup.config.data)
    tracker = _tracker(setup.config)
    outcome = run_compare(setup.config, split, models, tracker)
    print(outcome.text)
    print(_significance_note(outcome, setup.config.eval))
    if setup.config.output_dir:
        _write_compare_outputs(outcome, Path(setup.config.output_dir))
        log.info("results written to %s", setup.config.output_dir)
    _report_tracking(tracker)
    return 0


def _default_components(models: Sequence[Recommender], store: str) -> None:
    """``data.components`` for every model that takes a store and was given none of its own."""
    for model in models:
        if hasattr(model.config, "components_path") and model.config.components_path is None:
            model.config.components_path = store


def _compare_cold(setup: _Setup, args: argparse.Namespace, models: Sequence[Recommender]) -> int:
    """``acfrec compare --protocols cold``: see :mod:`acfrec.coldstart`."""
    from acfrec.coldstart import run_cold_compare, write_cold_outputs
    from acfrec.data.cold import cold_item_split
    from acfrec.data.components import ComponentStore

    config = setup.config
    if args.split:
        raise ConfigError("the cold protocol splits the interactions itself: pass --data (or a planted config), not --split")
    data = config.data
    catalogue = planted_catalogue_of(data)
    cold = cold_item_split(_interactions(data, catalogue), cold_share=config.eval.cold_share, seed=data.seed,
                           tie_rule=data.tie_rule, n_negatives=data.n_negatives, min_interactions=data.min_interactions)
    log.info("cold-item split: %s", cold.summary())
    if not data.components and catalogue is None:
        raise ConfigError("the cold protocol ranks new items from their content: pass --components STORE "
                          "(`acfrec encode` writes one) or set data.components")
    tracker = _tracker(config)
    with contextlib.ExitStack() as stack:
        if data.components:
            store = ComponentStore.open(data.components)
        else:  # the planted catalogue's frames; kept with the outputs when there is an output folder
            folder = config.output_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="acfrec-cold-"))
            store = catalogue.write_store(Path(folder) / "components", dim=DEMO_COMPONENT_DIM)
        outcome = run_cold_compare(config, cold, store, models, tracker, fit_and_evaluate)
    print(outcome.text)
    for reason in outcome.skipped:
        print(f"not ranked on cold items: {reason}")
    if config.output_dir:
        write_cold_outputs(outcome, Path(config.output_dir))
        log.info("results written to %s", config.output_dir)
    _report_tracking(tracker)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.small:
        args.overrides = [*DEMO_SMALL_OVERRIDES, *args.overrides]
    setup = _setup(args, base="demo")
    out = Path(setup.config.output_dir or args.out)
    models = _build_models(setup, _specs(setup.config, None), _show_progress(args))
    started = time.perf_counter()
    catalogue = planted_catalogue_of(setup.config.data)
    split = make_split(setup.config.data, catalogue)
    split.save(out / "split")
    log.info("planted-preference data: %s", split.summary())
    if catalogue is not None:
        _give_components(models, catalogue, split, out / "components")
    tracker = _tracker(setup.config)
    written: dict[str, Any] = {}

    def finish(parent: Any, by_name: dict[str, Recommender], best: str) -> None:
        # ACF's lists, model and attention when it is in the run; else the best model's lists.
        shown = written["shown"] = by_name.get("acf", by_name[best])
        _write_parquet(top_k_frame(shown, split, k=10), out / "top10.parquet")
        shown.save(out / "model")
        written["picture"] = _attention_picture(shown, catalogue, split, out / "attention.png")
        parent.log_artifact(out / "top10.parquet")
        if (out / "attention.png").is_file():
            parent.log_artifact(out / "attention.png")
        if tracker.tracking_uri:
            from acfrec.tracking.pyfunc import log_recommender

            written["model_uri"] = log_recommender(parent, out / "model")

    outcome = run_compare(setup.config, split, models, tracker, finish=finish)
    _write_compare_outputs(outcome, out)
    shown, picture = written["shown"], written["picture"]
    print(outcome.text)
    print(_significance_note(outcome, setup.config.eval))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs in {out}/:")
    print(f"  split/              the leave-one-out split ({split.n_users} users, {split.n_items} items)")
    if catalogue is not None:
        print("  components/         the frames' pixel-PCA components (ComponentStore) ACF attends over")
    print("  results.csv, .md    the comparison table above")
    print("  eval/<model>/       per-user ranks of the held-out items")
    print(f"  top10.parquet       top-10 unseen items of every user by {shown.name} (user, rank, item, score)")
    print(f"  model/              the trained {shown.name} model (Recommender.load)")
    if picture is not None:
        print(f"  attention.png       {picture}")
    if tracker.tracking_uri:
        print(f"MLflow: {tracker.tracking_uri} (experiment {tracker.experiment!r}, run {outcome.run_id})")
        print(f"  model: {written['model_uri']} (mlflow.pyfunc.load_model or acfrec.load)")
        print(f"  mlflow ui --backend-store-uri {tracker.tracking_uri}")
    return 0


def _give_components(models: Sequence[Recommender], catalogue: Catalogue, split: Split, store_path: Path) -> None:
    """Write the catalogue's frame components and hand them to every ACF model without its own."""
    from acfrec.coldstart import give_components, without_components

    if without_components(models):
        give_components(models, catalogue.write_store(store_path, dim=DEMO_COMPONENT_DIM), split.items)


def _attention_picture(model: Recommender, catalogue: Catalogue | None, split: Split, path: Path) -> str | None:
    """Draw why ACF recommends its top item to the first user; returns a one-line description."""
    from acfrec.models.acf import ACF
    from acfrec.viz import catalogue_frames, plot_attention

    if catalogue is None or not isinstance(model, ACF) or not model.module.has_content:
        return None
    user = 0
    (item,), _ = model.recommend([user], k=1)
    explanation = model.explain(user, int(item[0]), top_items=5, top_components=model.config.max_components)
    history = [entry["item"] for entry in explanation["history"]]
    position = {item_id: k for k, item_id in enumerate(catalogue.item_ids)}
    external = split.items.to_external(history)
    frames = catalogue_frames(catalogue.frames, catalogue.item_offsets, [position[e] for e in external])
    names = dict(zip(history, external, strict=True))
    user_id, item_id = split.users.to_external([user])[0], split.items.to_external([int(item[0])])[0]
    plot_attention(explanation, frames, path, item_names=names,
                   title=f"user {user_id}: why {item_id} (history items by alpha, frames by beta)")
    return f"user {user_id}'s attention over history items and their frames, explaining {item_id}"


def top_k_frame(model: Recommender, split: Split, k: int = 10) -> pl.DataFrame:
    """Top-``k`` items of every user, excluding every known interaction (train, valid and test).

    Returns a polars frame ``user, rank, item, score`` with external ids; rank 0 is the top
    (the library's 0-based ranks). Users with fewer than ``k`` unseen items get fewer rows.
    """
    import numpy as np
    import polars as pl
    import scipy.sparse as sp

    users = np.arange(split.n_users, dtype=np.int64)
    held = np.concatenate([split.valid_items, split.test_items])
    rows = np.concatenate([users, users])[held >= 0]
    heldout = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, held[held >= 0])), shape=split.train.shape)
    k = min(k, split.n_items)
    items, scores = model.recommend(users, k=k, exclude=heldout)
    keep = items >= 0
    return pl.DataFrame(
        {
            "user": split.users.to_external(np.repeat(users, k)[keep.ravel()]).tolist(),
            "rank": np.tile(np.arange(k, dtype=np.int64), users.size)[keep.ravel()],
            "item": split.items.to_external(items[keep]).tolist(),
            "score": scores[keep].astype(np.float32),
        },
        schema={"user": pl.String, "rank": pl.Int64, "item": pl.String, "score": pl.Float32},
    )


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)


def _add_run(parser: argparse.ArgumentParser) -> None:  # the pipeline runner lives in pipelines/
    from pipelines.runner import add_arguments

    add_arguments(parser)


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.runner import command

    return command(args)


def _add_encode(parser: argparse.ArgumentParser) -> None:  # the encode command lives in acfrec/encode.py
    from acfrec.encode import add_encode_arguments

    add_encode_arguments(parser)


def cmd_encode(args: argparse.Namespace) -> int:
    from acfrec.encode import cmd_encode as encode

    return encode(args)


_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str,
                           tuple[str, ...]]] = {
    "prepare": (
        _add_prepare, cmd_prepare, "read interactions and write a leave-one-out split",
        (
            "acfrec prepare --data ../shared/data/ml-100k/ml-100k.inter --out runs/ml100k-split",
            "acfrec prepare --data ratings.csv --rating-threshold 4 --tie-rule item_id --out runs/split "
            "--export-recbole recbole_data/ratings --name ratings",
        ),
    ),
    "train": (
        _add_train, cmd_train, "train one model on a split, save it, log the run to MLflow",
        (
            "acfrec train --split runs/ml100k-split --model bpr-mf --set dim=64 epochs=30 --out runs/bpr-mf",
            "acfrec train --split runs/ml100k-split --model fism --config ml100k --out runs/fism",
        ),
    ),
    "evaluate": (
        _add_evaluate, cmd_evaluate, "score a saved model on its split (full and sampled protocols)",
        ("acfrec evaluate --split runs/ml100k-split --model-dir runs/bpr-mf --protocols full sampled --ks 10 20",),
    ),
    "compare": (
        _add_compare, cmd_compare,
        "train several models on one split, evaluate them and test the differences against the best",
        (
            "acfrec compare --data ../shared/data/ml-100k/ml-100k.inter "
            "--models itempop bpr-mf fism svdpp als implicit-bpr --out runs/ml100k",
            "acfrec compare --config ml100k --data ../shared/data/ml-100k/ml-100k.inter --set fism.dim=32 epochs=10",
            "acfrec compare --split runs/ml100k-split --models itempop als --ks 10 20 --test bootstrap",
        ),
    ),
    "demo": (
        _add_demo, cmd_demo,
        "generate planted-preference data, compare itempop, bpr-mf, fism, svdpp and als on it, write results",
        ("acfrec demo", "acfrec demo --small --out /tmp/acfrec-demo --no-track"),
    ),
    "run": (
        _add_run, cmd_run,
        "run a pipeline file: prepare, encode, train, evaluate, topn steps, skipping unchanged ones",
        ("acfrec run pipelines/examples/demo.yaml", "acfrec run pipelines/examples/demo.yaml --dry-run",
         "acfrec run my.yaml --force train --set workdir=/shared/runs/my backend=ray"),
    ),
    "encode": (
        _add_encode, cmd_encode, "train (or load) a content encoder and write the component store of every item",
        ("acfrec encode --encoder darn --content mnist.npz --out runs/darn-store --set epochs=20 layers=[200]",
         "acfrec encode --encoder hashed-bow --content plots.csv --out runs/bow-store --set dim=128"),
    ),
}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
