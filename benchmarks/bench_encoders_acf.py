"""End to end: ACF with components from each content encoder, next to ACF without content.

Two datasets, one table of HR@10 / NDCG@10 (full ranking over all unseen items, and the sampled
protocol against the split's 99 negatives), every row an MLflow child run of one parent run that
also holds the table as ``encoders_acf.md``:

* ``planted``: the planted-preference image catalogue (:func:`acfrec.datasets.catalogue.planted_catalogue`,
  seed 0, default size: 500 users, 300 items, 1,385 8x8 digit frames), split like ``acfrec demo``
  (:func:`acfrec.cli.make_split` with the packaged ``demo`` config). Rows: ACF without content;
  raw-pixel PCA frame components (what the demo gives ACF); PixelCNN features of every frame and
  of its 2x2 regions (the encoder trained on the catalogue's frames through
  :func:`acfrec.encode.encode_to_store`); optionally DARN probabilities.
* ``ml100k``: ``ml-100k.inter`` split like ``acfrec compare --config ml100k``; every movie matched
  to a plot (:mod:`acfrec.datasets.movielens`) has one component per plot sentence, from each text
  encoder trained a bounded number of steps, or hashed bag of words; unmatched movies take ACF's
  no-content path.

Encoder held-out figures (negative log-likelihood / perplexity on the 10% of items the encoder
did not train on) go into the table and the child runs' params.

    python benchmarks/bench_encoders_acf.py --data planted --encoder-epochs 10
    python benchmarks/bench_encoders_acf.py --data ml100k --encoders hashed-bow seq-autoencoder lstm-lm \\
        --ml100k-epochs 5 --encoder-epochs 1 --encoder-steps 300
    python benchmarks/bench_encoders_acf.py --data both --no-track

Measured (2 shared CPU cores under heavy load from other jobs, one torch thread; timings are noisy):

    ``--data planted --encoder-epochs 10``
    (52 s wall; the first run of the same command took 137 s under heavier load and gave the same
    numbers to the last digit). HR@10 / NDCG@10 on the test item; full = all unseen items, sampled =
    99 negatives. planted: ACF as in the demo config (dim 32), at most 30 epochs, patience 5; neural
    encoders: 10 epoch(s) of at most 200 steps.

    | dataset | ACF content | components | encoder held-out | HR@10 | NDCG@10 | sampled HR@10 | sampled NDCG@10 | epochs | encode s | fit s |
    |---|---|---|---|---|---|---|---|---|---|---|
    | planted | none | - | - | 0.4540 | 0.2826 | 0.6220 | 0.4160 | 27 | 0 | 11 |
    | planted | raw pixels (PCA) | 1385 x 32 (300 items) | - | 0.4500 | 0.2838 | 0.5900 | 0.4021 | 25 | 0 | 10 |
    | planted | pixelcnn-frames | 1385 x 32 (300 items) | bits_per_dim 0.4879, nll_nats 21.64 | 0.4620 | 0.2903 | 0.5960 | 0.4136 | 17 | 3 | 5 |
    | planted | pixelcnn-regions | 5540 x 32 (300 items) | bits_per_dim 0.4879, nll_nats 21.64 | 0.4660 | 0.2918 | 0.5900 | 0.4107 | 17 | 2 | 7 |
    | planted | darn | 1385 x 64 (300 items) | bits_per_pixel 0.6235, nll_bound_nats 28.25, nll_is_nats 27.66 | 0.4620 | 0.2932 | 0.5900 | 0.4119 | 17 | 1 | 5 |

    On the catalogue every content row is within 0.012 HR@10 of ACF without content, inside the
    noise of 500 test users (binomial standard error of HR@10 ~0.022): at this size no encoder's
    components measurably help ACF, and under the sampled protocol ACF without content is best.
    The learned features (PixelCNN frames or regions, DARN) edge out raw-pixel PCA by ~0.01 on
    full HR@10 / NDCG@10, again within noise; `bench_acf.py --planted` measures where the
    component attention lands instead.

    ``--data ml100k --encoders hashed-bow seq-autoencoder lstm-lm --ml100k-epochs 5 --encoder-epochs 1
    --encoder-steps 300`` (692 s wall). HR@10 / NDCG@10 on the test item; full = all unseen items,
    sampled = 99 negatives. ML-100K: ACF dim 64 for only 5 epoch(s) (far from converged; ~35 s per
    epoch with content under load), so the content rows are a smoke comparison, not the paper's
    numbers; neural encoders: 1 epoch(s) of at most 300 steps.

    | dataset | ACF content | components | encoder held-out | HR@10 | NDCG@10 | sampled HR@10 | sampled NDCG@10 | epochs | encode s | fit s |
    |---|---|---|---|---|---|---|---|---|---|---|
    | ml100k | none | - | - | 0.1145 | 0.0576 | 0.6140 | 0.3485 | 5 | 0 | 36 |
    | ml100k | hashed-bow | 7190 x 256 (1655 items) | - | 0.1198 | 0.0599 | 0.6172 | 0.3534 | 5 | 0 | 167 |
    | ml100k | seq-autoencoder | 7190 x 128 (1655 items) | nll_nats 141.9, perplexity 309.6, recon_nats 141.9 | 0.1198 | 0.0597 | 0.6204 | 0.3534 | 5 | 73 | 163 |
    | ml100k | lstm-lm | 7190 x 128 (1655 items) | nll_nats 142.4, perplexity 316.5, recon_nats 142.4 | 0.1220 | 0.0602 | 0.6193 | 0.3540 | 5 | 69 | 176 |

    After five epochs (ACF on ML-100K is still far from converged) every plot-sentence row is above ACF
    without content: full HR@10 +0.005-0.008, NDCG@10 +0.002-0.003, sampled HR@10 +0.003-0.006; 943
    test users put the standard error of HR@10 near 0.01, so this is a direction, not a result.
    Learned sentence vectors (300 encoder steps, held-out perplexity ~310) do no better than hashed
    bag of words. The same command with --ml100k-epochs 2 (394 s wall) gave HR@10 0.0986 without
    content against 0.0954-0.0976 with it: no gain yet after two epochs. Encoder figures are
    identical across runs (seeded).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data"
PLANTED_SOURCES = ("pca-pixels", "pixelcnn-frames", "pixelcnn-regions", "darn")
TEXT_SOURCES = ("hashed-bow", "seq-autoencoder", "skip-thought", "hierarchical-autoencoder", "text-vae", "lstm-lm")
DEFAULT_SOURCES = {"planted": PLANTED_SOURCES, "ml100k": TEXT_SOURCES}
# Sizes that keep a bounded CPU run meaningful; the encoders' own defaults are for longer runs.
IMAGE_ENCODER_OPTIONS = {"pixelcnn": {"hidden": 16, "n_layers": 2, "head_channels": 16}, "darn": {"layers": [64]}}
TEXT_ENCODER_OPTIONS = {"embed_dim": 64, "hidden_dim": 128}
GRID = (2, 2)  # PixelCNN region pooling: 4 regions per frame
METRICS = ("HR@10", "NDCG@10")

log = logging.getLogger("bench_encoders_acf")
Attach = Callable[[Any], None]  # gives an ACF model its components


@dataclass
class Content:
    """One row's content: how to give ACF its components, and what to report about them."""

    name: str
    attach: Attach | None = None  # None: ACF without content
    shape: str = "-"
    heldout: dict[str, float] = field(default_factory=dict)
    encode_s: float = 0.0


