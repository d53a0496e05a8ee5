"""Top-k retrieval speed and recall: acfrec's FAISS indexes against brute force and ``implicit``.

Two catalogues in one run:

* ``clustered``: generated clustered vectors (:func:`acfrec.index.clustered_vectors`),
  ``--n-items`` x ``--dim`` items and ``--queries`` queries, nothing excluded.
* ``ml-100k``: a model trained on ML-100K (``--model``: BPR-MF or FISM); its item vectors
  ``[q_j, b_j]`` and every user's ``[x_u, 1]`` as a query (:func:`acfrec.index.model_vectors`),
  the user's training items excluded.

For each: build seconds, queries per second, recall@k against the exact top-k of a torch brute
force and peak extra resident memory (build + search), for torch brute force, ``implicit``'s
batch ``recommend`` (its CPU ``MatrixFactorizationBase`` fed the same factors), and the flat, IVF
and HNSW indexes (HNSW in both spaces, see :class:`acfrec.index.IndexConfig`). The last lines
check the acceptance bar on the clustered catalogue: recall@k >= 0.95 at >= 20x brute force.

    python benchmarks/bench_retrieval.py [--n-items 200000] [--dim 64] [--queries 2000] [--k 100]
        [--model bpr-mf|fism] [--skip-hnsw] [--skip-ml100k] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import resource
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from acfrec.index import IndexConfig, ItemIndex, clustered_vectors, model_vectors

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k" / "ml-100k.inter"
Search = Callable[[], tuple[np.ndarray, np.ndarray]]
TARGET_RECALL, TARGET_SPEEDUP = 0.95, 20.0


def brute_force(queries: np.ndarray, items: np.ndarray, k: int, seen: sp.csr_matrix | None, chunk: int = 256) -> np.ndarray:
    """Exact top-k ``(n_queries, k)`` item ids by a chunked torch matmul + topk."""
    items_t = torch.from_numpy(items)
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], chunk):
        scores = torch.from_numpy(queries[start : start + chunk]) @ items_t.T
        if seen is not None:
            rows, cols = seen[start : start + chunk].nonzero()
            scores[torch.as_tensor(rows), torch.as_tensor(cols)] = -torch.inf
        out[start : start + chunk] = scores.topk(k, dim=1).indices.numpy()
    return out


def implicit_search(queries: np.ndarray, items: np.ndarray, k: int, seen: sp.csr_matrix | None) -> Search:
    """``implicit``'s batch recommend over the same factors (its own multi-threaded top-k)."""
    from implicit.cpu.als import AlternatingLeastSquares

    with warnings.catch_warnings():  # its OpenBLAS-threads advice concerns ALS training, not recommend
        warnings.simplefilter("ignore", RuntimeWarning)
        model = AlternatingLeastSquares(factors=queries.shape[1])
    model.user_factors, model.item_factors = queries, items
    user_items = seen if seen is not None else sp.csr_matrix((queries.shape[0], items.shape[0]), dtype=np.float32)
    users = np.arange(queries.shape[0])
    return lambda: model.recommend(users, user_items, N=k, filter_already_liked_items=seen is not None)


def recall(got: np.ndarray, true: np.ndarray) -> float:
    """Share of the exact top-k found (padding -1 never counts)."""
    hits = 0
    for start in range(0, got.shape[0], 256):  # bounds the (chunk, k, k) comparison
        g, t = got[start : start + 256], true[start : start + 256]
        hits += int(((g[:, :, None] == t[:, None, :]).any(axis=2) & (g >= 0)).sum())
    return hits / true.size


