"""ACF: exact target exclusion, training, ablations, content paths, persistence, planted recovery."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from acfrec.data.components import AlignedComponents
from acfrec.data.interactions import Interactions
from acfrec.data.splitting import leave_one_out
from acfrec.datasets.catalogue import planted_catalogue, planted_preset
from acfrec.eval.evaluate import evaluate
from acfrec.models import Recommender, TrainData, get_model
from acfrec.models import acf as acf_module
from acfrec.models.acf import ACF, _cluster_codes, _Components, _MixComponents, _select, build_history

# Training settings for the small planted catalogue (the defaults are tuned for ML-100K).
PLANTED = dict(lr=0.005, init_std=0.03, weight_decay=0.0, max_history=100)
# ACF's own training from scratch; the FISM pre-training stage has its own tests.
FAST = dict(progress=False, seed=0, dim=32, attention_dim=16, epochs=4, patience=0, pretrain=None, **PLANTED)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    catalogue = planted_catalogue(n_users=300, n_items=150, seed=1)
    split = leave_one_out(Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp"), seed=0)
    store = catalogue.write_store(tmp_path_factory.mktemp("acf") / "store", dim=32)
    return catalogue, split, store, store.align(split.items, max_components=8)


def _shell(split, aligned, **config) -> ACF:
    """An untrained ACF with non-trivial (random) attention, for exact-arithmetic checks."""
    model = ACF(components=aligned, **{**FAST, **config})
    model.seen = split.train if hasattr(split, "train") else split
    model.module = model._build(TrainData.coerce(split))
    torch.manual_seed(5)
    for layer in (model.module.att_out, getattr(model.module, "comp_out", None)):
        if layer is not None:
            torch.nn.init.normal_(layer.weight, std=3.0)
    if hasattr(model.module, "content_history"):  # W_c x_lm then of the size of p_l
        torch.nn.init.normal_(model.module.content_history.weight, std=0.1 / model.config.dim**0.5)
    return model


def _brute_force_vectors(model: ACF, users: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """``u + sum alpha p`` with ``excluded`` dropped from each history and the softmax recomputed."""
    net = model.module
    logits, user, beta = net.attend(users)
    history = net.history[users]
    logits = logits.masked_fill(history == excluded[:, None], -torch.inf)
    valid = torch.isfinite(logits)
    norm = torch.logsumexp(logits, dim=1, keepdim=True)
    alpha = torch.exp(logits - model.config.history_smoothing * norm)
    alpha = torch.where(valid, alpha, torch.zeros_like(alpha))
    vectors = net.history_item(history)
    if model.config.content_in_history:
        vectors = vectors + _history_content(net, history, beta)
    return user + torch.einsum("nh,nhd->nd", alpha, vectors)


def _history_content(net, history: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``W_c xbar_l`` ``(n, H, dim)`` recomputed from beta: the beta-mixed projected components,
    or the no-content vector for items without components."""
    x = net.project(net.features[history])
    has_content = net.feature_mask[history].any(dim=-1, keepdim=True)
    mixed = torch.einsum("nhm,nhmd->nhd", beta, x)
    return net.content_history(torch.where(has_content, mixed, net.no_content))


@pytest.mark.parametrize(
    "options",
    [
        {"history_smoothing": 1.0},
        {"history_smoothing": 0.5},
        # p_l + W_c xbar_l: a history entry's vector depends on the user
        {"history_smoothing": 0.5, "content_in_history": True, "profile_query": True},
    ],
)
def test_positive_is_removed_exactly_from_its_history(planted, options):
    _, split, _, aligned = planted
    model = _shell(split, aligned, **options)
    net = model.module
    rng = np.random.default_rng(0)
    users = torch.as_tensor(rng.choice(split.n_users, size=64, replace=False))
    with torch.no_grad():
        logits, _, _ = net.attend(users)
        # One user has fewer history entries than the catalogue has items: the distinct-items path.
        torch.testing.assert_close(net.attend(users[:1])[0], logits[:1])
        top = net.history[users, logits.argmax(dim=1)]
        lengths = net.history_mask[users].sum(dim=1)
        random_slot = torch.as_tensor(rng.integers(0, lengths.numpy()))
        other = net.history[users, random_slot]
        # Every user twice: once with its top-attention item as the target, once another item.
        rows_users = torch.cat([users, users])
        positives = torch.cat([top, other])
        distinct, row_user = torch.unique(rows_users, return_inverse=True)
        pooled = net.pool(distinct)
        fast = net.user_vectors(_select(pooled, row_user), exclude=positives)
        slow = _brute_force_vectors(model, rows_users, positives)
        full = net.user_vectors(pooled)[row_user]
    assert (top != other).sum() > 30
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert (fast - full).abs().max() > 1e-3  # the exclusion really changed something


def test_exclusion_of_a_lone_item_leaves_the_user_vector():
    train = sp.csr_matrix(np.array([[1, 0, 0, 0], [1, 1, 0, 1], [0, 1, 1, 0]], dtype=np.float32))
    model = _shell(train, None, use_content=False, history_smoothing=0.5)
    net = model.module
    users, positives = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 3, 0, 2])
    with torch.no_grad():
        distinct, row_user = torch.unique(users, return_inverse=True)
        fast = net.user_vectors(_select(net.pool(distinct), row_user), exclude=positives)
        slow = _brute_force_vectors(model, users, positives)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[0], net.user.weight[0])


