"""How much each attention level could gain on a planted catalogue: rankings built from its truth.

ACF's two attention levels do two things a model with uniform pooling (FISM, ACF's ablations)
cannot: component attention keeps, in each history item, the frames of the user's taste instead of
all of them; item attention keeps the history items that say something about the taste instead
of content-blind clicks. This script ranks every user's held-out item with hand-made scorers that
do each of these perfectly or not at all, from the catalogue's ground truth, so one can see
whether a catalogue leaves room for a learned model to show either level before training one.

Every scorer ranks ``votes(user) . shows(item) + log(1 + training popularity)``, where
``shows(item)`` marks the classes an item's frames show and ``votes(user)`` counts classes over
the user's training history:

* ``uniform items, all frames``: each history item adds the share of its frames in every class
  (FISM-like pooling of content, both attention levels off);
* ``clicks removed``: the same without the content-blind clicks (perfect item attention: the
  generator's own flags, which no model can fully know);
* ``sharp frames``: each history item adds one class, the one of its classes shown most by the
  user's *other* history items (component attention queried by the rest of the history);
* ``sharp frames, consistent items``: as above, each item weighted by ``exp(5 x`` that class's
  support among the other items``)`` (item attention from content alone, attainable);
* ``sharp frames, clicks removed``: both levels perfect.

Plus the generator's own ranking (liked classes shown, then popularity), popularity, and the
class most shown in the history. Meant for ``preference_by="shown"`` catalogues (the presets):
there the generator's ranking is exactly that. The votes are counts, so on long histories they
outweigh popularity more than a learned model would let them. ``--labels kmeans:K`` replaces the true frame classes by K k-means
clusters of the pixel-PCA frame features (the library's 16-cluster code of ``frame_agreement``
uses the same routine): what the scorers can do from the pixels, not the labels.

    python benchmarks/bench_planted_headroom.py --preset short [--catalogue interactions_per_user=[6,12]]
        [--seed 0] [--labels true|kmeans:16] [--learned]

``--learned`` adds the question the counts cannot answer: does a *learned* model with uniform
pooling lose anything to the clicks? It trains a FISM (ACF's training settings: dim 64, lr 0.005,
L2 0.001, BPR, early stopping on validation) whose history entries are pooled with fixed
weights: uniform; ``exp(3 s)``, ``s`` the share of the user's other history items showing the
entry's best-supported class (item attention attainable from content, here from the true frame
labels); and the generator's flags (clicks, past choices removed: perfect item attention).
Measured, NDCG@10 change against uniform pooling (paired SE), about 20 s per row:

==================  ================  ================  ================  ==============
catalogue, seed     uniform HR / NDCG consistent items  clicks removed    clicks and past
==================  ================  ================  ================  ==============
legible, 0          0.247 / 0.142     +0.0121 (0.0025)  +0.0161 (0.0030)
legible, 1          0.260 / 0.154     +0.0057 (0.0019)  +0.0088 (0.0026)
legible, 2          0.250 / 0.154     +0.0015 (0.0023)  +0.0109 (0.0025)
drifting, 0         0.246 / 0.147     +0.0020 (0.0020)  +0.0029 (0.0021)  +0.0059 (0.0032)
drifting, 1         0.263 / 0.150     +0.0025 (0.0019)  +0.0046 (0.0020)  +0.0117 (0.0030)
==================  ================  ================  ================  ==============

So the clicks cost a learned, content-free pooling (3-5 paired SE on ``legible``), and content
can recover part of it there. Against ACF, which already reads each history item's frames
through the user's taste, the picture differs (experiment scripts, ACF's "legible" recipe with
item attention off, seed 0): removing the clicks by the truth still gains +0.017 NDCG@10 (4.5
SE), but consistency weights added to its item logits (``3 s`` with ``s`` from 16 k-means clusters
of the frames, which are pure here) gain nothing (-0.002), nor does
dropping the entries that do not show the class most shown by the user's other items (+0.002;
that rule catches 55% of the clicks and drops 12% of the choices). About 30% of uniform clicks
land on an item that shows a liked class and look like choices. With
``planted_catalogue(clicks_outside_taste=True)`` every click misses the taste: removing them by
the truth gains +0.025 there, and ACF's learned item attention +0.0045 (1.9 SE). A dim-32, lr
0.01, L2 1e-4 FISM (this script's first version) pooled worse (``drifting``, seed 0: 0.234 /
0.139) and overstated the consistency gain (+0.009).

Measured (seed 0, HR@10 / NDCG@10, full ranking; ``short``: 3,000 users x 300 items, 4-8 items
per user): uniform 0.227 / 0.132, clicks removed 0.242 / 0.143, sharp frames 0.242 / 0.143,
consistent items 0.264 / 0.160, both perfect 0.293 / 0.176. With 6-12 items per user: uniform
0.206 / 0.118, sharp frames 0.237 / 0.133, consistent items 0.290 / 0.173, both perfect 0.316 /
0.190: both levels have room there. ``sparse`` (500 users x 1,500 items): uniform 0.104 / 0.054,
sharp frames 0.182 / 0.099, consistent items 0.212 / 0.132 (the generator's ranking), where ACF
with its attention options reached 0.196-0.206 at seed 0. With k-means clusters of the pixels in place of the labels
(purity 0.76 / 0.89 / 0.93 for 10 / 16 / 32 clusters from k-means++ with restarts; 0.68 / 0.85 /
0.91 from the one Lloyd run used before), the ``short`` rows fall to 0.16-0.22 HR@10: on
these 8x8 digit frames the pixels do not tell the classes apart well enough for a sharp reading.
Drawing the frames from each class's 10 most typical images (``--catalogue typical_frames=10``)
makes 16 clusters pure (1.00), so a model can read the frames (its votes fragment over a class's
sub-clusters, so these discrete scorers understate that).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def class_of_frames(catalogue, labels: str) -> tuple[np.ndarray, int, float]:
    """``(n_frames,)`` class (or cluster) of every frame, the number of classes and the purity."""
    truth = catalogue.truth
    if labels == "true":
        return truth.frame_class, int(truth.user_classes.shape[1]), 1.0
    if not labels.startswith("kmeans:"):
        raise SystemExit(f"--labels must be 'true' or 'kmeans:K', got {labels!r}")
    import torch

    from acfrec.models.acf import _cluster_codes

    k = int(labels.split(":", 1)[1])
    features, _ = catalogue.frame_features(32)
    codes = _cluster_codes(torch.as_tensor(features)[:, None, :], torch.ones(len(features), 1, dtype=torch.bool), k, 0)
    cluster = codes[:, 0].argmax(dim=-1).numpy()
    counts = np.zeros((k, truth.frame_class.max() + 1))
    np.add.at(counts, (cluster, truth.frame_class), 1)
    return cluster, k, float(counts.max(axis=1).sum() / cluster.size)


def frames_per_class(catalogue, frame_class: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_items, n_classes)`` count of every generator item's frames in each class (or cluster)."""
    frame_item = np.repeat(np.arange(catalogue.n_items), np.diff(catalogue.item_offsets))
    counts = np.zeros((catalogue.n_items, n_classes))
    np.add.at(counts, (frame_item, frame_class), 1)
    return counts


