"""Leave-one-out evaluation: metrics from ranks, full and sampled protocols, comparison tests."""

from acfrec.eval.cold import ColdResult, cold_table, evaluate_cold
from acfrec.eval.compare import compare, format_table
from acfrec.eval.evaluate import EvalResult, evaluate, validation_ndcg
from acfrec.eval.metrics import hit_rate, metric_values, mrr, ndcg, recall, summarise
from acfrec.eval.protocols import full_ranking_ranks, sampled_ranks

__all__ = [
    "ColdResult",
    "EvalResult",
    "cold_table",
    "evaluate_cold",
    "compare",
    "evaluate",
    "format_table",
    "full_ranking_ranks",
    "hit_rate",
    "metric_values",
    "mrr",
    "ndcg",
    "recall",
    "sampled_ranks",
    "summarise",
    "validation_ndcg",
]
