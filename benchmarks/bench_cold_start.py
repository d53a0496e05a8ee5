"""Content cold-start table: a seeded 20% of items held out entirely, ranked from content alone.

Data sets:
* ``planted``: the planted image catalogue (:func:`acfrec.datasets.catalogue.planted_catalogue`),
  item content = mean pixel-PCA feature of its frames (real digit images).
* ``planted-encoded``: the same catalogue, frames encoded by a learned image encoder
  (``--frame-encoder``, default PixelCNN with one vector per frame), trained on the frames alone.
* ``ml100k``: MovieLens 100K, item content = mean hashed bag of words of its plot sentences
  (:func:`acfrec.datasets.movielens.plot_component_store`); movies without a matched plot have
  no content (zero vector) and so tie at the bottom of every content ranking.

Rows: random, content-pop (popularity of the ``k`` nearest warm items by content), content-kNN
(cosine to the user's mean history content) and ACF with its content tower (trained on the warm
items, by default after ACF with the rest frozen, DropoutNet-style; the cold items then added
with ``add_items``). Columns:
Recall@K / NDCG@K among the cold items only and among all items (cold mixed into the warm
catalogue, the user's warm interactions removed), averaged over users with a cold interaction;
``vs``/``diff``/``p_value``: paired Wilcoxon test against the best row on cold Recall@K.
Below each table: warm-item full-ranking HR@10 / NDCG@10 of ACF with and without the tower
(same settings, on the warm split's test items), the cost of the tower on warm items.

    python benchmarks/bench_cold_start.py [--data ../shared/data] [--datasets planted planted-encoded ml100k]
        [--k 20] [--frame-encoder pixelcnn --encoder-epochs 3] [--acf-epochs 100 --tower-dropout 0.5]
        [--planted-users 500 --planted-items 300 | --preset sparse] [--tower-training after|joint]

The planted catalogue's default size (500 users x 300 items, 60 cold) leaves the tower 240 warm
items to learn from, and there content kNN (whose mean-content cosine matches how the generator
plants tastes) stays ahead; at ``--planted-users 2000 --planted-items 1000`` the tower leads
(results in the README).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from acfrec.data import ColdSplit, Interactions, cold_item_split, read_interactions
from acfrec.data.components import ComponentStore
from acfrec.datasets.catalogue import PRESETS, Catalogue, planted_catalogue, planted_preset
from acfrec.eval.cold import ColdResult, cold_table, evaluate_cold
from acfrec.eval.evaluate import evaluate
from acfrec.models import Recommender, get_model
from acfrec.models.content_knn import ContentKNN, ContentPopularity, ContentScorer, RandomScorer, item_content

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONTENT_TOWER = "acf + content tower"


def baselines(args: argparse.Namespace) -> list[ContentScorer]:
    return [RandomScorer(seed=args.seed), ContentPopularity(k=args.neighbours), ContentKNN()]


def acf(cold: ColdSplit, store: ComponentStore, args: argparse.Namespace, tower: bool) -> Recommender:
    """ACF fitted on ``cold.warm`` with the store's components, with or without the content tower."""
    options = {
        "components_path": str(store.path), "dim": args.dim, "lr": args.lr, "epochs": args.acf_epochs,
        "seed": args.seed, "progress": False, "num_threads": args.threads,
    }
    if tower:
        options.update(
            content_tower=True, tower_dropout=args.tower_dropout, tower_validation_weight=args.tower_validation_weight,
            tower_pooling=args.tower_pooling,
            tower_training=args.tower_training,
        )
    return get_model("acf")(**options).fit(cold.warm)


def warm_quality(model: Recommender, cold: ColdSplit) -> dict[str, float]:
    return evaluate(model, cold.warm, "test", protocols=("full",), ks=(10,)).metrics["full"]


def catalogue_interactions(args: argparse.Namespace) -> tuple[Catalogue, Interactions]:
    sizes = {"n_users": args.planted_users, "seed": args.seed}
    if args.planted_items is not None:
        sizes["n_items"] = args.planted_items
    if args.preset is None:
        catalogue = planted_catalogue(**sizes)
    else:
        catalogue = planted_preset(args.preset, **sizes)
    data = Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp", source="planted catalogue")
    return catalogue, data


def planted(args: argparse.Namespace, folder: Path) -> tuple[Interactions, ComponentStore, str]:
    catalogue, data = catalogue_interactions(args)
    store = catalogue.write_store(folder / "frames", dim=args.pixel_dim, seed=args.seed)
    preset = "" if args.preset is None else f" (preset {args.preset!r})"
    return data, store, f"planted catalogue{preset}, frame pixel-PCA {args.pixel_dim}-d"


def planted_encoded(args: argparse.Namespace, folder: Path) -> tuple[Interactions, ComponentStore, str]:
    """The catalogue's frames encoded by a learned image encoder, trained on the frames (no users)."""
    from encoders import get_encoder
    from encoders.corpus import ImageCorpus

    catalogue, data = catalogue_interactions(args)
    corpus = ImageCorpus(catalogue.frames, catalogue.item_offsets, list(catalogue.item_ids))
    options = {"epochs": args.encoder_epochs, "seed": args.seed, "num_threads": args.threads, "components": "frames"}
    encoder = get_encoder(args.frame_encoder)(**options)
    start = time.perf_counter()
    encoder.fit(corpus)
    components = encoder.encode(corpus)
    seconds = time.perf_counter() - start
    meta = {"encoder": args.frame_encoder, "encoder_config": options}
    store = ComponentStore.write(folder / "encoded", components.item_ids, (components.matrix, components.offsets), meta=meta)
    source = (
        f"planted catalogue, frames encoded by {args.frame_encoder} ({args.encoder_epochs} epochs, "
        f"{components.matrix.shape[1]}-d, {seconds:.0f} s to train and encode)"
    )
    return data, store, source