@dataclass
class Row:
    dataset: str
    content: Content
    metrics: dict[str, dict[str, float]]
    fit_s: float
    epochs: int  # epochs run (early stopping on validation NDCG@10 may end before the maximum)


# ============================================================================ data
def planted_data(work: Path) -> tuple[Any, Any, Any]:
    """``(split, catalogue, ImageCorpus of its frames)``: the ``acfrec demo`` split of the default catalogue."""
    from acfrec.cli import make_split, planted_catalogue_of
    from acfrec.config import load_run_config
    from encoders.corpus import ImageCorpus

    data = load_run_config("demo").data
    catalogue = planted_catalogue_of(data)
    split = make_split(data, catalogue)
    corpus = ImageCorpus(catalogue.frames, catalogue.item_offsets, list(catalogue.item_ids))
    return split, catalogue, corpus


def ml100k_data(data_dir: Path) -> tuple[Any, Any]:
    """``(split, TextCorpus of plot sentences)``: the ``acfrec compare --config ml100k`` split."""
    from acfrec.cli import make_split
    from acfrec.config import load_run_config
    from acfrec.datasets.movielens import plot_sentences
    from encoders.corpus import TextCorpus

    data = load_run_config("ml100k", [f"data.path={data_dir / 'ml-100k' / 'ml-100k.inter'}"]).data
    split = make_split(data)
    sentences = plot_sentences(data_dir / "ml-100k" / "ml-100k.item", data_dir / "movie-plots" / "movies_extrainfos.dat")
    items = sorted(sentences, key=int)
    return split, TextCorpus([sentences[i] for i in items], items)


