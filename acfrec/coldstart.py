"""Cold-start experiments: ``acfrec compare --protocols cold``.

The interactions are split by :func:`acfrec.data.cold.cold_item_split` (a seeded ``eval.cold_share``
of the items held out entirely). Every model is fitted on the warm split; a model that can add
items from content (ACF with ``content_tower=True``) then gets the cold items from the component
store and is ranked by :func:`acfrec.eval.cold.evaluate_cold`, beside the content baselines
(random, content popularity, content kNN) that the protocol always runs. Other protocols asked
for with ``cold`` (``full``, ``sampled``) measure the warm items' quality on the warm split, so
the price of the tower on warm items shows in the same run. One parent MLflow run, one child
per model or baseline (``cold.<protocol>.<metric>`` and ``test.<protocol>.<metric>``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from acfrec.config import EvalConfig, RunConfig, to_dict
from acfrec.data.cold import ColdSplit
from acfrec.data.components import ComponentStore
from acfrec.data.idmap import IdMap
from acfrec.eval.cold import ColdResult, cold_table, evaluate_cold
from acfrec.eval.compare import compare, format_table, write_comparison
from acfrec.eval.evaluate import EvalResult
from acfrec.models.base import Recommender
from acfrec.models.content_knn import ContentKNN, ContentPopularity, ContentScorer, RandomScorer, item_content

log = logging.getLogger("acfrec")

COLD = "cold"
FitAndEvaluate = Callable[[Recommender, Any, EvalConfig, Any, Sequence[str]], dict[str, EvalResult]]


@dataclass
class ColdCompareOutcome:
    """What :func:`run_cold_compare` produced.

    Attributes:
        results: label -> :class:`ColdResult` of every baseline and every model that scored the
            cold items.
        warm: model name -> :class:`EvalResult` on the warm split (empty without warm protocols).
        table: the comparison (``acfrec.eval.compare`` shape, cold protocol columns).
        text: the markdown tables (cold, then warm when measured).
        best: label of the best row by the first table metric among the cold items.
        skipped: models that cannot score cold items, with the reason.
        run_id: the parent MLflow run (None without tracking).
    """

    results: dict[str, ColdResult]
    warm: dict[str, EvalResult]
    table: pd.DataFrame
    text: str
    best: str
    skipped: list[str]
    run_id: str | None


def cold_metrics(eval_config: EvalConfig) -> list[str]:
    """The table's metric columns: ``table_metrics``, else Recall and NDCG at 20 (or the smallest k)."""
    if eval_config.table_metrics:
        return list(eval_config.table_metrics)
    k = 20 if 20 in eval_config.ks else min(eval_config.ks)
    return [f"Recall@{k}", f"NDCG@{k}"]


def content_baselines(seed: int, neighbours: int = 10) -> list[ContentScorer]:
    """The protocol's reference rows: random, content popularity and content kNN."""
    return [RandomScorer(seed=seed), ContentPopularity(k=neighbours), ContentKNN()]


def can_add_items(model: Recommender) -> str | None:
    """None when ``model`` can score items from content, else why not."""
    if not hasattr(model, "add_items"):
        return f"{model.name} has no content path"
    if not getattr(model.config, "content_tower", False):
        return f"{model.name} was configured without content_tower=true"
    return None


def without_components(models: Sequence[Recommender]) -> list[Recommender]:
    """The ACF models that were given no component store of their own."""
    from acfrec.models.acf import ACF

    return [m for m in models if isinstance(m, ACF) and m.config.components_path is None]


def give_components(models: Sequence[Recommender], store: ComponentStore, items: IdMap) -> None:
    """Hand ``store``, aligned on ``items`` (the training items), to every ACF model without its own."""
    for model in without_components(models):
        model.set_components(store.align(items, model.config.max_components))