@pytest.mark.parametrize("options", [{}, {"content_in_history": True, "profile_query": True, "frame_agreement": 1.0}])
def test_training_over_every_user_matches_the_batch_users(planted, monkeypatch, options):
    """A batch holding most history entries attends every user through the cached layout of all
    the histories: same loss and gradients as over its distinct users only; the cache follows
    the history buffers."""
    _, split, _, aligned = planted
    model = _shell(split, aligned, history_sample=None, **options)  # a sample is drawn per batch
    net = model.module
    net.double()
    g = torch.Generator().manual_seed(2)
    users = torch.randint(0, split.n_users, (2000,), generator=g)
    users[0] = 0  # so that the every-user path is not the distinct users already
    users = users[users != 1]
    positives = net.history[users, 0]
    negatives = torch.randint(0, split.n_items, (users.shape[0], 2), generator=g)
    results = []
    for share in (0.0, 2.0):  # every user, then the batch's distinct users only
        monkeypatch.setattr(acf_module, "_EVERY_USER_SHARE", share)
        assert (net.batch_users(users)[0].shape[0] == split.n_users) == (share == 0.0)
        for _ in range(2):  # the second call reuses the cached layout
            net.zero_grad()
            loss = model._loss(users, positives, negatives)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        assert grads.keys() == results[0][1].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name])
    monkeypatch.setattr(acf_module, "_EVERY_USER_SHARE", 0.0)
    every = torch.arange(split.n_users)
    before = net.pool(every).numerator_rest
    with torch.no_grad():  # an in-place change of the histories rebuilds the layout
        net.history_mask[:, 1:] = False
    after = net.pool(every)
    fresh = net.pool_rows(net.user(every), net.history, net.history_mask, net.tables())
    for field in ("numerator_rest", "square_norm", "denominator_rest"):
        torch.testing.assert_close(getattr(after, field), getattr(fresh, field))
    assert not torch.equal(before, after.numerator_rest)



def _sample_of(net, users: torch.Tensor, pooled) -> torch.Tensor:
    """``(n, H)`` bool: which slots of each user's full history the sample in ``pooled`` holds."""
    full, full_mask = net.history[users], net.history_mask[users]
    same = (pooled.history[:, :, None] == full[:, None, :]) & pooled.mask[:, :, None] & full_mask[:, None, :]
    return same.any(dim=1)


def _pooled_shell(split, aligned, rng_seed: int, **options):
    """A :func:`_shell` model, a seeded generator, 64 of its users and their (sampled) pooled sums."""
    model = _shell(split, aligned, **options)
    rng = np.random.default_rng(rng_seed)
    users = torch.as_tensor(rng.choice(split.n_users, size=64, replace=False))
    torch.manual_seed(11)
    with torch.no_grad():
        pooled = model.module.pool(users, sample=True)
    return model, rng, users, pooled


@pytest.mark.parametrize("options", [{"history_smoothing": 0.5}, {"history_smoothing": 1.0, "content_in_history": True}])
def test_sampled_history_removes_the_positive_exactly(planted, options):
    """With ``history_sample``, the positive leaves the sample exactly (when drawn) and both sums
    are rescaled by (full length / sample length) after the exclusion: brute force on the sample."""
    _, split, _, aligned = planted
    model, rng, users, pooled = _pooled_shell(split, aligned, 3, history_sample=6, **options)
    net = model.module
    with torch.no_grad():
        assert pooled.full_count is not None and int(pooled.mask.sum(dim=1).max()) == 6
        in_sample = _sample_of(net, users, pooled)
        assert torch.equal(in_sample.sum(dim=1), pooled.mask.sum(dim=1))
        full_mask = net.history_mask[users]
        lengths = full_mask.sum(dim=1)
        assert (lengths > 6).sum() > 30
        # one target from the sample, one from outside it (when the history has one), one at random
        drawn = net.history[users, torch.multinomial(in_sample.double(), 1).squeeze(1)]
        outside = in_sample.logical_not() & full_mask
        not_drawn = net.history[users, torch.multinomial((outside | ~outside.any(1, keepdim=True)).double(), 1).squeeze(1)]
        anything = torch.randint(0, split.n_items, users.shape)  # in the history or not
        rows = torch.arange(3 * users.shape[0]) % users.shape[0]
        positives = torch.cat([drawn, not_drawn, anything])
        fast = net.user_vectors(_select(pooled, rows), exclude=positives)
        logits, user, beta = net.attend(users)
    smoothing = model.config.history_smoothing
    history = net.history[users][rows]
    kept = in_sample[rows] & (history != positives[:, None])
    full = (full_mask[rows] & (history != positives[:, None])).sum(dim=1)
    ratio = full / kept.sum(dim=1)
    weights = torch.where(kept, torch.exp(logits[rows]), torch.zeros(()))
    vectors = net.history_item(history)
    if model.config.content_in_history:
        vectors = vectors + _history_content(net, history, beta[rows])
    slow = user[rows] + ratio[:, None] * torch.einsum("nh,nhd->nd", weights, vectors) / (
        ratio * weights.sum(dim=1)
    )[:, None] ** smoothing
    assert (outside.any(dim=1) & (lengths > 6)).sum() > 30  # the second target really was outside the sample
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options", [{"history_smoothing": 0.5}, {"history_smoothing": 1.0, "content_in_history": True, "history_sample": 6}]
)
def test_earlier_context_attends_the_entries_before_the_positive(planted, options):
    """``training_context="earlier"``: brute force over each row's entries older than its positive
    (of the sample, rescaled by earlier entries / sampled earlier entries, with ``history_sample``)."""
    _, split, _, aligned = planted
    model, rng, users, pooled = _pooled_shell(split, aligned, 4, training_context="earlier", **options)
    net = model.module
    with torch.no_grad():
        lengths = net.history_mask[users].sum(dim=1)
        slot = torch.as_tensor(rng.integers(0, lengths.numpy()))
        slot[:3] = 0  # the oldest entry: nothing before it
        positives = net.history[users, slot]
        fast = net.earlier_vectors(pooled, users, positives, net.tables())
        logits, user, beta = net.attend(users)
    history = net.history[users]
    in_sample = _sample_of(net, users, pooled) if "history_sample" in options else net.history_mask[users]
    earlier = in_sample & (torch.arange(history.shape[1])[None, :] < slot[:, None])
    ratio = slot / earlier.sum(dim=1).clamp_min(1)
    weights = torch.where(earlier, torch.exp(logits), torch.zeros(()))
    vectors = net.history_item(history)
    if model.config.content_in_history:
        vectors = vectors + _history_content(net, history, beta)
    denominator = (ratio * weights.sum(dim=1)).clamp_min(1e-30) ** model.config.history_smoothing
    slow = user + ratio[:, None] * torch.einsum("nh,nhd->nd", weights, vectors) / denominator[:, None]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast[:3], user[:3]) and (slot > 5).sum() > 10


