"""The step types of a pipeline: prepare, encode, train, add_items, evaluate, topn.

Each step class checks its options (a dataclass filled by :func:`acfrec.config.build_config`, so
an unknown key fails with the closest known one), declares its inputs (paths whose content
hashes decide whether it reruns) and writes one output folder, ``<workdir>/<step name>``.
Steps only compose the library: splitting, training, evaluation and scoring live in ``acfrec``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from acfrec.config import DataConfig, EvalConfig, ModelSpec, build_config, model_params
from acfrec.utils import atomic_dir, atomic_write_text
from pipelines.spec import Backend, PipelineConfig, PipelineError, StepSpec, resolve_ref
from pipelines.state import config_hash

if TYPE_CHECKING:
    from acfrec.data.split import Split
    from acfrec.models.base import Recommender

log = logging.getLogger("acfrec")
CHECKPOINTS = ".checkpoints"  # resumable training state, hidden from the output hashes


@dataclass
class Context:
    """What a running step gets besides its options."""

    pipeline: PipelineConfig
    tracker: Any
    progress: bool
    input_hashes: dict[str, str] = field(default_factory=dict)

    def tags(self, step: Step) -> dict[str, str]:
        return {"acfrec.command": "run", "acfrec.pipeline": str(self.pipeline.name), "acfrec.step": step.name}


class Step(ABC):
    """One step: checked options, resolved input paths, an output folder and ``run``."""

    type: ClassVar[str]
    options_class: ClassVar[type]
    seeded_section: ClassVar[str | None] = None  # the options section whose `seed` defaults to the pipeline's

    def __init__(
        self, spec: StepSpec, pipeline: PipelineConfig, workdir: Path, outputs: Mapping[str, Path], later: set[str], source: str
    ) -> None:
        self.name, self.pipeline = spec.name, pipeline
        self.where = f"steps.{spec.name}"
        self.options = build_config(self.options_class, self._raw_options(dict(spec.options)), source, self.where)
        self.workdir = workdir
        self.output = (workdir / spec.name).absolute()
        self.inputs: dict[str, Path] = {}
        self.upstream: dict[str, str] = {}  # input label -> the earlier step that produces it
        self._outputs, self._later = dict(outputs), later
        self.resolve()

    def _raw_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The raw options before they are checked: the pipeline's seed is the section's default."""
        if self.seeded_section is None or self.pipeline.seed is None:
            return options
        section = dict(options.get(self.seeded_section) or {})
        section.setdefault("seed", self.pipeline.seed)
        return {**options, self.seeded_section: section}

    def ref(self, label: str, value: str) -> Path:
        """Resolve an input option (path or earlier step) and declare it as an input."""
        path, step = resolve_ref(value, self._outputs, self._later, f"{self.where}.{label}")
        self.inputs[label] = path
        if step is not None:
            self.upstream[label] = step
        return path

    @abstractmethod
    def resolve(self) -> None:
        """Declare the inputs (``self.ref``) and check the options that need no file."""

    def fingerprint(self) -> dict[str, Any]:
        """What the config hash covers: type, options (the backend excepted: same output), seed."""
        import acfrec

        options = {k: v for k, v in dataclasses.asdict(self.options).items() if k != "backend"}
        return {"type": self.type, "options": options, "seed": self.pipeline.seed, "acfrec": acfrec.__version__}

    def backend(self) -> Backend:
        return getattr(self.options, "backend", None) or self.pipeline.backend

    @abstractmethod
    def run(self, ctx: Context) -> None:
        """Write ``self.output``."""

    def clean(self) -> None:
        """Remove the output and resumable state (``--force``: start from scratch)."""
        for path in [self.output, *(self.workdir / CHECKPOINTS).glob(f"{self.name}*")]:
            shutil.rmtree(path, ignore_errors=True)


# ============================================================================ prepare
@dataclass
class PrepareOptions:
    data: DataConfig = field(default_factory=DataConfig)


class PrepareStep(Step):
    """Raw interactions (or planted data) -> a validated, leave-one-out, id-mapped Split folder."""

    type = "prepare"
    options_class = PrepareOptions

    seeded_section = "data"

    def resolve(self) -> None:
        data = self.options.data
        if data.path is None and data.planted is None:
            raise PipelineError(f"{self.where}.data: set `path` (an interactions file) or `planted` (generated data)")
        if data.path is not None:
            data.path = str(self.ref("data", data.path))

    def run(self, ctx: Context) -> None:
        from acfrec.cli import make_split

        split = make_split(self.options.data)
        split.save(self.output)
        log.info("  split: %s", split.summary())