def resident_bytes() -> int:
    """Current resident set size (Linux ``/proc``; elsewhere the peak so far, from getrusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_freed_memory() -> None:
    """Hand memory freed by earlier methods back to the OS (glibc keeps it otherwise), so the
    next method's growth is measured from a clean level."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak resident memory above the level at entry while the block runs, sampled every 5 ms.

    Resident memory sees what faiss, implicit and torch allocate in C++ (tracemalloc would not).
    """

    def __enter__(self) -> PeakMemory:
        gc.collect()
        _release_freed_memory()
        self.start = self.peak = resident_bytes()
        self._done = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()
        return self

    def _poll(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._poller.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.start) / 2**20


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_catalogue(
    name: str, queries: np.ndarray, items: np.ndarray, k: int, seen: sp.csr_matrix | None, configs: dict[str, IndexConfig]
) -> list[dict]:
    """Every method on one catalogue: rows of the result table."""
    n = queries.shape[0]
    with PeakMemory() as memory:
        true, exact_seconds = timed(lambda: brute_force(queries, items, k, seen))
    rows = [{"catalogue": name, "method": "torch brute force", "build_s": 0.0, "qps": n / exact_seconds,
             "recall": 1.0, "peak_mb": memory.megabytes}]
    with PeakMemory() as memory:
        (got, _), seconds = timed(implicit_search(queries, items, k, seen))
    rows.append({"catalogue": name, "method": "implicit recommend", "build_s": 0.0, "qps": n / seconds,
                 "recall": recall(got, true), "peak_mb": memory.megabytes})
    for label, config in configs.items():
        with PeakMemory() as memory:
            index, build_seconds = timed(lambda config=config: ItemIndex.build(items, params=config))
            (got, _), seconds = timed(lambda index=index: index.search(queries, k, exclude=seen))
        del index
        rows.append({"catalogue": name, "method": label, "build_s": build_seconds, "qps": n / seconds,
                     "recall": recall(got, true), "peak_mb": memory.megabytes})
        print(f"  {name} {label}: build {build_seconds:.1f} s, {n / seconds:,.0f} q/s, "
              f"recall {rows[-1]['recall']:.3f}", flush=True)
    for row in rows:
        row["speedup"] = row["qps"] / rows[0]["qps"]
        row.update(n_items=items.shape[0], dim=items.shape[1], n_queries=n, k=k)
    return rows


def trained_vectors(data: Path, model_name: str, epochs: int, seed: int) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """A model trained on ``data`` (leave-one-out train part): queries ``[x_u, 1]``, items ``[q_j, b_j]``, seen."""
    from acfrec.data.io import read_interactions
    from acfrec.data.splitting import leave_one_out
    from acfrec.models import get_model

    split = leave_one_out(read_interactions(data), seed=seed)
    model, seconds = timed(lambda: get_model(model_name)(seed=seed, epochs=epochs, progress=False).fit(split))
    print(f"trained {model_name} on {data.name} in {seconds:.0f} s ({len(model.history)} epochs)", flush=True)
    queries, items = model_vectors(model, np.arange(model.n_users))
    return queries, items, model.seen


def index_configs(args: argparse.Namespace) -> dict[str, IndexConfig]:
    base = IndexConfig(seed=args.seed)
    ivf = dataclasses.replace(base, kind="ivf", nlist=args.nlist, nprobe=args.nprobe)
    hnsw = dataclasses.replace(base, kind="hnsw", hnsw_m=args.hnsw_m, ef_search=args.ef_search,
                               ef_construction=args.ef_construction)
    hnsw_label = f"M {hnsw.hnsw_m}, efSearch {hnsw.ef_search}, efC {hnsw.ef_construction}"
    if args.skip_hnsw:
        return {"faiss flat": base, f"faiss IVF (nlist {ivf.nlist or 'auto'}, nprobe {ivf.nprobe})": ivf}
    return {
        "faiss flat": base,
        f"faiss IVF (nlist {ivf.nlist or 'auto'}, nprobe {ivf.nprobe})": ivf,
        f"faiss HNSW l2 ({hnsw_label})": hnsw,
        f"faiss HNSW ip ({hnsw_label})": dataclasses.replace(hnsw, hnsw_space="ip"),
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| catalogue | items x dim | method | build s | queries/s | x brute force | recall@k | peak MB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(
            f"| {row['catalogue']} | {row['n_items']:,} x {row['dim']} | {row['method']} | {row['build_s']:.1f} "
            f"| {row['qps']:,.0f} | {row['speedup']:.1f} | {row['recall']:.3f} | {row['peak_mb']:,.0f} |"
        )
    return "\n".join(lines)


def acceptance(rows: list[dict]) -> list[str]:
    """One line per approximate index on the clustered catalogue: does it meet the bar?

    The bar is set for ~1M items; on smaller catalogues brute force is cheap and the speed-up
    smaller, so a miss there says little.
    """
    lines = []
    for row in rows:
        if row["catalogue"] == "clustered" and row["method"].startswith(("faiss IVF", "faiss HNSW")):
            met = row["recall"] >= TARGET_RECALL and row["speedup"] >= TARGET_SPEEDUP
            lines.append(
                f"{'MEETS' if met else 'misses'} recall@{row['k']} >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:.0f}x: "
                f"{row['method']} recall {row['recall']:.3f} at {row['speedup']:.1f}x ({row['n_items']:,} x {row['dim']})"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the IndexConfig rule)")
    parser.add_argument("--nprobe", type=int, default=IndexConfig.nprobe)
    parser.add_argument("--hnsw-m", type=int, default=IndexConfig.hnsw_m)
    parser.add_argument("--ef-search", type=int, default=IndexConfig.ef_search)
    parser.add_argument("--ef-construction", type=int, default=IndexConfig.ef_construction)
    parser.add_argument("--skip-hnsw", action="store_true", help="HNSW builds take minutes at 1M items")
    parser.add_argument("--skip-ml100k", action="store_true")
    parser.add_argument("--model", choices=("bpr-mf", "fism"), default="bpr-mf",
                        help="model trained on ML-100K for the trained-vector catalogue")
    parser.add_argument("--epochs", type=int, default=20, help="its training epochs (early stopping may end sooner)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    configs = index_configs(args)
    items, queries = clustered_vectors(args.n_items, args.queries, args.dim, seed=args.seed)
    print(f"clustered catalogue {args.n_items:,} x {args.dim}, {args.queries:,} queries, top-{args.k}", flush=True)
    rows = run_catalogue("clustered", queries, items, args.k, None, configs)
    del items, queries
    if args.skip_ml100k:
        print("skipping ML-100K (--skip-ml100k)")
    elif args.data.is_file():
        queries, items, seen = trained_vectors(args.data, args.model, args.epochs, args.seed)
        print(f"ml-100k {args.model}: {items.shape[0]:,} items x {items.shape[1]}, {queries.shape[0]} users", flush=True)
        rows += run_catalogue(f"ml-100k {args.model}", queries, items, args.k, seen, configs)
    else:
        print(f"skipping ML-100K: {args.data} not found")
    print(markdown(rows))
    print("\n".join(acceptance(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