def test_earlier_context_trains_repeatably_and_needs_time_order(planted):
    _, split, _, aligned = planted
    options = dict(components=aligned, **{**FAST, "training_context": "earlier"})
    first = ACF(**options).fit(split)
    losses = [entry["loss"] for entry in first.history if entry["loss"] is not None]
    assert losses[-1] < losses[0] and np.isfinite(first.score_all(np.arange(10)).numpy()).all()
    again = ACF(**options).fit(split)
    torch.testing.assert_close(again.score_all(np.arange(20)), first.score_all(np.arange(20)), rtol=0, atol=0)
    with pytest.raises(Exception, match="training_context='earlier' needs the interactions' time order"):
        ACF(**options).fit(split.train, valid=None)
    with pytest.raises(ValueError, match="training_context must be 'history' or 'earlier'"):
        ACF(**{**options, "training_context": "later"}).fit(split)


def test_sampled_history_estimates_the_full_sums(planted):
    """Uniform attention (item attention off), smoothing 0.5: the user vector is ``u + sum p /
    n^0.5``, and the rescaled sample gives it on average; a sample at least as long as every
    history trains exactly as the whole history."""
    _, split, _, aligned = planted
    model = _shell(split, None, use_content=False, item_attention=False, history_sample=4)
    net = model.module
    users = torch.arange(40)
    with torch.no_grad():
        full = net.user_vectors(net.pool(users))
        draws = torch.stack([net.user_vectors(net.pool(users, sample=True)) for _ in range(2000)])
    spread = draws.std(dim=0) / 2000**0.5
    assert (draws[0] - full).abs().max() > 10 * spread.max()  # one draw is not the full history
    assert ((draws.mean(dim=0) - full).abs() <= 5 * spread + 1e-7).all()

    losses = []
    for sample in (None, int(net.history.shape[1])):
        fitted = ACF(components=aligned, **{**FAST, "epochs": 2, "history_sample": sample}).fit(split)
        assert not fitted.module.samples_history()
        losses.append([entry["loss"] for entry in fitted.history])
    assert losses[0] == losses[1]


def test_history_sample_repeats_with_the_seed_and_rejects_bad_values(planted):
    _, split, _, aligned = planted
    runs = [
        ACF(components=aligned, **{**FAST, "epochs": 2, "history_sample": 5, "seed": seed}).fit(split)
        for seed in (0, 0, 1)
    ]
    assert runs[0].module.samples_history()
    losses = [[entry["loss"] for entry in run.history] for run in runs]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    torch.testing.assert_close(runs[0].score_all([0, 1]), runs[1].score_all([0, 1]), rtol=0, atol=0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="history_sample must be None"):
            ACF(components=aligned, **{**FAST, "history_sample": bad}).fit(split)


def test_chunked_component_attention_matches_autograd(monkeypatch):
    """The hand-written forward/backward of the component level against plain autograd."""
    monkeypatch.setattr(acf_module, "_MIX_CHUNK", 7)  # several chunks, the last one partial
    g = torch.Generator().manual_seed(0)
    n_items, n_slots, att, n_users, n_entries = 6, 4, 5, 3, 30
    inputs = [
        torch.randn(n_items, n_slots, att, generator=g, dtype=torch.float64),  # keys
        torch.randn(n_items, n_slots, att, generator=g, dtype=torch.float64),  # values
        torch.randn(n_users, att, generator=g, dtype=torch.float64),  # user keys
        torch.randn(att, generator=g, dtype=torch.float64) * 3,  # w
    ]
    slots = torch.rand(n_items, n_slots, generator=g) < 0.5
    slots[:, 0] = True
    inverse = torch.randint(0, n_items, (n_entries,), generator=g)
    rows = torch.randint(0, n_users, (n_entries,), generator=g)
    probe = torch.randn(n_entries, att, generator=g, dtype=torch.float64)

    def reference(keys, values, user_keys, w):
        logits = torch.relu(keys[inverse] + user_keys[rows][:, None, :]) @ w
        beta = torch.softmax(logits.masked_fill(~slots[inverse], -torch.inf), dim=-1)
        return torch.einsum("fm,fma->fa", beta, values[inverse]), beta

    pairs = _Components.of(slots, inverse, rows)

    def flat(keys, values, user_keys, w):
        """The kernel on the real components only, laid out as component_terms does."""
        real = (pairs.item, pairs.slot)
        return _MixComponents.apply(keys[real], values[real], user_keys, w, pairs)

    results = []
    for function in (flat, reference):
        leaves = [x.clone().requires_grad_() for x in inputs]
        mixed, beta = function(*leaves)
        (mixed * probe).sum().backward()
        results.append((mixed, beta, [leaf.grad for leaf in leaves]))
    (fast, fast_beta, fast_grads), (slow, slow_beta, slow_grads) = results
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fast_beta, slow_beta)
    assert (fast_beta[~slots[inverse]] == 0).all()
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast_grad, slow_grad)
        assert fast_grad.abs().max() > 1e-3