# ============================================================================ encode
@dataclass
class EncodeOptions:
    encoder: str
    content: str
    config: dict[str, Any] = field(default_factory=dict)
    backend: Backend | None = None


class EncodeStep(Step):
    """Content -> a component store (``acfrec.encode.encode_to_store``); on Ray, items are sharded."""

    type = "encode"
    options_class = EncodeOptions

    seeded_section = "config"

    def resolve(self) -> None:
        self.options.content = str(self.ref("content", self.options.content))

    def run(self, ctx: Context) -> None:
        options = self.options
        # The trained encoder and its checkpoints belong to this config and content only: a
        # changed config trains a new encoder instead of reusing the saved one.
        key = config_hash({"step": self.fingerprint(), "content": ctx.input_hashes["content"]})[:12]
        encoder_dir = self.workdir / f"{self.name}.encoder-{key}"
        kwargs = dict(encoder_dir=encoder_dir, checkpoint_dir=self.workdir / CHECKPOINTS / f"{self.name}-{key}",
                      tracker=ctx.tracker, progress=ctx.progress)
        if self.backend() == "ray":
            from pipelines.ray_backend import encode_on_ray

            encode_on_ray(options.encoder, Path(options.content), self.output, self.pipeline.ray,
                          encoder_config=options.config, **kwargs)
        else:
            from acfrec.encode import encode_to_store

            encode_to_store(options.encoder, options.content, self.output, config=options.config, **kwargs)
        self._remove_encoders(keep=encoder_dir)

    def _remove_encoders(self, keep: Path | None = None) -> None:
        for stale in self.workdir.glob(f"{self.name}.encoder-*"):
            if stale != keep:
                shutil.rmtree(stale)

    def clean(self) -> None:
        super().clean()
        self._remove_encoders()


# ============================================================================ train
@dataclass
class TrainOptions:
    models: list[ModelSpec]
    split: str = "prepare"
    components: str | None = None
    log_model: bool = False  # also log each model to its MLflow run as a servable pyfunc model


