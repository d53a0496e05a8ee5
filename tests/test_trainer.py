"""The shared training loop: history, early stopping, best restore, resumable checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from acfrec.errors import ArtifactError
from acfrec.models import TrainData, get_model
from acfrec.models.bprmf import BPRMF
from acfrec.train import Trainer

BASE = {"dim": 8, "batch_size": 64, "progress": False, "seed": 7}



def random_data(n_users: int = 60, n_items: int = 40, seed: int = 0) -> TrainData:
    """Random interactions (~25% density) with one validation item per user outside its history."""
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < 0.25
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = True  # no empty user
    valid = np.argmax(np.where(dense, -1.0, rng.random((n_users, n_items))), axis=1)
    return TrainData(sp.csr_matrix(dense.astype(np.float32)), valid_items=valid.astype(np.int64))


def built(data: TrainData, **options) -> BPRMF:
    """A BPR-MF with its module built, ready for a Trainer (what ``fit`` does before training)."""
    model = BPRMF(**{**BASE, **options})
    model.seen = data.train
    torch.manual_seed(model.config.seed)
    model.module = model._build(data)
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def test_history_entries_and_callbacks() -> None:
    data = random_data()
    seen = []
    model = BPRMF(**BASE, epochs=3, eval_every=2, patience=0)
    model.callbacks.append(lambda epoch, entry: seen.append((epoch, dict(entry))))
    model.fit(data)
    assert [e["epoch"] for e in model.history] == [1, 2, 3]
    assert set(model.history[0]) == {"epoch", "loss", "valid_ndcg", "seconds", "pairs_per_second"}
    assert model.history[0]["valid_ndcg"] is None and model.history[2]["valid_ndcg"] is None
    assert 0.0 <= model.history[1]["valid_ndcg"] <= 1.0
    assert all(e["loss"] > 0 and e["seconds"] > 0 and e["pairs_per_second"] > 0 for e in model.history)
    assert [epoch for epoch, _ in seen] == [1, 2, 3] and seen[1][1] == model.history[1]
    assert not model.module.training  # left in eval mode


def test_loss_decreases_and_progress_bar_runs() -> None:
    data = random_data()
    for progress in (True, False):
        model = BPRMF(**{**BASE, "progress": progress}, epochs=5, lr=0.05).fit(data.train)
        losses = [e["loss"] for e in model.history]
        assert losses[-1] < losses[0] * 0.8
        assert all(e["valid_ndcg"] is None for e in model.history)  # no validation data given


def test_early_stopping_stops_after_patience_and_restores_best() -> None:
    history, model, snapshots = _run_on_curve(random_data(), [0.1, 0.3, 0.2, 0.25, 0.9, 0.9], epochs=20, patience=2)
    # best 0.3 at epoch 2, then two epochs without improvement: stop after epoch 4
    assert [e["epoch"] for e in history] == [1, 2, 3, 4]
    assert [e["valid_ndcg"] for e in history] == [0.1, 0.3, 0.2, 0.25]
    final = weights(model)
    for key, value in snapshots[2].items():
        assert torch.equal(final[key], value)
    assert not torch.equal(final["item.weight"], snapshots[4]["item.weight"])


def _run_on_curve(data: TrainData, curve: list[float], **options) -> tuple[list[dict], BPRMF, dict]:
    """Train with validation scores read from ``curve``; also return the weights each epoch validated."""
    model = built(data, **options)
    scores = iter(curve)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def validator(model, data) -> float:
        snapshots[len(snapshots) + 1] = weights(model)
        return next(scores)

    return Trainer(model.config, validator=validator).fit(model, data), model, snapshots


def test_min_epochs_outlasts_a_dip_and_still_keeps_the_best_epoch() -> None:
    data = random_data()
    # a dip after epoch 1 longer than the patience, then a better epoch
    curve = [0.3, 0.2, 0.2, 0.2, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4]
    stopped_at = {}
    for min_epochs in (0, 4, 9):
        history, model, snapshots = _run_on_curve(data, curve, epochs=20, patience=2, min_epochs=min_epochs)
        stopped_at[min_epochs] = history[-1]["epoch"]
        best = 5 if min_epochs >= 5 else 1
        for key, value in snapshots[best].items():
            assert torch.equal(model.module.state_dict()[key], value), (min_epochs, key)
    # patience alone stops in the dip; a minimum inside the dip stops as soon as it is reached;
    # one past the dip finds the better epoch and then stops at the minimum, not before
    assert stopped_at == {0: 3, 4: 4, 9: 9}


def test_negative_min_epochs_is_refused() -> None:
    with pytest.raises(ValueError, match="min_epochs >= 0"):
        BPRMF(**BASE, min_epochs=-1).fit(random_data().train)


def test_validation_every_other_epoch_and_patience_zero_runs_all_epochs() -> None:
    data = random_data()
    model = built(data, epochs=6, patience=0, eval_every=2)
    calls = []
    history = Trainer(model.config, validator=lambda m, d: calls.append(1) or -float(len(calls))).fit(model, data)
    assert len(history) == 6 and len(calls) == 3
    assert [e["valid_ndcg"] for e in history] == [None, -1.0, None, -2.0, None, -3.0]


def test_real_validation_ndcg_early_stopping_improves_over_first_epoch() -> None:
    data = random_data()
    model = BPRMF(**BASE, epochs=8, patience=3).fit(data)
    best = max(e["valid_ndcg"] for e in model.history)
    assert best >= model.history[0]["valid_ndcg"]
    from acfrec.eval.evaluate import validation_ndcg

    restored = validation_ndcg(model, data.train, data.valid_items, k=10)
    assert restored == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("name", ["bpr-mf", "fism", "svdpp"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, name: str) -> None:
    data = random_data()
    options = {**BASE, "patience": 0, "optimizer": "adam"}
    straight = get_model(name)(**options, epochs=4).fit(data)

    get_model(name)(**options, epochs=2, checkpoint_dir=str(tmp_path)).fit(data)
    assert (tmp_path / "last.pt").is_file()
    resumed = get_model(name)(**options, epochs=4, checkpoint_dir=str(tmp_path)).fit(data)

    assert [e["epoch"] for e in resumed.history] == [1, 2, 3, 4]
    assert [e["loss"] for e in resumed.history] == [e["loss"] for e in straight.history]
    assert [e["valid_ndcg"] for e in resumed.history] == [e["valid_ndcg"] for e in straight.history]
    for key, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[key], value), key
    assert not list(tmp_path.glob("*.tmp"))  # temp files renamed or removed


def test_finished_checkpoint_is_not_trained_further(tmp_path) -> None:
    data = random_data()
    first = BPRMF(**BASE, epochs=2, checkpoint_dir=str(tmp_path)).fit(data)
    again = BPRMF(**BASE, epochs=2, checkpoint_dir=str(tmp_path)).fit(data)
    assert again.history == first.history
    for key, value in first.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[key], value)


def test_checkpoint_of_another_run_is_refused(tmp_path) -> None:
    data = random_data()
    BPRMF(**BASE, epochs=1, checkpoint_dir=str(tmp_path)).fit(data)
    with pytest.raises(ArtifactError, match=r"differs in: config\.lr"):
        BPRMF(**BASE, epochs=2, lr=0.1, checkpoint_dir=str(tmp_path)).fit(data)
    with pytest.raises(ArtifactError, match="differs in: data"):
        BPRMF(**BASE, epochs=2, checkpoint_dir=str(tmp_path)).fit(random_data(seed=1))
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="cannot resume"):
        BPRMF(**BASE, epochs=2, checkpoint_dir=str(tmp_path)).fit(data)


def test_nan_loss_names_the_epoch() -> None:
    data = random_data()
    model = BPRMF(**BASE, epochs=3, lr=1e30, init_std=1e30)
    with pytest.raises(FloatingPointError, match="epoch 1"):
        model.fit(data.train)


def test_adagrad_and_bad_optimizer() -> None:
    data = random_data()
    model = BPRMF(**BASE, epochs=2, optimizer="adagrad", lr=0.1).fit(data.train)
    assert model.history[-1]["loss"] < model.history[0]["loss"]
    with pytest.raises(ValueError, match="optimizer must be one of"):
        BPRMF(**BASE, optimizer="sgd").fit(data.train)


def test_weight_decay_shrinks_embeddings() -> None:
    data = random_data()
    plain = BPRMF(**BASE, epochs=5, lr=0.05, weight_decay=0.0).fit(data.train)
    decayed = BPRMF(**BASE, epochs=5, lr=0.05, weight_decay=0.5).fit(data.train)
    assert decayed.module.user.weight.norm() < 0.5 * plain.module.user.weight.norm()


def test_weight_average_spans_the_raw_run_and_the_start() -> None:
    """A half-life far below one step keeps the last step's weights (the unaveraged run); one far
    above the run keeps the starting weights; one epoch lands between them."""
    data = random_data()
    options = {**BASE, "epochs": 4, "patience": 0, "lr": 0.05}
    raw = weights(BPRMF(**options).fit(data))
    start = weights(BPRMF(**{**options, "epochs": 0}).fit(data))
    instant = weights(BPRMF(**options, average_half_life=1e-9).fit(data))
    frozen = weights(BPRMF(**options, average_half_life=1e9).fit(data))
    averaged = weights(BPRMF(**options, average_half_life=1.0).fit(data))
    for key in raw:
        torch.testing.assert_close(instant[key], raw[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(frozen[key], start[key], rtol=0, atol=1e-6)
    moved, travelled = (averaged["item.weight"] - start["item.weight"]).norm(), (raw["item.weight"] - start["item.weight"]).norm()
    assert 0.2 * travelled < moved < travelled and not torch.equal(averaged["item.weight"], raw["item.weight"])


def test_weight_average_is_what_validation_scores_and_the_model_keeps() -> None:
    data = random_data()
    model = built(data, epochs=5, patience=0, lr=0.05, average_half_life=1.0)
    validated = []
    history = Trainer(model.config, validator=lambda m, d: validated.append(weights(m)) or float(len(validated) == 3)).fit(
        model, data
    )
    assert [e["valid_ndcg"] for e in history] == [0.0, 0.0, 1.0, 0.0, 0.0]
    for key, value in weights(model).items():  # the best-scored state is the average seen at epoch 3
        assert torch.equal(value, validated[2][key]), key
    trained_on = BPRMF(**{**BASE, "epochs": 5, "patience": 0, "lr": 0.05}).fit(data.train)
    assert not torch.equal(validated[-1]["item.weight"], weights(trained_on)["item.weight"])


@pytest.mark.parametrize("name", ["bpr-mf", "acf"])
def test_interrupted_averaged_run_resumes_to_identical_weights(tmp_path, name: str) -> None:
    data = random_data()
    options = {**BASE, "patience": 0, "average_half_life": 0.5}
    straight = get_model(name)(**options, epochs=4).fit(data)
    get_model(name)(**options, epochs=2, checkpoint_dir=str(tmp_path)).fit(data)
    resumed = get_model(name)(**options, epochs=4, checkpoint_dir=str(tmp_path)).fit(data)
    assert [e["valid_ndcg"] for e in resumed.history] == [e["valid_ndcg"] for e in straight.history]
    for key, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[key], value), key


@pytest.mark.parametrize("half_life", [-1.0, float("nan")])
def test_bad_average_half_life_is_refused(half_life: float) -> None:
    with pytest.raises(ValueError, match="average_half_life must be >= 0"):
        BPRMF(**BASE, average_half_life=half_life).fit(random_data().train)