def run_cold_compare(
    config: RunConfig,
    cold: ColdSplit,
    store: ComponentStore,
    models: Sequence[Recommender],
    tracker: Any,
    fit_and_evaluate: FitAndEvaluate,
) -> ColdCompareOutcome:
    """Fit every model on ``cold.warm``, add the cold items where a model can, rank them.

    ``fit_and_evaluate(model, split, eval_config, run, targets)`` fits and logs one model
    (:func:`acfrec.cli.fit_and_evaluate`).
    """
    eval_config = config.eval
    warm_protocols = [p for p in eval_config.protocols if p != COLD]
    warm_eval = replace(eval_config, protocols=warm_protocols or ["full"])
    targets = [eval_config.target] if warm_protocols else []
    metrics = cold_metrics(eval_config)
    results: dict[str, ColdResult] = {}
    warm: dict[str, EvalResult] = {}
    skipped: list[str] = []
    give_components(models, store, cold.warm.items)
    with tracker.run("compare-cold", tags={"acfrec.command": "compare", "acfrec.protocol": COLD}) as parent:
        parent.log_split(cold.warm)
        parent.log_config(to_dict(config))
        parent.log_params({"cold_share": eval_config.cold_share, "n_cold_items": cold.n_cold,
                           "components": str(store.path)})
        content = item_content(store, cold.items)
        for scorer in content_baselines(config.data.seed):
            with tracker.run(scorer.name, tags={"acfrec.command": "compare", "acfrec.protocol": COLD}) as child:
                results[scorer.name] = evaluate_cold(scorer.fit(cold.warm.train, content), cold, eval_config.ks)
                child.log_metrics(results[scorer.name].metrics, prefix=COLD)
        for model in models:
            log.info("training %s on the warm items ...", model.name)
            with tracker.run(model.name, tags={"acfrec.command": "compare", "acfrec.protocol": COLD}) as child:
                found = fit_and_evaluate(model, cold.warm, warm_eval, child, targets)
                if targets:
                    warm[model.name] = found[eval_config.target]
                reason = can_add_items(model)
                if reason is not None:
                    skipped.append(reason)
                    log.info("  %s: not ranked on cold items (%s)", model.name, reason)
                    continue
                model.add_items(store, cold.cold_ids)
                results[model.name] = evaluate_cold(model, cold, eval_config.ks, label=model.name)
                child.log_metrics(results[model.name].metrics, prefix=COLD)
        table = compare(results, metric=metrics[0], protocol=COLD, test=eval_config.test, seed=config.data.seed)  # type: ignore[arg-type]
        text = _tables_text(results, warm, metrics, eval_config, cold)
        best = str(table.loc[table["best"], "model"].iloc[0])
        parent.log_table(table, "cold_results.csv")
        parent.log_table(text + "\n", "cold_results.md")
        parent.set_tags({"acfrec.best_model": best})
    return ColdCompareOutcome(results, warm, table, text, best, skipped, parent.run_id)


def _tables_text(
    results: dict[str, ColdResult], warm: dict[str, EvalResult], metrics: list[str], eval_config: EvalConfig, cold: ColdSplit
) -> str:
    summary = cold.summary()
    lines = [
        f"cold items: {cold.n_cold} of {cold.n_items} (share {eval_config.cold_share}), "
        f"{summary['n_cold_interactions']} cold interactions of {summary['n_cold_users']} users",
        "",
        cold_table(results, metrics=metrics, test=eval_config.test),
    ]
    if warm:
        k = min(eval_config.ks)
        frame = compare(warm, metric=f"NDCG@{k}", protocol=next(iter(next(iter(warm.values())).ranks)),
                        test=eval_config.test)
        lines += ["", "warm items (the warm split's test items):", "",
                  format_table(frame, metrics=[f"HR@{k}", f"NDCG@{k}"], markdown=True)]
    return "\n".join(lines)


def write_cold_outputs(outcome: ColdCompareOutcome, out: Path) -> None:
    """``cold_results.csv`` / ``.md``, per-model positions under ``cold/<label>/`` and warm ranks
    under ``eval/<model>/``."""
    write_comparison(out, outcome.table, outcome.text, outcome.results, stem="cold_results", folder="cold")
    for name, result in outcome.warm.items():
        result.save(out / "eval" / name)


__all__ = [
    "ColdCompareOutcome",
    "can_add_items",
    "cold_metrics",
    "content_baselines",
    "give_components",
    "without_components",
    "run_cold_compare",
    "write_cold_outputs",
]