class TrainStep(Step):
    """Fit each listed model on the split and save it to ``<output>/<model name>``, tracked in MLflow.

    A model whose saved folder records the same model options, seed, split and components is
    kept, so a rerun after a failure trains only the models that had not finished.
    """

    type = "train"
    options_class = TrainOptions

    def _raw_options(self, options: dict[str, Any]) -> dict[str, Any]:
        models = options.get("models")
        if isinstance(models, list):
            options["models"] = [{"name": m} if isinstance(m, str) else m for m in models]
        return options

    def resolve(self) -> None:
        from acfrec.models import available_models

        names = [spec.name for spec in self.options.models]
        if not names:
            raise PipelineError(f"{self.where}.models is empty: list at least one model")
        unknown = [n for n in names if n not in available_models()]
        if unknown:
            raise PipelineError(f"{self.where}.models: unknown model {unknown[0]!r}; available: {', '.join(available_models())}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PipelineError(f"{self.where}.models: {', '.join(twice)} listed twice (one saved folder per model name)")
        self.ref("split", self.options.split)
        if self.options.components is not None:
            self.ref("components", self.options.components)
        self.models = {spec.name: self._model(spec, checkpoint_key="check") for spec in self.options.models}

    def _model(self, spec: ModelSpec, checkpoint_key: str, progress: bool = False) -> Recommender:
        """Build (not fit) the model; a bad option fails here, before anything trains."""
        from acfrec.models import get_model

        cls = get_model(spec.name)
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        defaults: dict[str, Any] = {"progress": progress, "seed": self.pipeline.seed, "components_path": None,
                                    "checkpoint_dir": str(self.workdir / CHECKPOINTS / self.name / f"{spec.name}-{checkpoint_key}")}
        if "components" in self.inputs:
            defaults["components_path"] = str(self.inputs["components"])
        defaults = {k: v for k, v in defaults.items() if k in fields and v is not None}
        config = model_params(ModelSpec(spec.name, {**defaults, **spec.params}), cls.config_class, {}, self.where)
        return cls(config)

    def run(self, ctx: Context) -> None:
        from acfrec.data.split import Split

        split = Split.load(self.inputs["split"])
        self.output.mkdir(parents=True, exist_ok=True)
        listed = {spec.name for spec in self.options.models}
        for stale in (p for p in self.output.iterdir() if p.is_dir() and p.name not in listed):
            shutil.rmtree(stale)  # a model dropped from the list must not be evaluated as current
        for spec in self.options.models:
            key = config_hash({"spec": dataclasses.asdict(spec), "seed": self.pipeline.seed,
                               "split": split.fingerprint, "components": ctx.input_hashes.get("components")})
            model_dir = self.output / spec.name
            if _recorded_key(model_dir) == key:
                log.info("  %s: already trained with these options (kept)", spec.name)
                continue
            self._fit(self._model(spec, key[:12], ctx.progress), split, model_dir, key, ctx)

    def _fit(self, model: Recommender, split: Split, model_dir: Path, key: str, ctx: Context) -> None:
        from acfrec.cli import TRAINING_RECORD, fit_and_evaluate

        log.info("  training %s ...", model.name)
        with ctx.tracker.run(f"train {model.name}", tags=ctx.tags(self)) as run:
            fit_and_evaluate(model, split, EvalConfig(), run, targets=[])
            model.save(model_dir)
            record = {
                "model": model.name,
                "split": str(self.inputs["split"]),
                "split_fingerprint": split.fingerprint,
                "mlflow_run_id": run.run_id,
                "pipeline_key": key,
            }
            atomic_write_text(model_dir / TRAINING_RECORD, json.dumps(record, indent=2))
            if self.options.log_model and run.run_id is not None:
                from acfrec.tracking.pyfunc import log_recommender

                log_recommender(run, model_dir)


def _recorded_key(model_dir: Path) -> str | None:
    from acfrec.cli import TRAINING_RECORD

    try:
        return json.loads((model_dir / TRAINING_RECORD).read_text()).get("pipeline_key")
    except (OSError, json.JSONDecodeError):
        return None


# ============================================================================ evaluate
@dataclass
class EvaluateOptions(EvalConfig):
    split: str = "prepare"
    models: str = "train"


class EvaluateStep(Step):
    """Every saved model (a train step's folder, or one model folder), both protocols, one table.

    Writes ``results.csv``, ``results.md`` and ``eval/<model>/`` (per-user ranks); MLflow gets a
    parent run with the table and a child run per model.
    """

    type = "evaluate"
    options_class = EvaluateOptions

    def resolve(self) -> None:
        self.ref("split", self.options.split)
        self.ref("models", self.options.models)

    def run(self, ctx: Context) -> None:
        from acfrec.cli import CompareOutcome, _check_trained_on, _table_metrics, _write_compare_outputs
        from acfrec.data.split import Split
        from acfrec.eval.compare import compare, format_table
        from acfrec.eval.evaluate import evaluate
        from acfrec.models.base import Recommender

        options, split_path = self.options, self.inputs["split"]
        split = Split.load(split_path)
        results, models = {}, {}
        with ctx.tracker.run(f"evaluate {self.name}", tags=ctx.tags(self)) as parent:
            parent.log_split(split)
            for model_dir in model_dirs(self.inputs["models"]):
                model = models[model_dir.name] = Recommender.load(model_dir)
                _check_trained_on(model_dir, split, str(split_path))
                result = evaluate(model, split, target=options.target, protocols=options.protocols, ks=options.ks)
                with ctx.tracker.run(model_dir.name, tags={**ctx.tags(self), "acfrec.model": model.name}) as child:
                    child.log_metrics(result.metrics, prefix=options.target)
                results[model_dir.name] = result
            table = compare(results, metric=options.metric, protocol=options.protocols[0], test=options.test,
                            seed=self.pipeline.seed or 0)
            text = format_table(table, metrics=_table_metrics(options), markdown=True, bold_best=True)
            best = str(table.loc[table["best"], "model"].iloc[0])
            parent.log_table(table, "results.csv")
            parent.log_table(text + "\n", "results.md")
            parent.set_tags({"acfrec.best_model": best})
        with atomic_dir(self.output) as tmp:
            _write_compare_outputs(CompareOutcome(results, models, table, text, best, parent.run_id), tmp)
        print(text)


def model_dirs(path: Path) -> list[Path]:
    """``path`` itself when it is a saved model, else the saved models inside it (sorted)."""
    if (path / "meta.json").is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / "meta.json").is_file()) if path.is_dir() else []
    if not found:
        raise PipelineError(f"{path} holds no saved model (no <model>/meta.json): train some first")
    return found


# ============================================================================ add_items
@dataclass
class AddItemsOptions:
    model: str
    components: str
    items: list[str] | None = None