def _padded_component_terms(net, user, flat):
    """Component attention over the padded ``(U, M)`` slot grid, by plain autograd: what
    ``component_terms`` computed before it skipped the padded slots."""
    config = net.config
    valid = net.feature_mask[flat.items]
    has_content = valid.any(dim=1, keepdim=True)
    x = net.project(net.features[flat.items])
    values = torch.where(has_content[..., None], net.att_content(x), net.att_content(net.no_content))
    att, dim = values.shape[-1], x.shape[-1]
    if config.content_in_history:
        values = torch.cat([values, net.content_history(torch.where(has_content[..., None], x, net.no_content))], -1)
    if config.frame_agreement > 0:
        values = torch.cat([values, net.frame_codes(flat.items)], dim=-1)
    slots = valid | ~has_content
    if config.component_attention:
        query = user
        if config.profile_query:
            item_mean = (x * valid[..., None]).sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)
            total = torch.zeros_like(user).index_add(0, flat.rows, item_mean[flat.inverse])
            query = user + total / torch.bincount(flat.rows, minlength=user.shape[0]).clamp_min(1)[:, None]
        hidden = torch.relu(net.comp_component(x)[flat.inverse] + net.comp_user(net.scaled(query))[flat.rows][:, None])
        logits = hidden @ (net.comp_out.weight[0] * config.attention_lr_scale)
        beta = torch.softmax(logits.masked_fill(~slots[flat.inverse], -torch.inf), dim=-1)
        mixed = torch.einsum("fm,fmw->fw", beta, values[flat.inverse])
    else:
        beta = (slots / slots.sum(dim=1, keepdim=True)).to(values.dtype)[flat.inverse]
        mixed = torch.einsum("fm,fmw->fw", beta, values[flat.inverse])
    return mixed[:, :att], mixed[:, att : att + dim], mixed[:, att + dim :], beta * has_content[flat.inverse]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"scale_attention_inputs": True, "attention_lr_scale": 3.0},
        {"content_in_history": True, "profile_query": True, "frame_agreement": 1.0},
        {"component_attention": False, "content_in_history": True, "frame_agreement": 1.0},
    ],
)
def test_component_terms_over_real_components_match_the_padded_grid(planted, options):
    """Only the real components are attended; outputs and every gradient match the padded grid,
    with items without content, components missing mid-row and both distinct-item paths."""
    _, split, _, aligned = planted
    g = torch.Generator().manual_seed(3)
    mask = aligned.mask & (torch.rand(aligned.mask.shape, generator=g) < 0.7)
    mask[::7] = False  # items without content
    features = aligned.features * mask[..., None]
    model = _shell(split, AlignedComponents(features, mask), **options)
    net = model.module
    if options.get("content_in_history"):
        torch.nn.init.normal_(net.content_history.weight, std=0.3)
    torch.nn.init.normal_(net.comp_out.weight, std=3.0)
    net.double()  # only the order of the sums differs: compare without float32 rounding
    users = torch.as_tensor(np.random.default_rng(1).choice(split.n_users, size=48, replace=False))
    assert (net.feature_mask[net.history[users][net.history_mask[users]]].sum(dim=1) == 0).any()
    for rows in (users, users[:1]):  # every item / the distinct items of one history
        user = net.user(rows)
        flat = acf_module._Flat.of(net.history[rows], net.history_mask[rows], split.n_items)
        mixed, beta = net.component_terms(user, flat)
        fast = [mixed, flat.content, flat.frames, beta]
        slow = list(_padded_component_terms(net, user, flat))
        gradients = []
        for outputs in (fast, slow):
            net.zero_grad()
            probe = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)).sum()
                        for i, o in enumerate(outputs[:3]) if o is not None and o.numel())
            probe.backward(retain_graph=True)  # the user vectors are shared
            gradients.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        for f, s in zip(fast, slow, strict=True):
            if f is None:
                assert s.numel() == 0
            else:
                torch.testing.assert_close(f, s)
        assert gradients[0].keys() == gradients[1].keys()
        for name, grad in gradients[0].items():
            torch.testing.assert_close(grad, gradients[1][name], msg=lambda m, name=name: f"{name}: {m}")


def test_frame_clusters_recover_separated_directions_at_every_seed():
    """The frame-agreement loss's k-means (cosine) finds well-separated directions whatever the
    seed, leaves masked slots empty, and copes with no components at all."""
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    truth = torch.randint(0, 4, (60, 5), generator=g)
    features = directions[truth] * torch.rand(60, 5, 1, generator=g).add(0.5) + 0.05 * torch.randn(60, 5, 8, generator=g)
    mask = torch.rand(60, 5, generator=g) < 0.8
    for seed in range(4):
        codes = _cluster_codes(features, mask, 4, seed)
        assert (codes[~mask] == 0).all() and (codes[mask].sum(dim=-1) == 1).all()
        labels = codes[mask].argmax(dim=-1)
        # one cluster per direction: the (cluster, direction) pairs are a bijection
        assert torch.unique(labels * 4 + truth[mask]).numel() == 4
    assert torch.equal(_cluster_codes(features, mask, 4, 0), _cluster_codes(features, mask, 4, 0))
    empty = torch.zeros(3, 5, dtype=torch.bool)
    assert (_cluster_codes(features[:3], empty, 4, 0) == 0).all()


def test_history_keeps_most_recent_items_or_a_seeded_sample(planted):
    _, split, _, _ = planted
    history, mask = build_history(TrainData.coerce(split), max_history=5)
    frame = split.train_frame.filter(split.train_frame["user"] == 7)
    expected = frame.sort("timestamp")["item"].to_numpy()[-5:]
    np.testing.assert_array_equal(history[7][mask[7]].numpy(), expected)
    sampled, sampled_mask = build_history(TrainData(split.train), max_history=5, seed=1)
    again, _ = build_history(TrainData(split.train), max_history=5, seed=1)
    assert torch.equal(sampled, again) and sampled_mask.sum(dim=1).max() == 5
    row = split.train[7].indices
    assert set(sampled[7][sampled_mask[7]].tolist()) <= set(row.tolist())