def history_pairs(split, catalogue, user_source: np.ndarray, item_source: np.ndarray) -> tuple[np.ndarray, ...]:
    """The training (user, item) pairs in split indices and whether each was a content-blind click."""
    train = split.train.tocoo()
    users, items = train.row.astype(np.int64), train.col.astype(np.int64)
    return users, items, catalogue.clicks()[user_source[users], item_source[items]]


def scorers(split, catalogue, frame_class: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Name -> ``(n_users, n_items)`` scores."""
    from acfrec.datasets.catalogue import generator_index

    item_source, user_source = generator_index(split.items.external_ids), generator_index(split.users.external_ids)
    counts = frames_per_class(catalogue, frame_class, n_classes)
    shows = (counts > 0).astype(float)[item_source]  # (items, classes)
    share = (counts / counts.sum(axis=1, keepdims=True))[item_source]
    users, items, clicked = history_pairs(split, catalogue, user_source, item_source)
    popularity = np.log1p(np.bincount(items, minlength=split.n_items))
    n_users = split.n_users

    def pooled(per_pair: np.ndarray, keep: np.ndarray) -> np.ndarray:
        votes = np.zeros((n_users, n_classes))
        np.add.at(votes, users[keep], per_pair[keep])
        return votes

    def sharp(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pair: one-hot of the item's class best supported by the user's other kept history
        items ``(pairs, classes)``, and that support ``(pairs,)``."""
        votes = pooled(shows[items], keep)
        support = (votes[users] - shows[items] * keep[:, None]) * shows[items]
        pick = np.argmax(support + 1e-6 * shows[items], axis=1)
        return np.eye(n_classes)[pick], support[np.arange(users.size), pick]

    everything = np.ones(users.size, dtype=bool)
    votes = pooled(shows[items], everything)
    one_class, support = sharp(everything)
    weighted = pooled(one_class * np.exp(5.0 * support)[:, None], everything)
    weighted *= (np.bincount(users, minlength=n_users) / np.maximum(weighted.sum(axis=1), 1e-12))[:, None]

    liked = catalogue.truth.affinity[user_source][:, item_source] > 0
    results = {
        "generator (liked class shown, popularity)": 8.0 * liked,
        "popularity": np.zeros((n_users, split.n_items)),
        "class most shown in the history": 8.0 * shows[:, votes.argmax(axis=1)].T,
        "uniform items, all frames": pooled(share[items], everything) @ shows.T,
        "clicks removed, all frames": pooled(share[items], ~clicked) @ shows.T,
        "uniform items, sharp frames": pooled(one_class, everything) @ shows.T,
        "consistent items, sharp frames": weighted @ shows.T,
        "clicks removed, sharp frames": pooled(sharp(~clicked)[0], ~clicked) @ shows.T,
    }
    return {name: scores + popularity[None, :] for name, scores in results.items()}


def history_weights(split, catalogue, frame_class: np.ndarray, n_classes: int) -> dict[str, torch.Tensor]:
    """Name -> ``(n_users, n_items)`` weight of every training history entry (0 off the history).

    ``uniform``: FISM's pooling. ``consistent items``: ``exp(3 x support)``, where support is the
    share of the user's other history items showing the entry's best-supported class (item
    attention from perfect frame labels, attainable from content). ``clicks removed`` / ``past
    removed``: the generator's flags (perfect item attention, which no model can fully know: a
    click on an item of a liked class looks like a choice).
    """
    import torch

    from acfrec.datasets.catalogue import generator_index

    item_source, user_source = generator_index(split.items.external_ids), generator_index(split.users.external_ids)
    train = split.train.tocoo()
    history = torch.zeros(split.n_users, split.n_items)
    history[train.row, train.col] = 1.0
    shows = frames_per_class(catalogue, frame_class, n_classes) > 0
    shows_t = torch.as_tensor(shows[item_source], dtype=torch.float32)  # (items, classes)
    votes = history @ shows_t  # (users, classes)
    support = ((votes[:, None, :] - shows_t[None]) * shows_t[None]).amax(-1)  # (users, items)
    support = support / (history.sum(1, keepdim=True) - 1).clamp_min(1)
    clicked = torch.as_tensor(catalogue.clicks()[user_source][:, item_source])
    past = torch.as_tensor(catalogue.past_choices()[user_source][:, item_source])
    weights = {
        "uniform": history,
        "consistent items (from labels)": history * torch.exp(3.0 * support),
        "clicks removed (truth)": history * ~clicked,
    }
    if past.any():
        weights["past removed (truth)"] = history * ~past
        weights["clicks and past removed (truth)"] = history * ~(clicked | past)
    return weights


def fit_weighted_fism(
    split, weights: torch.Tensor, dim: int = 64, seed: int = 0, lr: float = 0.005, l2: float = 1e-3, patience: int = 10
):
    """A FISM (BPR, item bias, target left out of its own history) whose history entries are pooled
    with fixed ``weights`` ``(n_users, n_items)``: a learned model given a fixed item attention.
    Early stopping on validation NDCG@10; returns an object :func:`evaluate` can rank with. The
    defaults are ACF's training settings (dim 64, lr 0.005, L2 0.001, patience 10): with dim 32,
    lr 0.01 and L2 1e-4 uniform pooling scored lower (``drifting``, seed 0: 0.234 / 0.139 vs
    0.246 / 0.147) and the item weights seemed to gain more than they do against a well
    regularised model (+0.009 vs +0.002 NDCG@10 from consistency there)."""
    import torch

    from acfrec.eval.evaluate import evaluate

    torch.manual_seed(seed)
    n_items = split.n_items
    history_vectors = torch.nn.Parameter(torch.randn(n_items, dim) * 0.01)
    target_vectors = torch.nn.Parameter(torch.randn(n_items, dim) * 0.01)
    bias = torch.nn.Parameter(torch.zeros(n_items))
    optimiser = torch.optim.Adam([history_vectors, target_vectors, bias], lr=lr)
    train = split.train.tocoo()
    users, items = torch.as_tensor(train.row, dtype=torch.long), torch.as_tensor(train.col, dtype=torch.long)

    def pooled(batch_users: torch.Tensor, left_out: torch.Tensor | None = None) -> torch.Tensor:
        w = weights[batch_users]
        if left_out is not None:
            w = w.clone()
            w[torch.arange(batch_users.numel()), left_out] = 0.0
        return (w @ history_vectors) / w.sum(1, keepdim=True).clamp_min(1e-12)

    class Weighted:  # what evaluate() needs of a model
        n_users = split.n_users

        def score_all(self, batch_users: np.ndarray) -> torch.Tensor:
            with torch.no_grad():
                return pooled(torch.as_tensor(batch_users, dtype=torch.long)) @ target_vectors.T + bias

    model, best, best_state, waited = Weighted(), -1.0, None, 0
    Weighted.n_items = n_items
    while waited <= patience:
        for batch in torch.randperm(users.numel()).split(1024):
            u, positive = users[batch], items[batch]
            negative = torch.randint(0, n_items, (batch.numel(),))
            query = pooled(u, positive)
            margin = (query * (target_vectors[positive] - target_vectors[negative])).sum(1) + bias[positive] - bias[negative]
            penalty = query.square().sum(1) + target_vectors[positive].square().sum(1) + target_vectors[negative].square().sum(1)
            loss = -torch.nn.functional.logsigmoid(margin).mean() + l2 * penalty.mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        score = evaluate(model, split, target="valid", protocols=("full",), ks=(10,)).metrics["full"]["NDCG@10"]
        if score > best:
            best, best_state, waited = score, [t.detach().clone() for t in (history_vectors, target_vectors, bias)], 0
        else:
            waited += 1
    with torch.no_grad():
        for tensor, kept in zip((history_vectors, target_vectors, bias), best_state, strict=True):
            tensor.copy_(kept)
    return model


def learned_table(split, catalogue, frame_class: np.ndarray, n_classes: int) -> None:
    """The learned-FISM rows: HR@10, NDCG@10 and the paired NDCG@10 change against uniform pooling."""
    import torch

    from acfrec.eval.evaluate import evaluate

    torch.set_num_threads(1)
    print(f"\n{'FISM with fixed history weights':<44}{'HR@10':>8}{'NDCG@10':>9}{'dNDCG (paired SE)':>22}")
    reference = None
    for name, weights in history_weights(split, catalogue, frame_class, n_classes).items():
        result = evaluate(fit_weighted_fism(split, weights), split, protocols=("full",), ks=(10,))
        metrics, per_user = result.metrics["full"], result.per_user("NDCG@10", "full")
        change = ""
        if reference is None:
            reference = per_user
        else:
            diff = per_user - reference
            change = f"{diff.mean():+.4f} ({diff.std() / np.sqrt(diff.size):.4f})"
        print(f"{name:<44}{metrics['HR@10']:>8.3f}{metrics['NDCG@10']:>9.3f}{change:>22}", flush=True)


def main() -> None:
    import torch
    import yaml

    from acfrec.data.interactions import Interactions
    from acfrec.data.splitting import leave_one_out
    from acfrec.datasets.catalogue import planted_catalogue, planted_preset
    from acfrec.eval.evaluate import evaluate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="a named planted catalogue (acfrec.datasets.catalogue.PRESETS)")
    parser.add_argument("--catalogue", nargs="+", default=[], metavar="KEY=VALUE", help="catalogue arguments (YAML values)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", default="true", help="'true' frame classes or 'kmeans:K' clusters of the pixels")
    parser.add_argument("--learned", action="store_true",
                        help="also train FISM with fixed history weights (uniform, consistent, truth): ~1 min per row")
    args = parser.parse_args()
    options = {k: yaml.safe_load(v) for k, v in (pair.split("=", 1) for pair in args.catalogue)}
    options["seed"] = args.seed
    catalogue = planted_preset(args.preset, **options) if args.preset else planted_catalogue(**options)
    split = leave_one_out(Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp"), seed=0)
    frame_class, n_classes, purity = class_of_frames(catalogue, args.labels)

    class Scores:  # what evaluate() needs of a model
        n_users, n_items = split.n_users, split.n_items

        def __init__(self, scores: np.ndarray) -> None:
            self.scores = scores

        def score_all(self, users: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(self.scores[users], dtype=torch.float32)

    print(f"{args.preset or 'default'} catalogue {options}: {split.n_users} users, {split.n_items} items, "
          f"{split.train.nnz} training interactions; frame labels {args.labels} (purity {purity:.2f})")
    print(f"{'scorer':<44}{'HR@10':>8}{'NDCG@10':>9}")
    for name, scores in scorers(split, catalogue, frame_class, n_classes).items():
        metrics = evaluate(Scores(scores), split, protocols=("full",), ks=(10,)).metrics["full"]
        print(f"{name:<44}{metrics['HR@10']:>8.3f}{metrics['NDCG@10']:>9.3f}")
    if args.learned:
        learned_table(split, catalogue, frame_class, n_classes)


if __name__ == "__main__":
    main()
