"""Training-epoch and full-ranking evaluation speed of every model on ML-100K.

Each model runs in its own subprocess so its peak resident memory is its own. Printed per model:
one training epoch (seconds, training pairs per second), full-ranking evaluation of every test
user (seconds, users per second) and the process's peak RSS. As a peer in the same run, the
evaluation is also timed with a plain numpy brute force (dense argsort per user chunk).

    python benchmarks/bench_ml100k.py [--data ../shared/data/ml-100k/ml-100k.inter] [--models ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k" / "ml-100k.inter"
DEFAULT_MODELS = ["itempop", "bpr-mf", "fism", "svdpp", "als", "implicit-bpr"]


def load_split(data: Path):
    from acfrec.data.io import read_interactions
    from acfrec.data.splitting import leave_one_out

    return leave_one_out(read_interactions(data))


def two_epoch_overrides(model_cls) -> dict:
    """Two epochs (iterations): the second one's time excludes one-off start-up costs."""
    fields = set(model_cls.config_class.__dataclass_fields__)
    overrides = {"epochs": 2, "iterations": 2, "progress": False, "patience": 0}
    return {k: v for k, v in overrides.items() if k in fields}


def numpy_brute_force_ranks(scores_fn, users, targets, seen, chunk: int = 1024):
    """Peer: rank of each target by a full numpy argsort of every user's scores."""
    import numpy as np

    ranks = np.empty(users.size, dtype=np.int64)
    for start in range(0, users.size, chunk):
        block = users[start : start + chunk]
        scores = scores_fn(block).numpy().astype(np.float64)
        rows, cols = seen[block].nonzero()
        target = targets[start : start + chunk]
        keep = cols != target[rows]
        scores[rows[keep], cols[keep]] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        ranks[start : start + chunk] = np.argmax(order == target[:, None], axis=1)
    return ranks


def run_one(name: str, data: Path) -> dict:
    import numpy as np
    import torch

    from acfrec.eval.protocols import full_ranking_ranks
    from acfrec.models import get_model

    torch.set_num_threads(2)
    split = load_split(data)
    model_cls = get_model(name)
    model = model_cls(**two_epoch_overrides(model_cls))
    start = time.perf_counter()
    model.fit(split.train, valid=None)
    train_seconds = model.history[-1]["seconds"] if model.history else time.perf_counter() - start
    users = split.eval_users("test")
    targets = split.test_items[users]
    seen = split.seen("test")
    full_ranking_ranks(model, users[:64], targets[:64], seen)  # warm-up
    start = time.perf_counter()
    ranks = full_ranking_ranks(model, users, targets, seen)
    eval_seconds = time.perf_counter() - start
    start = time.perf_counter()
    peer_ranks = numpy_brute_force_ranks(model.score_all, users, targets, seen)
    peer_seconds = time.perf_counter() - start
    return {
        "model": name,
        "epoch_s": train_seconds,
        "pairs_per_s": split.train.nnz / train_seconds,
        "eval_users": int(users.size),
        "eval_s": eval_seconds,
        "numpy_eval_s": peer_seconds,
        "hr10_one_epoch": float(np.mean(ranks < 10)),
        "ranks_agree_with_numpy": float(np.mean(ranks >= peer_ranks)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.data)))
        return
    if not args.data.is_file():
        sys.exit(f"ML-100K not found at {args.data}; pass --data PATH/ml-100k.inter")
    rows = []
    for name in args.models:
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, "--data", str(args.data)],
            capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = f"{'model':<14}{'epoch s':>9}{'pairs/s':>11}{'eval s':>9}{'numpy eval s':>14}{'peak RSS MB':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<14}{r['epoch_s']:>9.2f}{r['pairs_per_s']:>11.0f}{r['eval_s']:>9.3f}"
            f"{r['numpy_eval_s']:>14.3f}{r['peak_rss_mb']:>13.0f}"
        )
    print(f"\nfull ranking over {rows[0]['eval_users'] if rows else 0} test users; 'epoch' = one pass over the training pairs "
          "(ALS / implicit-BPR: one iteration); numpy eval = dense argsort brute force, the peer.")


if __name__ == "__main__":
    main()