def test_trains_loss_falls_and_explains(planted):
    _, split, _, aligned = planted
    model = ACF(components=aligned, **{**FAST, "epochs": 6})
    model.fit(split)
    losses = [entry["loss"] for entry in model.history]
    assert losses[-1] < 0.8 * losses[0]
    explanation = model.explain(user=3, item=10, top_items=4, top_components=2)
    assert explanation["score"] == pytest.approx(float(model.score([3], [10])[0, 0]), rel=1e-5)
    entries = explanation["history"]
    history_length = int((model.attention([3])["history"][0] >= 0).sum())
    assert history_length >= 1 and len(entries) == min(4, history_length)
    assert [e["alpha"] for e in entries] == sorted((e["alpha"] for e in entries), reverse=True)
    seen = set(split.train[3].indices.tolist())
    for entry in entries:
        assert entry["item"] in seen and 1 <= len(entry["components"]) <= 2
        n_components = int(aligned.mask[entry["item"]].sum())
        assert all(0 <= c["component"] < n_components and 0 < c["beta"] <= 1 for c in entry["components"])
    att = model.attention([3])
    assert np.isclose(att["beta"][0][att["history"][0] >= 0].sum(axis=1), 1.0, atol=1e-5).all()


@pytest.mark.parametrize(
    "options",
    [
        {"component_attention": False},
        {"item_attention": False},
        {"use_content": False},
        {"history_smoothing": 1.0, "max_history": 4, "max_components": 2},
        {"scale_attention_inputs": True, "attention_dropout": 0.2},
        {"content_in_history": True, "profile_query": True, "frame_agreement": 1.0, "item_attention": False},
    ],
)
def test_ablations_train_and_score(planted, options):
    _, split, _, aligned = planted
    model = ACF(components=aligned, **{**FAST, "epochs": 2, **options}).fit(split)
    scores = model.score_all(np.arange(split.n_users))
    assert scores.shape == (split.n_users, split.n_items) and torch.isfinite(scores).all()
    att = model.attention([0, 1])
    if options.get("component_attention") is False:
        beta = att["beta"][att["history"] >= 0]
        expected = 1.0 / np.maximum(aligned.mask[att["history"][att["history"] >= 0]].sum(-1).numpy(), 1)
        np.testing.assert_allclose(beta.max(axis=1), expected, rtol=1e-5)
    if options.get("item_attention") is False:
        lengths = (att["history"] >= 0).sum(axis=1)
        np.testing.assert_allclose(att["alpha"].max(axis=1), lengths ** -0.5, rtol=1e-5)
    if options.get("use_content") is False:
        assert "beta" not in att and not model.module.has_content


def test_items_without_content_train_and_score_finitely(planted):
    _, split, _, aligned = planted
    mask = aligned.mask.clone()
    mask[::3] = False  # a third of the catalogue has no content
    partial = AlignedComponents(aligned.features * mask[..., None], mask)
    model = ACF(components=partial, **FAST).fit(split)
    scores = model.score_all(np.arange(split.n_users))
    assert torch.isfinite(scores).all()
    untrained = ACF(components=partial, **FAST)._build(TrainData.coerce(split))
    assert not torch.allclose(model.module.no_content, untrained.no_content)  # it learned
    user = int(np.flatnonzero(np.isin(np.arange(split.n_users), split.train[:, ::3].nonzero()[0]))[0])
    att = model.attention([user])
    empty = att["history"][0] % 3 == 0
    assert (att["history"][0][empty] >= 0).any()
    assert not att["beta"][0][empty & (att["history"][0] >= 0)].any()


def test_save_load_gives_identical_scores(planted, tmp_path):
    _, split, _, aligned = planted
    model = ACF(components=aligned, **FAST).fit(split)
    model.save(tmp_path / "acf")
    loaded = Recommender.load(tmp_path / "acf")
    users = np.arange(split.n_users)
    assert isinstance(loaded, ACF)
    torch.testing.assert_close(loaded.score_all(users), model.score_all(users), rtol=0, atol=0)
    assert torch.equal(loaded.module.features, model.module.features)
    assert loaded.explain(2, 5) == model.explain(2, 5)


def test_components_path_and_missing_content(planted, caplog):
    _, split, store, aligned = planted
    by_path = ACF(components_path=str(store.path), **{**FAST, "epochs": 1}).fit(split)
    assert by_path.module.has_content and by_path.module.features.shape[0] == split.n_items
    with caplog.at_level(logging.WARNING):
        plain = get_model("acf")(**{**FAST, "epochs": 1}).fit(split)
    assert "no components given" in caplog.text and not plain.module.has_content
    assert "no user-specific input" not in caplog.text  # u_i is on
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        get_model("acf")(**{**FAST, "epochs": 1, "user_embedding": False}).fit(split)
    assert "no user-specific input" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        get_model("acf")(**{**FAST, "epochs": 1, "user_embedding": False, "item_attention": False}).fit(split)
        ACF(components=aligned, **{**FAST, "epochs": 1, "user_embedding": False}).fit(split)
    assert "no user-specific input" not in caplog.text
    with pytest.raises(Exception, match="aligned components cover 3 items"):
        ACF(components=AlignedComponents(torch.zeros(3, 2, 4), torch.ones(3, 2, dtype=torch.bool)), **FAST).fit(split)