# ============================================================================ content
def store_content(name: str, path: Path, split: Any, encode_s: float, max_components: int | None = None) -> Content:
    """A written ComponentStore as a row's content (aligned on the split's items when attached)."""
    from acfrec.data.components import ComponentStore

    store = ComponentStore.open(path)

    def attach(model: Any) -> None:
        model.set_components(store.align(split.items, max_components or model.config.max_components))

    heldout = {k: float(v) for k, v in (store.meta.get("heldout") or {}).items()}
    shape = f"{store.matrix.shape[0]} x {store.dim} ({store.n_items} items)"
    return Content(name, attach, shape, heldout, encode_s)


def encoded(name: str, corpus: Any, split: Any, work: Path, args: argparse.Namespace, tracker: Any) -> Content:
    """Train ``name`` (or featurise) on ``corpus`` through :func:`encode_to_store` and wrap the store."""
    from acfrec.encode import FEATURISERS, encode_to_store

    encoder, options, max_components = encoder_options(name, args)
    started = time.perf_counter()
    out = encode_to_store(encoder, corpus, work / name, config=options, tracker=tracker, progress=args.progress)
    return store_content(name, out, split, time.perf_counter() - started, max_components if encoder not in FEATURISERS else None)


def encoder_options(name: str, args: argparse.Namespace) -> tuple[str, dict, int | None]:
    """``(registered encoder, its options, max_components for ACF or None)`` of a row name."""
    if name in ("hashed-bow", "pca-pixels"):
        return name, {"dim": 256 if name == "hashed-bow" else 32}, None
    budget = {"epochs": args.encoder_epochs, "max_steps_per_epoch": args.encoder_steps, "num_threads": 1, "seed": 0}
    if name.startswith("pixelcnn"):
        kind = name.split("-", 1)[1]
        options = {**IMAGE_ENCODER_OPTIONS["pixelcnn"], "components": kind, "grid": list(GRID)}
        # every frame of the largest item (6) as 4 regions each
        return "pixelcnn", {**budget, **options}, 6 * GRID[0] * GRID[1] if kind == "regions" else None
    if name == "darn":
        return name, {**budget, **IMAGE_ENCODER_OPTIONS["darn"]}, None
    return name, {**budget, **TEXT_ENCODER_OPTIONS}, None


def raw_pixels(catalogue: Any, split: Any, work: Path) -> Content:
    """The demo's own components (32-d pixel PCA of every frame), given the way ``acfrec demo`` gives them."""
    from acfrec.cli import DEMO_COMPONENT_DIM, _give_components

    def attach(model: Any) -> None:
        _give_components([model], catalogue, split, work / "pca-pixels")

    n_frames = int(catalogue.item_offsets[-1])
    return Content("raw pixels (PCA)", attach, f"{n_frames} x {DEMO_COMPONENT_DIM} ({catalogue.n_items} items)")


