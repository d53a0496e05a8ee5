"""Run a pipeline file: each step in order, skipped when its inputs and config did not change.

``acfrec run PIPELINE.yaml`` and ``python -m pipelines PIPELINE.yaml`` end here. A step runs when
it has no recorded success, when its config hash or an input's content hash differs from the
recorded ones, when its output was removed or altered, or when ``--force`` names it. After each
successful step the state file (``<workdir>/pipeline-state.json``) is rewritten atomically, so a
run that fails or is killed resumes at the step that did not finish.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.spec import PipelineConfig, PipelineError, load_pipeline
from pipelines.state import PipelineState, config_hash
from pipelines.steps import STEP_CLASSES, Context, Step

log = logging.getLogger("acfrec")
FORCED = "forced (--force): its output is removed and rebuilt"


@dataclass
class StepOutcome:
    """What happened to one step: ``status`` is run / skip (dry run: would-run / would-skip)."""

    name: str
    type: str
    status: str
    reason: str
    seconds: float = 0.0


def build_steps(config: PipelineConfig, specs: Sequence[Any], source: str) -> list[Step]:
    """Every step, checked and with its inputs resolved, before anything runs."""
    workdir = Path(str(config.workdir)).absolute()
    names = [spec.name for spec in specs]
    outputs: dict[str, Path] = {}
    steps = []
    for position, spec in enumerate(specs):
        step = STEP_CLASSES[spec.type](spec, config, workdir, outputs, set(names[position + 1 :]), source)
        outputs[spec.name] = step.output
        steps.append(step)
    return steps


def run_pipeline(
    path: str | Path,
    *,
    overrides: Sequence[str] = (),
    force: Sequence[str] = (),
    dry_run: bool = False,
    progress: bool = False,
    tracking: dict[str, Any] | None = None,
) -> list[StepOutcome]:
    """Run (or with ``dry_run`` only plan) the pipeline in ``path``.

    Args:
        overrides: ``dotted.key=value`` changes to the file (``steps.train.models=[itempop]``).
        force: step names to rerun even when unchanged ("all" for every step).
        tracking: ``uri`` / ``experiment`` / ``enabled`` overriding the file's ``tracking``.
    Returns:
        One :class:`StepOutcome` per step, in order.
    """
    config, specs = load_pipeline(path, list(overrides))
    for key, value in (tracking or {}).items():
        setattr(config.tracking, key, value)
    steps = build_steps(config, specs, str(path))
    unknown = sorted(set(force) - {s.name for s in steps} - {"all"})
    if unknown:
        raise PipelineError(f"--force {unknown[0]}: no such step; steps: {', '.join(s.name for s in steps)}")
    workdir = Path(str(config.workdir)).absolute()
    state = PipelineState.load(workdir)
    ctx = Context(config, _tracker(config) if not dry_run else None, progress)
    outcomes, will_run = [], set()
    log.info("pipeline %s (%d steps) in %s", config.name, len(steps), workdir)
    for number, step in enumerate(steps, 1):
        reason = _why_run(step, state, set(force), will_run if dry_run else set())
        label = f"[{number}/{len(steps)}] {step.name} ({step.type})"
        if reason is None:
            outcomes.append(StepOutcome(step.name, step.type, "would-skip" if dry_run else "skip", _unchanged(state, step)))
            log.info("%s: skipped, %s", label, outcomes[-1].reason)
            continue
        will_run.add(step.name)
        if dry_run:
            outcomes.append(StepOutcome(step.name, step.type, "would-run", reason))
            continue
        log.info("%s: running (%s)", label, reason)
        if reason == FORCED:
            step.clean()
        outcomes.append(StepOutcome(step.name, step.type, "run", reason, _execute(step, state, ctx)))
        log.info("%s: done in %.1f s", label, outcomes[-1].seconds)
    return outcomes


def _tracker(config: PipelineConfig) -> Any:
    from acfrec.cli import _tracker as tracker_of
    from acfrec.config import RunConfig

    return tracker_of(RunConfig(tracking=config.tracking))


def _input_hashes(step: Step, state: PipelineState) -> dict[str, str]:
    hashes = {}
    for label, path in step.inputs.items():
        digest = state.path_hash(path)
        if digest is None:
            producer = step.upstream.get(label)
            made_by = f" (the output of step {producer!r}, which has not run)" if producer else ""
            raise PipelineError(f"{step.where}.{label}: input {path} does not exist{made_by}")
        hashes[label] = digest
    return hashes


def _why_run(step: Step, state: PipelineState, force: set[str], pending: set[str]) -> str | None:
    """Why ``step`` must run, or None when its inputs, config and output are as last recorded.

    ``pending``: steps planned to run before this one in a dry run (their outputs may change).
    """
    if step.name in force or "all" in force:
        return FORCED
    upstream = sorted({s for s in step.upstream.values() if s in pending})
    if upstream:
        return f"its input comes from {', '.join(upstream)}, which runs first"
    inputs = _input_hashes(step, state)
    record = state.steps.get(step.name)
    if record is None:
        return "no successful run recorded"
    if record.get("config") != config_hash(step.fingerprint()):
        return "its config changed"
    changed = [label for label, digest in inputs.items() if record.get("inputs", {}).get(label) != digest]
    if changed:
        return f"input {changed[0]} changed ({step.inputs[changed[0]]})"
    if state.path_hash(step.output) != record.get("output"):
        return f"its output {step.output} is missing or was changed"
    return None


def _unchanged(state: PipelineState, step: Step) -> str:
    return f"inputs and config unchanged since {state.steps[step.name]['finished']}"


def _execute(step: Step, state: PipelineState, ctx: Context) -> float:
    """Run one step and record its hashes; returns its seconds."""
    ctx.input_hashes = _input_hashes(step, state)
    state.forget(step.name)  # until it succeeds again, a half-updated output is not "done"
    started = time.perf_counter()
    step.run(ctx)
    seconds = time.perf_counter() - started
    output = state.path_hash(step.output)
    if output is None:
        raise PipelineError(f"{step.where}: finished without writing its output {step.output}")
    state.record(step.name, config_hash(step.fingerprint()), ctx.input_hashes, output, seconds)
    return seconds


def format_outcomes(outcomes: Sequence[StepOutcome]) -> str:
    """One line per step: name, type, status, seconds, reason."""
    width = max(len(o.name) for o in outcomes)
    lines = []
    for o in outcomes:
        seconds = f"{o.seconds:7.1f} s" if o.status == "run" else " " * 9
        lines.append(f"{o.name:<{width}}  {o.type:<8}  {o.status:<10} {seconds}  {o.reason}")
    return "\n".join(lines)


# ============================================================================ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``acfrec run`` (the global options come from ``acfrec.cli``)."""
    parser.add_argument("pipeline", metavar="PIPELINE.yaml", help="the pipeline file (see pipelines/README.md)")
    parser.add_argument("--force", nargs="+", action="extend", default=[], metavar="STEP",
                        help="rerun these steps even if unchanged ('all' for every step)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run or be skipped, and why; run nothing")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override a pipeline value (YAML-typed): workdir=/shared/runs/demo, "
                             "steps.train.models=[itempop], steps.topn.k=20, backend=ray")


def command(args: argparse.Namespace) -> int:
    """``acfrec run``: run the pipeline, print one line per step."""
    import sys

    overrides = ([f"seed={args.seed}"] if args.seed is not None else []) + list(args.overrides)
    tracking = {k: v for k, v in (("uri", args.tracking_uri), ("experiment", args.experiment)) if v}
    if args.no_track:
        tracking["enabled"] = False
    outcomes = run_pipeline(
        args.pipeline, overrides=overrides, force=args.force, dry_run=args.dry_run,
        progress=sys.stderr.isatty() and not args.quiet, tracking=tracking,
    )
    print(format_outcomes(outcomes))
    return 0