def test_fism_pretraining_starts_acf_at_fism(planted):
    _, split, _, aligned = planted
    stage = dict(progress=False, seed=0, dim=32, patience=0, max_history=100)
    fism_options = {k: v for k, v in stage.items() if k != "max_history"}

    def fism_and_start(fism_extra: dict, acf_extra: dict) -> tuple:
        """A 3-epoch FISM and an ACF that stops right after its 3-epoch FISM stage."""
        fism = get_model("fism")(epochs=3, **fism_options, **fism_extra).fit(split)
        start = ACF(components=aligned, epochs=0, pretrain="fism", pretrain_epochs=3, **stage, **acf_extra).fit(split)
        return fism, start

    fism, start = fism_and_start({}, {})
    # no ACF epoch: u = 0 and uniform attention pool p exactly as FISM does (alpha = smoothing)
    users = np.arange(split.n_users)
    torch.testing.assert_close(start.score_all(users), fism.score_all(users), rtol=0, atol=1e-6)
    assert not start.module.user.weight.any()
    again = ACF(components=aligned, epochs=0, pretrain="fism", pretrain_epochs=3, **stage).fit(split)
    torch.testing.assert_close(again.score_all(users), start.score_all(users), rtol=0, atol=0)
    # the FISM stage keeps the same weight average as ACF ...
    fism_averaged, start_averaged = fism_and_start({"average_half_life": 1.0}, {"average_half_life": 1.0})
    torch.testing.assert_close(start_averaged.score_all(users), fism_averaged.score_all(users), rtol=0, atol=1e-6)
    assert not torch.allclose(fism_averaged.score_all(users), fism.score_all(users))
    # ... and trains at the batch size it is given (FISM's own by default)
    fism_small_batches, start_small_batches = fism_and_start({"batch_size": 256}, {"pretrain_batch_size": 256})
    torch.testing.assert_close(start_small_batches.score_all(users), fism_small_batches.score_all(users), rtol=0, atol=1e-6)
    assert not torch.allclose(fism_small_batches.score_all(users), fism.score_all(users))
    with pytest.raises(ValueError, match="pretrain_batch_size must be None"):
        ACF(components=aligned, **{**FAST, "pretrain": "fism", "pretrain_batch_size": 0}).fit(split)
    with pytest.raises(ValueError, match="pretrain must be None or one of"):
        ACF(components=aligned, **{**FAST, "pretrain": "svd"}).fit(split)


def test_a_pretrained_start_is_kept_when_training_only_hurts_validation(planted):
    _, split, _, aligned = planted
    stage = dict(components=aligned, **{**FAST, "pretrain": "fism", "pretrain_epochs": 3, "patience": 2})
    start = ACF(**{**stage, "epochs": 0}).fit(split)
    assert [entry["epoch"] for entry in start.history] == [0] and start.history[0]["loss"] is None
    # a step size that wrecks the model: every trained epoch validates below the FISM start
    wrecked = ACF(**{**stage, "epochs": 3, "lr": 0.3}).fit(split)
    scores = [entry["valid_ndcg"] for entry in wrecked.history]
    assert wrecked.history[0]["epoch"] == 0 and max(scores[1:]) < scores[0]
    users = np.arange(split.n_users)
    torch.testing.assert_close(wrecked.score_all(users), start.score_all(users), rtol=0, atol=0)


