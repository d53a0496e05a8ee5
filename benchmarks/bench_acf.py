"""One training epoch of ACF next to BPR-MF and FISM on ML-100K (dim 64).

Each configuration runs in its own subprocess (peak RSS is its own) with one torch thread. Printed
per configuration: the epoch's wall seconds (the trainer's own timing), the process CPU seconds
of the whole ``fit`` (steadier than wall time on a shared machine), training pairs per second,
the ratio to FISM's epoch and the peak RSS. ACF "+ plots" uses the hashed bag of words of each
movie's plot sentences (:mod:`acfrec.datasets.movielens`); when the plot file is absent, random
unit-norm components of the same shape (5 per item, 256-d) stand in and the row says so.

    python benchmarks/bench_acf.py [--data ../shared/data] [--batch-size 4096] [--threads 1]

Measured with ``--batch-size 4096 --threads 1`` on a shared 2-core machine (runs vary by ~20%):
FISM 0.85 s per epoch, ACF without content 1.6-2.5 s, ACF + plots 5.6 s (6.6x FISM; 8.4-9.1 s,
~10x, while component attention still ran over the padded component slots, 58% of them). Then
the component kernel was rewritten in fused passes (keeping its hidden units for the backward,
no beta grid in training) and a batch holding most entries attends every user through a layout
built once: seven interleaved runs each on the same (busy) machine, FISM 0.52-0.84 s, ACF +
plots 4.4-6.4 s (median 5.6) before, 3.5-4.5 s (median 4.1, 5.5-8x FISM) after; the loss and
backward alone on 24 fixed batches, median 6.2 s vs 4.8 s. ACF without content is unchanged.
Then training attended a rescaled sample of 32 entries of each history per step (the default
``history_sample=32``; the "whole" rows set it to None): five interleaved runs on the same
shared machine (FISM 0.61-0.97 s, median 0.80), ACF + plots 1.92-2.53 s (median 2.44; 2.1-4.0x
FISM, median 3.0x) vs 4.83-5.34 s whole (median 5.08; 5.5-8.6x, median 6.0x); ACF without
content 0.94-1.32 s (median 1.26) vs 1.58-2.20 s whole (median 2.10). The target of 3x FISM is
met at the median, not in every run. ML-100K quality: benchmarks/FINDINGS.md, section 2.

``--planted`` instead prints the planted-catalogue acceptance table (default size, seed 0):
full-ranking HR@10 / NDCG@10 of ItemPop, BPR-MF, FISM, SVD++, ALS, ACF and its three ablations,
how much of the component attention lands on the frames of the user's liked classes, relative to
uniform attention (the acceptance target is >= 2), and how much item attention gives the
content-blind clicks relative to the chosen items (``Catalogue.click_weight_ratio``; 1 = uniform):

    python benchmarks/bench_acf.py --planted [--set pretrain=null lr=0.005] [--catalogue noise=0.5]
    python benchmarks/bench_acf.py --planted --preset sparse --set content_in_history=true \
        profile_query=true frame_agreement=5 scale_attention_inputs=true
    python benchmarks/bench_acf.py --planted --preset legible --set user_embedding=false \
        history_smoothing=1 pretrain=null lr=0.005 content_in_history=true profile_query=true \
        frame_agreement=5 scale_attention_inputs=true --baseline-set als.regularization=10
    python benchmarks/bench_acf.py --planted --preset stray --seeds 0 1 2 3 4 5 --set user_embedding=false \
        history_smoothing=1 pretrain=null lr=0.002 content_in_history=true profile_query=true \
        frame_agreement=5 scale_attention_inputs=true average_half_life=1 \
        --baseline-set als.factors=64 als.iterations=10 als.regularization=10   # ~25 min on one core
    python benchmarks/bench_acf.py --planted --preset sparse --catalogue n_users=2000 n_items=3000 \
        --set content_in_history=true profile_query=true frame_agreement=5 scale_attention_inputs=true \
        content_tower=true tower_training=joint tower_blend=0.5     # ~30 min on one core

``--seeds`` prints one table per catalogue seed, then each model's mean over the seeds and its
per-user paired difference to ACF pooled over all the seeds' test users, with its standard error
(the README's "stray" tables come from the command above; its "+ average" rows add
``fism.average_half_life=1 svdpp.average_half_life=1 bpr-mf.average_half_life=1`` to
``--baseline-set``). ``--model-seeds`` trains every model at each of these seeds too (without the
weight average one run's own variance was about as large as the attention levels' effects there),
and pools the runs.

(ACF pre-trains on FISM by default; ``--set pretrain=null`` trains it from scratch. ``--preset``
starts from a named catalogue of :data:`acfrec.datasets.catalogue.PRESETS`, ``--catalogue``
arguments override it. The baselines run at their defaults unless ``--baseline-set`` says
otherwise: on the short histories of ``legible``, ALS at implicit's default regularisation (0.01)
memorises each user's few items, HR@10 0.055, and ``als.regularization=10`` (the demo's setting)
gives 0.255.)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# name -> (registered model, options on top of the model's defaults)
CONFIGS: dict[str, tuple[str, dict]] = {
    "bpr-mf": ("bpr-mf", {}),
    "fism": ("fism", {}),
    "acf (no content)": ("acf", {"use_content": False}),
    "acf no cont. whole": ("acf", {"use_content": False, "history_sample": None}),
    "acf + components": ("acf", {}),
    "acf + comp. whole": ("acf", {"history_sample": None}),  # attention over every history entry
}


def components(data: Path, n_items: int, split):
    """Plot-sentence components aligned on the split, or random ones of the same shape."""
    import torch

    from acfrec.data.components import AlignedComponents

    items, plots = data / "ml-100k" / "ml-100k.item", data / "movie-plots" / "movies_extrainfos.dat"
    if items.is_file() and plots.is_file():
        import tempfile

        from acfrec.datasets.movielens import plot_component_store

        store = plot_component_store(Path(tempfile.mkdtemp()) / "plots", items_file=items, plots_file=plots)
        return store.align(split.items, max_components=10), "plot sentences, hashed BoW 256-d"
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(n_items, 5, 256, generator=generator), dim=-1)
    return AlignedComponents(features, torch.ones(n_items, 5, dtype=torch.bool)), "random, 5 x 256-d per item"


def run_one(label: str, data: Path, batch_size: int | None, threads: int) -> dict:
    import torch

    from acfrec.data.io import read_interactions
    from acfrec.data.splitting import leave_one_out
    from acfrec.models import get_model

    torch.set_num_threads(threads)
    split = leave_one_out(read_interactions(data / "ml-100k" / "ml-100k.inter"))
    name, options = CONFIGS[label]
    options = {**options, "dim": 64, "epochs": 1, "progress": False}
    if batch_size is not None:
        options["batch_size"] = batch_size
    source = ""
    model = get_model(name)(**options)
    if name == "acf" and options.get("use_content", True):
        aligned, source = components(data, split.n_items, split)
        model.set_components(aligned)
    # The first optimiser pulls in torch._dynamo (seconds): import it before the clock starts.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    cpu = time.process_time()
    model.fit(split.train, valid=None)
    cpu = time.process_time() - cpu
    epoch = model.history[0]["seconds"]
    return {
        "model": label,
        "batch_size": model.config.batch_size,
        "epoch_s": epoch,
        "fit_cpu_s": cpu,
        "pairs_per_s": split.train.nnz / epoch,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "content": source,
    }


# ACF variants of the planted table: name -> options on top of the ACF settings
ABLATIONS: dict[str, dict] = {
    "acf": {},
    "acf, component attention off": {"component_attention": False},
    "acf, item attention off": {"item_attention": False},
    "acf, content off": {"use_content": False, "content_tower": False},  # no content: no tower either
}


def planted_table(
    acf_options: dict,
    catalogue_options: dict | None = None,
    preset: str | None = None,
    baseline_options: dict[str, dict] | None = None,
    seeds: list[int] | None = None,
    model_seeds: list[int] | None = None,
) -> None:
    """One table per catalogue seed and model seed (every model's ``seed``); with several, then
    each model's mean and its per-user paired difference to ACF pooled over every run (ACF and
    the model trained with the same model seed on the same catalogue). Over catalogue seeds the
    users are independent; over model seeds of one catalogue they are not, so the standard error
    ``std / sqrt(n)`` is then a rough guide, and a small one."""
    import numpy as np

    catalogue_options = catalogue_options or {}
    seeds = seeds or [catalogue_options.get("seed", 0)]
    model_seeds = model_seeds or [0]
    runs = []
    for seed in seeds:
        case = planted_case({**catalogue_options, "seed": seed}, preset)  # built once for every model seed
        runs += [planted_seed(case, acf_options, baseline_options or {}, model_seed) for model_seed in model_seeds]
    if len(runs) < 2:
        return
    print(f"\nseeds {seeds}, model seeds {model_seeds} pooled ({sum(len(r['acf'][2]) for r in runs)} per-user differences): "
          "mean HR@10 / NDCG@10, and ACF minus the model per user (standard error)")
    print(f"{'model':<32}{'HR@10':>8}{'NDCG@10':>9}{'ACF - model HR@10':>26}{'ACF - model NDCG@10':>26}")
    for label in runs[0]:
        hr, ndcg = (np.mean([r[label][0][metric] for r in runs]) for metric in ("HR@10", "NDCG@10"))
        cells = ""
        for column in (1, 2):
            gap = np.concatenate([r["acf"][column] - r[label][column] for r in runs])
            cells += f"{gap.mean():>+18.4f} ({gap.std() / np.sqrt(gap.size):.4f})" if label != "acf" else f"{'-':>26}"
        print(f"{label:<32}{hr:>8.3f}{ndcg:>9.3f}{cells}")


def planted_case(catalogue_options: dict, preset: str | None) -> tuple:
    """One planted catalogue (preset ``preset`` overridden by ``catalogue_options``), with its
    description, leave-one-out split and aligned pixel-PCA frames."""
    import tempfile

    from acfrec.data.interactions import Interactions
    from acfrec.data.splitting import leave_one_out
    from acfrec.datasets.catalogue import PRESETS, planted_catalogue

    catalogue_options = {**(PRESETS[preset] if preset else {}), **catalogue_options}
    catalogue = planted_catalogue(**catalogue_options)
    split = leave_one_out(Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp"), seed=0)
    aligned = catalogue.write_store(Path(tempfile.mkdtemp()) / "frames", dim=32).align(split.items, 10)
    return f"{preset or ''} {catalogue_options}", catalogue, split, aligned


def planted_seed(case: tuple, acf_options: dict, baseline_options: dict[str, dict], model_seed: int = 0) -> dict:
    """Fit (every model with ``seed=model_seed``) and print every model on one :func:`planted_case`;
    per model: (metrics, per-user HR@10, per-user NDCG@10) on the test users."""
    import torch

    from acfrec.eval.evaluate import evaluate
    from acfrec.models import get_model

    torch.set_num_threads(1)
    description, catalogue, split, aligned = case
    models = {
        name: get_model(name)(
            **({} if name in ("itempop", "als") else {"progress": False}), **{"seed": model_seed, **baseline_options.get(name, {})}
        )
        for name in ("itempop", "bpr-mf", "fism", "svdpp", "als")
    }
    for label, options in ABLATIONS.items():
        models[label] = get_model("acf")(components=aligned, progress=False, **{"seed": model_seed, **acf_options, **options})
    print(f"planted catalogue {description}: {split.n_users} users, {split.n_items} items, {split.train.nnz} training "
          f"interactions; model seed {model_seed}; ACF options {acf_options}; baseline options {baseline_options}")
    print(f"{'model':<32}{'HR@10':>8}{'NDCG@10':>9}{'liked frames':>14}{'clicks':>8}")
    users = split.eval_users("test")
    results = {}
    for label, model in models.items():
        report = evaluate(model.fit(split), split, protocols=("full",), ks=(10,))
        metrics = report.metrics["full"]
        results[label] = metrics, report.per_user("HR@10", "full"), report.per_user("NDCG@10", "full")
        frames = clicks = "-"
        if label.startswith("acf"):
            attention = model.attention(users)
            clicks = f"{catalogue.click_weight_ratio(split, users, attention):.2f}"
            if "beta" in attention:
                frames = f"{catalogue.liked_frame_ratio(split, users, attention):.2f}"
        print(f"{label:<32}{metrics['HR@10']:>8.3f}{metrics['NDCG@10']:>9.3f}{frames:>14}{clicks:>8}", flush=True)
    print("liked frames: component attention's mass on the liked frames / uniform's; clicks: item attention's "
          "weight on content-blind clicks / on chosen items (1 = uniform)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (holds ml-100k/)")
    parser.add_argument("--batch-size", type=int, default=None, help="override every model's default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--planted", action="store_true", help="the planted-catalogue acceptance table instead")
    parser.add_argument("--set", dest="acf_options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="ACF options for --planted (YAML values)")
    parser.add_argument("--catalogue", dest="catalogue_options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="planted_catalogue arguments for --planted (YAML values; default seed 0)")
    parser.add_argument("--preset", help="a named planted catalogue (acfrec.datasets.catalogue.PRESETS) for --planted")
    parser.add_argument("--seeds", type=int, nargs="+", help="catalogue seeds for --planted: a table each, then pooled")
    parser.add_argument("--model-seeds", type=int, nargs="+", help="every model's seed for --planted (default 0): a table each")
    parser.add_argument("--baseline-set", dest="baseline_options", nargs="+", default=[], metavar="MODEL.KEY=VALUE",
                        help="baseline options for --planted (YAML values), e.g. als.regularization=10")
    args = parser.parse_args()
    if args.planted:
        import yaml

        def parse(pairs: list[str]) -> dict:
            return {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in pairs)}

        baselines: dict[str, dict] = {}
        for key, value in parse(args.baseline_options).items():
            name, _, option = key.partition(".")
            if name not in ("itempop", "bpr-mf", "fism", "svdpp", "als") or not option:
                sys.exit(f"--baseline-set takes MODEL.KEY=VALUE with MODEL one of itempop bpr-mf fism svdpp als, got {key!r}")
            baselines.setdefault(name, {})[option] = value
        planted_table(parse(args.acf_options), parse(args.catalogue_options), args.preset, baselines, args.seeds, args.model_seeds)
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.data, args.batch_size, args.threads)))
        return
    if not (args.data / "ml-100k" / "ml-100k.inter").is_file():
        sys.exit(f"ML-100K not found under {args.data}; pass --data FOLDER (holding ml-100k/ml-100k.inter)")
    rows = []
    for label in args.models:
        command = [sys.executable, __file__, "--one", label, "--data", str(args.data), "--threads", str(args.threads)]
        if args.batch_size is not None:
            command += ["--batch-size", str(args.batch_size)]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{label}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    fism = next((r["epoch_s"] for r in rows if r["model"] == "fism"), None)
    header = f"{'model':<18}{'batch':>7}{'epoch s':>9}{'fit CPU s':>11}{'pairs/s':>10}{'x FISM':>8}{'peak RSS MB':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['epoch_s'] / fism:>8.1f}" if fism else f"{'-':>8}"
        print(
            f"{r['model']:<18}{r['batch_size']:>7}{r['epoch_s']:>9.2f}{r['fit_cpu_s']:>11.2f}"
            f"{r['pairs_per_s']:>10.0f}{ratio}{r['peak_rss_mb']:>13.0f}"
        )
    sources = {r["content"] for r in rows if r["content"]}
    print(f"\nML-100K leave-one-out training pairs, dim 64, {args.threads} torch thread(s); components: {', '.join(sources) or '-'}")


if __name__ == "__main__":
    main()
