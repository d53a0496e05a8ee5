"""Side-by-side comparison of EvalResults with paired significance tests against the best model."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from acfrec.errors import DataValidationError
from acfrec.eval.evaluate import EvalResult
from acfrec.utils import atomic_write_text

TESTS = ("wilcoxon", "bootstrap")
# Bootstrap resamples are drawn in blocks of about this many indices, bounding memory for
# large user counts without a Python loop per resample.
_BOOT_BLOCK = 4_000_000


def _named(results: Mapping[str, EvalResult] | Sequence[EvalResult]) -> dict[str, EvalResult]:
    if isinstance(results, Mapping):
        named = dict(results)
    else:
        named = {}
        for result in results:
            if result.model_name in named:
                raise DataValidationError(
                    f"two results are named {result.model_name!r}: pass a dict {{label: result}} to tell them apart"
                )
            named[result.model_name] = result
    if not named:
        raise DataValidationError("compare needs at least one EvalResult")
    return named


def _aligned_users(named: dict[str, EvalResult]) -> dict[str, np.ndarray]:
    """Per model, the order that sorts its users; raises if the models saw different users or targets."""
    first_name, first = next(iter(named.items()))
    reference = np.sort(first.users)
    orders = {}
    for name, result in named.items():
        if result.target != first.target:
            raise DataValidationError(
                f"{name} was evaluated on target {result.target!r} but {first_name} on {first.target!r}"
            )
        order = np.argsort(result.users, kind="stable")
        if not np.array_equal(result.users[order], reference):
            only = np.setdiff1d(result.users, reference).size + np.setdiff1d(reference, result.users).size
            raise DataValidationError(
                f"{name} and {first_name} were evaluated on different users "
                f"({result.users.size} vs {first.users.size} users, {only} not shared): paired tests need the same split"
            )
        orders[name] = order
    return orders


def _bootstrap(diff: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """95% percentile CI of the mean of ``diff`` ``(n,)`` and a two-sided bootstrap p-value."""
    rng = np.random.default_rng(seed)
    n = diff.size
    block = max(1, _BOOT_BLOCK // max(n, 1))
    means = np.concatenate(
        [
            diff[rng.integers(0, n, size=(min(block, n_boot - s), n))].mean(axis=1)
            for s in range(0, n_boot, block)
        ]
    )
    low, high = np.percentile(means, [2.5, 97.5])
    p_value = min(1.0, 2.0 * min((means <= 0).mean(), (means >= 0).mean()))
    return float(low), float(high), float(p_value)


def _wilcoxon(diff: np.ndarray) -> float:
    if not np.any(diff != 0):
        return 1.0  # identical per-user values: no evidence of any difference
    return float(stats.wilcoxon(diff).pvalue)


def compare(
    results: Mapping[str, EvalResult] | Sequence[EvalResult],
    metric: str = "NDCG@10",
    protocol: str = "full",
    test: str = "wilcoxon",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per model: every ``"<protocol> <metric>"`` mean, plus a paired test against the best.

    The best model has the highest mean per-user ``metric`` under ``protocol``. Every other model
    is compared with it on the same users: ``diff`` = mean(model - best), and ``p_value`` from a
    Wilcoxon signed-rank test (``test="wilcoxon"``) or a paired bootstrap over users
    (``test="bootstrap"``, which also fills ``ci_low`` / ``ci_high``, the 95% CI of ``diff``).

    Args:
        results: ``{label: EvalResult}`` or a list (labelled by ``model_name``).
    Returns:
        DataFrame with columns ``model``, the metric columns (e.g. ``"full NDCG@10"``), ``best``
        (bool), ``vs``, ``diff``, ``p_value``, ``ci_low``, ``ci_high`` (NaN on the best row and,
        for the CI, under Wilcoxon).
    """
    if test not in TESTS:
        raise DataValidationError(f"test must be one of {TESTS}, got {test!r}")
    if n_boot < 1:
        raise DataValidationError(f"n_boot must be >= 1, got {n_boot}")
    named = _named(results)
    orders = _aligned_users(named)
    per_user = {name: r.per_user(metric, protocol)[orders[name]] for name, r in named.items()}
    best = max(per_user, key=lambda name: per_user[name].mean())
    rows = []
    for name, result in named.items():
        row: dict[str, object] = {"model": name}
        row.update({f"{p} {m}": v for p, values in result.metrics.items() for m, v in values.items()})
        row.update(
            best=name == best, vs=None, diff=math.nan, p_value=math.nan, ci_low=math.nan, ci_high=math.nan
        )
        if name != best:
            diff = per_user[name] - per_user[best]
            row.update(vs=best, diff=float(diff.mean()))
            if test == "wilcoxon":
                row["p_value"] = _wilcoxon(diff)
            else:
                row["ci_low"], row["ci_high"], row["p_value"] = _bootstrap(diff, n_boot, seed)
        rows.append(row)
    frame = pd.DataFrame(rows)
    tail = ["best", "vs", "diff", "p_value", "ci_low", "ci_high"]
    return frame[["model", *[c for c in frame.columns if c not in tail and c != "model"], *tail]]


def metric_columns(df: pd.DataFrame, metrics: Iterable[str] | None = None) -> list[str]:
    """Columns of ``df`` holding ``"<protocol> <metric>"`` means, optionally only for ``metrics``.

    ``metrics`` items may be a metric (``"NDCG@10"``, every protocol) or a full column name.
    """
    candidates = [c for c in df.columns if isinstance(c, str) and " " in c]
    if metrics is None:
        return candidates
    wanted = list(metrics)
    chosen = [c for c in candidates if c in wanted or c.split(" ", 1)[1] in wanted]
    if not chosen:
        raise DataValidationError(f"none of the metrics {wanted} is in the table; it has {candidates}")
    return chosen


def _format_value(value: object, digits: int) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def format_table(
    df: pd.DataFrame,
    metrics: Iterable[str] | None = None,
    markdown: bool = True,
    bold_best: bool = True,
    digits: int = 4,
    show_tests: bool = True,
) -> str:
    """Render a :func:`compare` table as text: models x ``"<protocol> <metric>"`` columns.

    The best value of each metric column is in ``**bold**`` (markdown) or marked with ``*``
    (plain text); ties are all marked. ``show_tests`` appends the ``vs``/``diff``/``p_value``
    (and CI, when filled) columns.
    """
    columns = metric_columns(df, metrics)
    if show_tests:
        columns += [
            c for c in ("vs", "diff", "p_value", "ci_low", "ci_high") if c in df and df[c].notna().any()
        ]
    cells = [[str(model)] for model in df["model"]]
    for column in columns:
        values = df[column].tolist()
        is_metric = column in metric_columns(df)
        top = max((v for v in values if isinstance(v, float) and not math.isnan(v)), default=None)
        for row, value in zip(cells, values, strict=True):
            text = _format_value(value, digits)
            if bold_best and is_metric and top is not None and value == top:
                text = f"**{text}**" if markdown else f"{text}*"
            row.append(text)
    header = ["model", *columns]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * len(columns)]) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            text.ljust(w) if i == 0 else text.rjust(w)
            for i, (text, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *cells]
    )


def write_comparison(
    out: Path, table: pd.DataFrame, text: str, results: Mapping[str, Any], stem: str = "results", folder: str = "eval"
) -> None:
    """``<stem>.csv`` (the :func:`compare` table), ``<stem>.md`` (``text``) and each result's
    ``save`` under ``<folder>/<label>/``, in folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{stem}.md", text + "\n")
    for label, result in results.items():
        result.save(out / folder / label)