def test_pretrained_run_resumes_from_its_checkpoint(planted, tmp_path):
    _, split, _, aligned = planted
    options = dict(components=aligned, **{**FAST, "pretrain": "fism", "pretrain_epochs": 2})
    whole = ACF(**{**options, "epochs": 3}).fit(split)
    ACF(**{**options, "epochs": 2, "checkpoint_dir": str(tmp_path)}).fit(split)
    # the second run skips the FISM stage: the checkpoint holds the pre-trained state
    resumed = ACF(**{**options, "epochs": 3, "checkpoint_dir": str(tmp_path)}).fit(split)
    users = np.arange(split.n_users)
    torch.testing.assert_close(resumed.score_all(users), whole.score_all(users), rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained(planted):
    _, split, _, aligned = planted
    acf = ACF(components=aligned, progress=False, seed=0, epochs=30, patience=5, **PLANTED).fit(split)
    pop = get_model("itempop")().fit(split)
    return acf, pop


@pytest.fixture(scope="module")
def full_ranking(planted, trained):
    """Full-ranking HR@10 / NDCG@10 of ACF, ItemPop and FISM on the small planted catalogue."""
    _, split, _, _ = planted
    acf, pop = trained
    fism = get_model("fism")(progress=False, seed=0).fit(split)
    return {
        name: evaluate(model, split, protocols=("full",), ks=(10,)).metrics["full"]
        for name, model in (("acf", acf), ("itempop", pop), ("fism", fism))
    }


def test_acf_beats_itempop_on_the_planted_catalogue(full_ranking):
    assert full_ranking["acf"]["HR@10"] > full_ranking["itempop"]["HR@10"] + 0.08, full_ranking


@pytest.mark.xfail(
    strict=True,
    reason="measured on this catalogue: ACF HR@10 0.567 / NDCG@10 0.376 (FISM pre-training, the default; "
    "0.577 / 0.372 without) vs FISM 0.577 / 0.397: FISM is at the planted oracle's level. On the "
    "'sparse' preset with content_in_history, profile_query, frame_agreement=5 and input scaling, ACF "
    "wins at seed 0 (500 users: 0.206 / 0.121 vs SVD++ 0.190 / 0.111, FISM 0.126 / 0.074), ties FISM at "
    "seed 1 (0.248 / 0.159: the pre-trained start is kept) and loses at seed 2 (0.184 / 0.119 vs BPR-MF "
    "0.212 / 0.120); with a jointly trained content tower blended in (tower_blend=0.5) 0.190 / 0.122, "
    "0.244 / 0.161, 0.216 / 0.134: within noise of the best baseline at 500 users. At 2,000 users x 3,000 items "
    "that model leads at seeds 0 and 1 (0.176 / 0.112 and 0.195 / 0.119 vs FISM 0.162 / 0.100 and 0.179 / 0.108) "
    "but item attention does not help (off: 0.179 / 0.111), and such a catalogue is too slow for a test. "
    "On the 'legible' preset ACF without a user vector wins with component attention mattering "
    "(test_acf_beats_the_baselines_where_the_frames_are_legible); item attention there discounts the "
    "content-blind clicks (their share of alpha is 0.78-0.79x their share of the history) but lifts the ranking only a little; "
    "on the 'stray' preset, whose clicks miss the taste, both levels matter "
    "(test_both_attention_levels_matter_where_clicks_miss_the_taste)",
)
def test_acf_beats_fism_on_the_planted_catalogue(full_ranking):
    acf, fism = full_ranking["acf"], full_ranking["fism"]
    assert acf["HR@10"] > fism["HR@10"] and acf["NDCG@10"] > fism["NDCG@10"], full_ranking


# ACF without a user vector, with the three attention options (see ACFConfig), on the "legible"
# preset: few items per user, frames pixel features can read.
LEGIBLE = dict(
    progress=False, user_embedding=False, history_smoothing=1.0, pretrain=None, lr=0.005,
    content_in_history=True, profile_query=True, frame_agreement=5.0, scale_attention_inputs=True,
)


def _preset_case(tmp_path_factory, name: str, seed: int) -> tuple:
    """A planted preset's catalogue, its leave-one-out split and its aligned pixel-PCA frames."""
    catalogue = planted_preset(name, seed=seed)
    split = leave_one_out(Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp"), seed=0)
    store = catalogue.write_store(tmp_path_factory.mktemp(name) / "store", dim=32)
    return catalogue, split, store.align(split.items, max_components=10)


def _full_metrics(split, model: Recommender) -> dict:
    """Full-ranking HR@10 / NDCG@10 (and the rest) of ``model`` on ``split``'s test items."""
    return evaluate(model, split, protocols=("full",), ks=(10,)).metrics["full"]


@pytest.fixture(scope="module")
def legible(tmp_path_factory):
    return _preset_case(tmp_path_factory, "legible", seed=1)


def test_acf_beats_the_baselines_where_the_frames_are_legible(legible):
    """Measured at seed 1 (HR@10 / NDCG@10): ACF 0.281 / 0.175, FISM 0.257 / 0.160, SVD++
    0.252 / 0.157, BPR-MF 0.231 / 0.141, ACF without component attention 0.260 / 0.156; at seed 0
    the margins are thinner (ACF 0.251 / 0.154, best baseline SVD++ 0.258 / 0.149, ahead on HR@10).
    Item attention lifts the ranking only a little here (off: 0.275 / 0.171), so that is not
    asserted; it does give the content-blind clicks less weight than the chosen items (click
    weight ratio 0.79, 1 = uniform; component attention's liked-frame ratio 2.46)."""
    catalogue, split, aligned = legible
    full = functools.partial(_full_metrics, split)

    model = ACF(components=aligned, **LEGIBLE).fit(split)
    users = split.eval_users("test")
    attention = model.attention(users)
    assert catalogue.click_weight_ratio(split, users, attention) < 0.9
    assert catalogue.liked_frame_ratio(split, users, attention) > 2.0
    acf = full(model)
    no_components = full(ACF(components=aligned, **LEGIBLE, component_attention=False).fit(split))
    for name in ("fism", "svdpp", "bpr-mf"):
        baseline = full(get_model(name)(progress=False).fit(split))
        assert acf["HR@10"] > baseline["HR@10"] + 0.01 and acf["NDCG@10"] > baseline["NDCG@10"] + 0.005, (name, acf, baseline)
    assert acf["HR@10"] > no_components["HR@10"] + 0.01 and acf["NDCG@10"] > no_components["NDCG@10"] + 0.01, (
        acf, no_components,
    )


@pytest.fixture(scope="module")
def stray(tmp_path_factory):
    return _preset_case(tmp_path_factory, "stray", seed=0)


def test_both_attention_levels_matter_where_clicks_miss_the_taste(stray):
    """The "stray" preset: "legible" whose content-blind clicks land outside the user's taste, so
    the frames tell them from choices; ACF's "legible" recipe at its default lr (0.002) with a
    moving average of the weights (average_half_life=1). Seed 0, the demo's catalogue (HR@10 /
    NDCG@10, ~150 s): ACF 0.243 / 0.147, item attention off 0.234 / 0.141, component attention
    off 0.236 / 0.140; the baselines at their defaults SVD++ 0.227 / 0.135, FISM 0.225 / 0.137,
    BPR-MF 0.207 / 0.121; the clicks get 0.67x their uniform share of alpha, the liked frames
    2.13x theirs of beta. The evidence is six catalogue seeds x two model seeds (README, "stray"):
    ACF beats item attention off in 11 of 12 runs (+0.0049 NDCG@10, SE 0.0010 over runs) and
    component attention off in 10 of 12 (+0.0051, SE 0.0012). A single run is not that evidence:
    retrained with model seed 1, this catalogue's component-attention ablation ties ACF on HR@10
    (0.239 each; NDCG@10 0.142 vs 0.145), so the assertions hold for model seed 0, not any seed."""
    catalogue, split, aligned = stray
    full = functools.partial(_full_metrics, split)

    recipe = {**LEGIBLE, "lr": 0.002, "average_half_life": 1.0}
    model = ACF(components=aligned, **recipe).fit(split)
    users = split.eval_users("test")
    attention = model.attention(users)
    clicks, frames = catalogue.click_weight_ratio(split, users, attention), catalogue.liked_frame_ratio(split, users, attention)
    acf = full(model)
    no_items = full(ACF(components=aligned, **recipe, item_attention=False).fit(split))
    no_components = full(ACF(components=aligned, **recipe, component_attention=False).fit(split))
    baselines = {name: full(get_model(name)(progress=False).fit(split)) for name in ("fism", "svdpp", "bpr-mf")}
    assert clicks < 0.8 and frames > 2.0, (clicks, frames)
    for name, baseline in baselines.items():
        assert acf["HR@10"] > baseline["HR@10"] + 0.01 and acf["NDCG@10"] > baseline["NDCG@10"] + 0.005, (name, acf, baseline)
    assert acf["HR@10"] > no_items["HR@10"] + 0.005 and acf["NDCG@10"] > no_items["NDCG@10"], (acf, no_items)
    assert acf["HR@10"] > no_components["HR@10"] + 0.005 and acf["NDCG@10"] > no_components["NDCG@10"] + 0.005, (
        acf, no_components,
    )


def test_without_a_user_vector_u_stays_zero_and_untrained(planted):
    _, split, _, aligned = planted
    model = ACF(components=aligned, **{**FAST, "user_embedding": False}).fit(split.train, valid=None)
    assert not model.module.user.weight.requires_grad and bool((model.module.user.weight == 0).all())
    with_u = ACF(components=aligned, **FAST).fit(split.train, valid=None)
    assert bool((with_u.module.user.weight != 0).any())


# The extensions that let component attention learn (see ACFConfig), on the "sparse" preset.
ATTENTIVE = dict(
    FAST, epochs=20, content_in_history=True, profile_query=True, frame_agreement=5.0, scale_attention_inputs=True
)


@pytest.fixture(scope="module")
def sparse_planted(tmp_path_factory):
    catalogue = planted_preset("sparse", n_users=300, n_items=900, seed=1)
    split = leave_one_out(Interactions.from_frame(catalogue.interactions, timestamp_col="timestamp"), seed=0)
    store = catalogue.write_store(tmp_path_factory.mktemp("sparse") / "store", dim=32)
    return catalogue, split, store.align(split.items, max_components=8)


def test_component_attention_prefers_liked_frames(sparse_planted):
    """Trained for a fixed number of epochs (no early stopping: validation can peak before
    attention moves), component attention puts >= 2x the uniform share on the liked frames."""
    catalogue, split, aligned = sparse_planted
    users = split.eval_users("test")
    ratios = {
        agreement: catalogue.liked_frame_ratio(
            split, users,
            ACF(components=aligned, **{**ATTENTIVE, "frame_agreement": agreement}).fit(split.train, valid=None).attention(users),
        )
        for agreement in (5.0, 0.0)
    }
    # without the frame-agreement loss, the first-order signal of content_in_history alone
    # leaves beta near uniform
    assert ratios[5.0] >= 2.0 and ratios[0.0] < 1.5, ratios


def test_score_histories_of_new_users(planted, trained):
    catalogue, split, _, _ = planted
    acf, _ = trained
    users = np.arange(60)
    # A known user's own history, scored as a new user's (mean user vector instead of u_i),
    # ranks the catalogue much like the user's own scores.
    own = acf.score_histories(split.train[users]).numpy()
    known = acf.score_all(users).numpy()
    assert own.shape == (60, split.n_items) and np.isfinite(own).all()
    correlation = [np.corrcoef(a, b)[0, 1] for a, b in zip(own, known, strict=True)]
    assert np.median(correlation) > 0.7, np.median(correlation)
    # A new user known only by items showing one digit class is recommended more of that class.
    store_item = np.array([int(x[1:]) for x in split.items.external_ids])
    frame_item = np.repeat(np.arange(catalogue.n_items), np.diff(catalogue.item_offsets))
    counts = np.zeros((catalogue.n_items, 10))
    np.add.at(counts, (frame_item, catalogue.truth.frame_class), 1.0)
    share = (counts / counts.sum(axis=1, keepdims=True))[store_item]  # (dense item, class)
    lifts = []
    for digit in range(10):
        history = np.argsort(-share[:, digit], kind="stable")[:8]
        matrix = sp.csr_matrix((np.ones(8), (np.zeros(8, dtype=int), history)), shape=(1, split.n_items))
        scores = acf.score_histories(matrix).numpy()[0]
        scores[history] = -np.inf
        top = np.argsort(-scores)[:15]
        lifts.append(share[top, digit].mean() / share[:, digit].mean())
    assert np.median(lifts) > 1.5, lifts
    empty = acf.score_histories(sp.csr_matrix((2, split.n_items)))
    torch.testing.assert_close(empty[0], empty[1])
    with pytest.raises(Exception, match=f"n_items={split.n_items}"):
        acf.score_histories(sp.csr_matrix((1, split.n_items + 1)))


def test_capped_new_user_history_does_not_depend_on_other_rows(planted, trained):
    _, split, _, _ = planted
    acf, _ = trained
    batch, _ = build_history(TrainData(split.train[[5, 6, 7]]), max_history=3, seed=0)
    alone, _ = build_history(TrainData(split.train[[6]]), max_history=3, seed=0)
    assert torch.equal(batch[1], alone[0])
    rows = acf.score_histories(split.train[[5, 6, 7]])
    torch.testing.assert_close(rows[1:2], acf.score_histories(split.train[[6]]))


def test_frame_agreement_leaves_the_positive_out_of_its_history():
    """Against a loop: the mean over the row's other real history entries of codes . target."""
    from acfrec.models.acf import frame_agreement

    generator = torch.Generator().manual_seed(0)
    n, length, k = 6, 5, 4
    codes = torch.rand(n, length, k, generator=generator)
    history = torch.randint(0, 7, (n, length), generator=generator)
    mask = torch.rand(n, length, generator=generator) > 0.2
    mask[0] = False  # an empty history
    mask[1] = False
    mask[1, 2] = True  # a history holding the positive alone
    positives = history[torch.arange(n), torch.randint(0, length, (n,), generator=generator)]
    positives[1] = history[1, 2]
    positives[2] = 99  # a positive not in the history
    target = torch.rand(n, k, generator=generator)
    expected = torch.zeros(n)
    for row in range(n):
        others = [h for h in range(length) if mask[row, h] and history[row, h] != positives[row]]
        if others:
            expected[row] = torch.stack([codes[row, h] @ target[row] for h in others]).mean()
    assert expected[0] == 0 and expected[1] == 0 and bool((expected[2:] > 0).all())
    torch.testing.assert_close(frame_agreement(codes, history, mask, positives, target), expected)
