"""Batch pipelines: one YAML file runs prepare, encode, train, evaluate and topn steps in order.

``acfrec run PIPELINE.yaml`` (or ``python -m pipelines PIPELINE.yaml``) runs it; a step whose
inputs (content hashes) and config did not change since its last success is skipped, so a rerun
after a failure resumes where it stopped. See ``pipelines/README.md`` for the file's schema.
"""

from pipelines.runner import StepOutcome, format_outcomes, run_pipeline
from pipelines.spec import PipelineError, load_pipeline
from pipelines.topn import TopnSettings, read_topn, write_topn

__all__ = [
    "PipelineError",
    "StepOutcome",
    "TopnSettings",
    "format_outcomes",
    "load_pipeline",
    "read_topn",
    "run_pipeline",
    "write_topn",
]