# ============================================================================ ACF
def acf_options(dataset: str, epochs: int, progress: bool, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """ACF's settings: the demo config's on the catalogue; dim 64 on ML-100K (as the ML-100K baselines).

    ``overrides``: ``key=value`` pairs (YAML values) on top, e.g. ``pretrain=fism``.
    """
    import yaml

    from acfrec.config import load_run_config

    if dataset == "planted":
        base = next(spec.params for spec in load_run_config("demo").models if spec.name == "acf")
    else:
        base = {"dim": 64, "patience": 5}
    extra = {}
    for pair in overrides:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--acf-set: expected key=value, got {pair!r}")
        extra[key.strip()] = yaml.safe_load(value)
    return {**base, "epochs": epochs, "seed": 0, "progress": progress, "num_threads": 1, **extra}


def run_row(dataset: str, split: Any, content: Content, options: dict[str, Any]) -> Row:
    """Fit ACF (with ``content`` or without) and evaluate it on the test items, both protocols."""
    from acfrec.eval import evaluate
    from acfrec.models import get_model

    model = get_model("acf")(**options, use_content=content.attach is not None)
    if content.attach is not None:
        content.attach(model)
    started = time.perf_counter()
    model.fit(split)
    fit_s = time.perf_counter() - started
    result = evaluate(model, split, target="test", protocols=("full", "sampled"), ks=(10,))
    return Row(dataset, content, result.metrics, fit_s, len(model.history))


# ============================================================================ output
def heldout_text(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(figures.items()) if not k.startswith("n_")) or "-"


def markdown(rows: Sequence[Row]) -> str:
    head = ("dataset", "ACF content", "components", "encoder held-out", "HR@10", "NDCG@10",
            "sampled HR@10", "sampled NDCG@10", "epochs", "encode s", "fit s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        full, sampled = row.metrics["full"], row.metrics["sampled"]
        cells = (row.dataset, row.content.name, row.content.shape, heldout_text(row.content.heldout),
                 *(f"{full[m]:.4f}" for m in METRICS), *(f"{sampled[m]:.4f}" for m in METRICS),
                 str(row.epochs), f"{row.content.encode_s:.0f}", f"{row.fit_s:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caption(args: argparse.Namespace, datasets: Sequence[str]) -> str:
    parts = []
    if "planted" in datasets:
        parts.append(f"planted: ACF as in the demo config (dim 32), at most {args.planted_epochs} epochs, patience 5")
    if "ml100k" in datasets:
        parts.append(f"ML-100K: ACF dim 64 for only {args.ml100k_epochs} epoch(s) (far from converged; "
                     "~35 s per epoch with content under load), so the content rows are a smoke comparison, not the paper's numbers")
    if args.acf_set:
        parts.append(f"ACF overrides: {' '.join(args.acf_set)}")
    parts.append(f"neural encoders: {args.encoder_epochs} epoch(s) of at most {args.encoder_steps or 'all'} steps")
    return "HR@10 / NDCG@10 on the test item; full = all unseen items, sampled = 99 negatives. " + "; ".join(parts) + "."


def log_row(tracker: Any, row: Row, options: dict[str, Any]) -> None:
    with tracker.run(f"{row.dataset}: acf + {row.content.name}", tags={"acfrec.bench": "encoders_acf"}) as run:
        run.log_params({"dataset": row.dataset, "content": row.content.name, "components": row.content.shape,
                        **{f"acf.{k}": v for k, v in options.items()}})
        run.log_params({f"heldout.{k}": v for k, v in row.content.heldout.items()})
        for protocol, values in row.metrics.items():
            run.log_metrics(values, prefix=protocol)
        run.log_metrics({"fit_s": row.fit_s, "encode_s": row.content.encode_s})


# ============================================================================ main
def dataset_rows(dataset: str, args: argparse.Namespace, work: Path, tracker: Any) -> list[Row]:
    sources = args.encoders or DEFAULT_SOURCES[dataset]
    allowed = PLANTED_SOURCES if dataset == "planted" else TEXT_SOURCES
    unknown = [s for s in sources if s not in allowed]
    if unknown:
        raise SystemExit(f"--encoders: {unknown} are not {dataset} sources; choose among {list(allowed)}")
    if dataset == "planted":
        split, catalogue, corpus = planted_data(work)
    else:
        split, corpus = ml100k_data(args.data_dir)
    log.info("%s: %s", dataset, split.summary())
    epochs = args.planted_epochs if dataset == "planted" else args.ml100k_epochs
    options = acf_options(dataset, epochs, args.progress, args.acf_set)
    rows = []
    for name in ("none", *sources):
        if name == "none":
            content = Content("none")
        elif name == "pca-pixels":
            content = raw_pixels(catalogue, split, work / dataset)
        else:
            content = encoded(name, corpus, split, work / dataset, args, tracker)
        log.info("%s: ACF + %s ...", dataset, content.name)
        rows.append(run_row(dataset, split, content, options))
        log_row(tracker, rows[-1], options)
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("planted", "ml100k", "both"), default="planted")
    parser.add_argument("--encoders", nargs="+", metavar="NAME",
                        help=f"content rows besides 'none'; planted: {list(PLANTED_SOURCES)}, ml100k: {list(TEXT_SOURCES)}")
    parser.add_argument("--planted-epochs", type=int, default=30, help="ACF epochs on the catalogue (early stopping)")
    parser.add_argument("--ml100k-epochs", type=int, default=2, help="ACF epochs on ML-100K (slow: keep small)")
    parser.add_argument("--acf-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="ACF config fields for every row, e.g. pretrain=fism lr=0.002")
    parser.add_argument("--encoder-epochs", type=int, default=3, help="epochs of each neural encoder")
    parser.add_argument("--encoder-steps", type=int, default=200, help="max steps per encoder epoch (0: all)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="holds ml-100k/ and movie-plots/")
    parser.add_argument("--work", type=Path, default=None, help="component stores go here (default: a temp folder)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: acfrec's sqlite:///./mlruns/mlflow.db)")
    parser.add_argument("--experiment", default="acfrec-encoders-acf")
    parser.add_argument("--no-track", action="store_true", help="log nothing to MLflow")
    parser.add_argument("--progress", action="store_true", help="tqdm bars for ACF and encoder training")
    return parser.parse_args(argv)


def make_tracker(args: argparse.Namespace) -> Any:
    if args.no_track:
        from acfrec.cli import _NullTracker

        return _NullTracker()
    from acfrec.tracking import Tracker

    return Tracker(experiment=args.experiment, tracking_uri=args.tracking_uri)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    datasets = ("planted", "ml100k") if args.data == "both" else (args.data,)
    work = args.work or Path(tempfile.mkdtemp(prefix="encoders_acf_"))
    tracker = make_tracker(args)
    started = time.perf_counter()
    with tracker.run("encoders x ACF", tags={"acfrec.bench": "encoders_acf"}) as parent:
        parent.log_params({"data": args.data, "planted_epochs": args.planted_epochs, "ml100k_epochs": args.ml100k_epochs,
                           "encoder_epochs": args.encoder_epochs, "encoder_steps": args.encoder_steps,
                           "acf_set": " ".join(args.acf_set)})
        rows = [row for dataset in datasets for row in dataset_rows(dataset, args, work, tracker)]
        table = f"{caption(args, datasets)}\n\n{markdown(rows)}\n"
        parent.log_text(table, "encoders_acf.md")
        parent.log_metrics({"wall_s": time.perf_counter() - started})
    print()
    print(table)
    print(f"wall time {time.perf_counter() - started:.0f} s; component stores in {work}")
    if not args.no_track:
        print(f"MLflow: {tracker.tracking_uri} (experiment {args.experiment!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