class AddItemsStep(Step):
    """A trained model plus new items from a component store -> ``<output>`` (a model folder).

    The model computes the new items' vectors from their content (ACF with ``content_tower``,
    :meth:`acfrec.models.acf.ACF.add_items`); by default every store item it does not know yet is
    added, or only ``items``. A topn step on this output then recommends them.
    """

    type = "add_items"
    options_class = AddItemsOptions

    def resolve(self) -> None:
        self.ref("model", self.options.model)
        self.ref("components", self.options.components)

    def run(self, ctx: Context) -> None:
        from acfrec.cli import TRAINING_RECORD
        from acfrec.data.components import ComponentStore
        from acfrec.models.base import Recommender

        model_dir = self.inputs["model"]
        if not (model_dir / "meta.json").is_file():
            raise PipelineError(f"{self.where}.model: {model_dir} is not a saved model (no meta.json)")
        model = Recommender.load(model_dir)
        if not hasattr(model, "add_items"):
            raise PipelineError(f"{self.where}.model: {model.name} cannot add items from content (train ACF with content_tower: true)")
        before = model.n_items
        model.add_items(ComponentStore.open(self.inputs["components"]), self.options.items)
        model.save(self.output)
        if (model_dir / TRAINING_RECORD).is_file():  # same users and split: topn checks it
            shutil.copy2(model_dir / TRAINING_RECORD, self.output / TRAINING_RECORD)
        with ctx.tracker.run(f"add_items {self.name}", tags=ctx.tags(self)) as run:
            run.log_params({"model_dir": str(model_dir), "components": str(self.inputs["components"])})
            run.log_metrics({"items_added": model.n_items - before, "n_items": model.n_items})
        log.info("  %d items added (%d now): %s", model.n_items - before, model.n_items, self.output)


# ============================================================================ topn
@dataclass
class TopnOptions:
    model: str
    split: str = "prepare"
    k: int = 10
    chunk_users: int = 10_000
    exclude: Literal["all", "train"] = "all"
    retrieval: Literal["auto", "recommend", "index"] = "auto"
    index: dict[str, Any] = field(default_factory=dict)
    backend: Backend | None = None


class TopnStep(Step):
    """Every user's top-k unseen items -> parquet parts + manifest (see :mod:`pipelines.topn`)."""

    type = "topn"
    options_class = TopnOptions

    def resolve(self) -> None:
        self.settings().check()
        self.ref("split", self.options.split)
        self.ref("model", self.options.model)

    def settings(self) -> Any:
        from pipelines.topn import TopnSettings

        o = self.options
        return TopnSettings(k=o.k, chunk_users=o.chunk_users, exclude=o.exclude, retrieval=o.retrieval, index=o.index)

    def run(self, ctx: Context) -> None:
        from acfrec.cli import _check_trained_on

        model_dir, split_path = self.inputs["model"], self.inputs["split"]
        if not (model_dir / "meta.json").is_file():
            raise PipelineError(f"{self.where}.model: {model_dir} is not a saved model (no meta.json)")
        settings = self.settings()
        key = config_hash({"inputs": ctx.input_hashes, "settings": dataclasses.asdict(settings)})
        if self.backend() == "ray":
            from pipelines.ray_backend import topn_on_ray

            manifest = topn_on_ray(model_dir, split_path, self.output, settings, key, self.pipeline.ray, ctx.progress)
        else:
            from acfrec.data.split import Split
            from acfrec.models.base import Recommender
            from pipelines.topn import write_topn

            split = Split.load(split_path)
            _check_trained_on(model_dir, split, str(split_path))
            manifest = write_topn(Recommender.load(model_dir), split, self.output, settings, key=key, progress=ctx.progress)
        with ctx.tracker.run(f"topn {self.name}", tags=ctx.tags(self)) as run:
            run.log_params({"model_dir": str(model_dir), "backend": self.backend(), **manifest["settings"]})
            run.log_metrics({"rows": manifest["rows"], "users": manifest["users_with_rows"], "parts": len(manifest["parts"])})
            run.log_artifact(self.output / "manifest.json", "topn")
        log.info("  %d rows for %d users in %d parts: %s", manifest["rows"], manifest["users_with_rows"],
                 len(manifest["parts"]), self.output)


STEP_CLASSES: dict[str, Callable[..., Step]] = {
    cls.type: cls for cls in (PrepareStep, EncodeStep, TrainStep, AddItemsStep, EvaluateStep, TopnStep)
}