def ml100k(args: argparse.Namespace, folder: Path) -> tuple[Interactions, ComponentStore, str]:
    from acfrec.datasets.movielens import plot_component_store

    data = read_interactions(args.data / "ml-100k" / "ml-100k.inter")
    store = plot_component_store(
        folder / "plots",
        dim=args.plot_dim,
        items_file=args.data / "ml-100k" / "ml-100k.item",
        plots_file=args.data / "movie-plots" / "movies_extrainfos.dat",
        seed=args.seed,
    )
    return data, store, f"ML-100K, plot sentences hashed BoW {args.plot_dim}-d"


DATASETS: dict[str, Callable[[argparse.Namespace, Path], tuple[Interactions, ComponentStore, str]]] = {
    "planted": planted,
    "planted-encoded": planted_encoded,
    "ml100k": ml100k,
}


def run(name: str, args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as folder:
        data, store, source = DATASETS[name](args, Path(folder))
        cold = cold_item_split(data, cold_share=args.cold_share, seed=args.seed)
        content = item_content(store, cold.items, max_components=args.max_components)
        results: dict[str, ColdResult] = {}
        for scorer in baselines(args):
            start = time.perf_counter()
            scorer.fit(cold.warm.train, content)
            results[scorer.name] = evaluate_cold(scorer, cold, ks=(10, args.k, 50), label=scorer.name)
            results[scorer.name].seconds["fit+eval"] = time.perf_counter() - start
        start = time.perf_counter()
        tower = acf(cold, store, args, tower=True)
        warm = {CONTENT_TOWER: warm_quality(tower, cold)}
        tower.add_items(store, cold.cold_ids)
        results[CONTENT_TOWER] = evaluate_cold(tower, cold, ks=(10, args.k, 50), label=CONTENT_TOWER)
        results[CONTENT_TOWER].seconds["fit+eval"] = time.perf_counter() - start
        if args.tower_training == "after":
            # the first stage is ACF without a tower, same seed: the same model (tested)
            warm["acf (no tower, = the first stage)"] = warm[CONTENT_TOWER]
        else:
            warm["acf (no tower)"] = warm_quality(acf(cold, store, args, tower=False), cold)
    has_content = content.abs().sum(dim=1) > 0
    summary = cold.summary()
    lines = [
        f"## {source}",
        f"users {cold.n_users}, warm items {cold.n_warm}, cold items {cold.n_cold} "
        f"({int(has_content[cold.n_warm:].sum())} with content), cold interactions "
        f"{summary['n_cold_interactions']}, users with a cold interaction {summary['n_cold_users']}; "
        f"split fingerprint {summary['fingerprint']}",
        "",
        cold_table(results, metrics=(f"Recall@{args.k}", f"NDCG@{args.k}")),
    ]
    lines += ["", "warm items, full ranking: " + "; ".join(
        f"{label} HR@10 {values['HR@10']:.4f} NDCG@10 {values['NDCG@10']:.4f}" for label, values in warm.items()
    )]
    seconds = ", ".join(f"{label} {r.seconds['fit+eval']:.2f}" for label, r in results.items() if "fit+eval" in r.seconds)
    lines += ["", f"seconds (fit + evaluate, shared CPU, noisy): {seconds}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (ML-100K, plots)")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument("--cold-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=20, help="cutoff shown in the table (10 and 50 are computed too)")
    parser.add_argument("--neighbours", type=int, default=10, help="warm neighbours of content-pop")
    parser.add_argument("--max-components", type=int, default=64)
    parser.add_argument("--planted-users", type=int, default=500)
    parser.add_argument("--planted-items", type=int, default=None, help="default: 300, or the preset's")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a planted catalogue preset")
    parser.add_argument("--tower-pooling", default="mean", choices=("mean", "attention"))
    parser.add_argument("--pixel-dim", type=int, default=32)
    parser.add_argument("--plot-dim", type=int, default=256)
    parser.add_argument("--frame-encoder", default="pixelcnn", help="registered image encoder of planted-encoded")
    parser.add_argument("--encoder-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=32, help="ACF dimension")
    parser.add_argument("--lr", type=float, default=0.005, help="ACF learning rate")
    parser.add_argument("--acf-epochs", type=int, default=100, help="ACF epochs (early stopping, patience 10)")
    parser.add_argument("--tower-dropout", type=float, default=0.5, help="DropoutNet replacement probability")
    parser.add_argument("--tower-validation-weight", type=float, default=0.5,
                        help="share of the content-only validation NDCG in ACF's early stopping")
    parser.add_argument("--tower-training", choices=("joint", "after"), default="after",
                        help="ACF's tower_training: the tower after ACF (frozen) or jointly")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    np.set_printoptions(precision=4)
    print("command: python benchmarks/bench_cold_start.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    print()
    for name in args.datasets:
        if name == "ml100k" and not (args.data / "ml-100k" / "ml-100k.inter").is_file():
            print(f"## ML-100K skipped: {args.data / 'ml-100k' / 'ml-100k.inter'} not found\n")
            continue
        print(run(name, args), flush=True)


if __name__ == "__main__":
    main()
