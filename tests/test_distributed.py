"""Multi-process training (DistributedDataParallel, gloo): two real processes on planted data.

One launch of two spawned processes does all the multi-process work, as ranks 0 and 1:

1. ``acfrec train --model fism`` through the CLI, joining the group from the environment
   variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): the same
   path as ``torchrun --nproc_per_node 2 -m acfrec.cli train``, without torchrun's agent process;
2. in a second group (file rendezvous): every torch model, the same FISM run again, and a
   checkpointed run resumed; each rank saves its weights and history for the assertions.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from acfrec.cli import main as cli_main
from acfrec.data.sampler import BPRSampler
from acfrec.data.split import Split
from acfrec.errors import ArtifactError
from acfrec.eval.evaluate import evaluate
from acfrec.models import Recommender, get_model
from acfrec.models.base import TrainData
from acfrec.train.distributed import (
    LossModule,
    ShardedBPRSampler,
    current_replicas,
    probe_batch,
    unused_parameters,
)

WORLD_SIZE = 2
FISM = {"dim": 16, "epochs": 6, "lr": 0.01, "patience": 0, "seed": 3}
# Every torch model, as worker name -> (registered model, options); ACF without item attention
# also covers parameters outside the loss.
WORKER_MODELS = {
    "bpr-mf": ("bpr-mf", {"dim": 8, "epochs": 3, "lr": 0.01, "seed": 3}),
    "fism": ("fism", FISM),
    "svdpp": ("svdpp", {"dim": 8, "epochs": 2, "seed": 3}),
    "acf": ("acf", {"dim": 8, "attention_dim": 4, "epochs": 2, "seed": 3}),
    "acf-no-item-attention": ("acf", {"dim": 8, "attention_dim": 4, "epochs": 2, "seed": 3, "item_attention": False}),
    # the weight average is kept by every rank and must agree across them
    "bpr-mf-averaged": ("bpr-mf", {"dim": 8, "epochs": 3, "lr": 0.01, "seed": 3, "average_half_life": 0.5}),
}
RESUME = {"dim": 8, "lr": 0.01, "seed": 5, "patience": 0}


def _model(name: str, **options):
    """Worker model ``name`` (WORKER_MODELS) with ``options`` on top of its own."""
    registered, defaults = WORKER_MODELS[name]
    return get_model(registered)(**{**defaults, "progress": False, **options})


def _worker(rank: int, port: int, split_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    environment = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": WORLD_SIZE, "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port}
    os.environ.update({key: str(value) for key, value in environment.items()})
    overrides = [f"{key}={value}" for key, value in FISM.items()]
    status = cli_main([
        "train", "--split", split_dir, "--model", "fism", "--out", str(out_dir / "cli-fism"), "--no-track",
        "--protocols", "full", "--ks", "10", "--set", *overrides,
    ])
    assert status == 0 and not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=WORLD_SIZE)
    try:
        _train_every_model(rank, Split.load(split_dir), out_dir)
    finally:
        dist.destroy_process_group()
    if rank == 0:  # alone now: the two-rank checkpoint must refuse to resume
        try:
            _model("bpr-mf", **RESUME, epochs=5, checkpoint_dir=str(out_dir / "checkpoints")).fit(Split.load(split_dir))
        except ArtifactError as error:
            (out_dir / "single-process-resume.txt").write_text(str(error))


def _train_every_model(rank: int, split: Split, out_dir: Path) -> None:
    """Each model, then a checkpointed BPR-MF interrupted after 2 epochs and resumed to 4."""
    for name in WORKER_MODELS:
        _save(_model(name).fit(split), out_dir / f"{name}-{rank}.pt")
    checkpoints = str(out_dir / "checkpoints")
    _model("bpr-mf", **RESUME, epochs=2, checkpoint_dir=checkpoints).fit(split)
    _save(_model("bpr-mf", **RESUME, epochs=4, checkpoint_dir=checkpoints).fit(split), out_dir / f"resumed-{rank}.pt")
    _save(_model("bpr-mf", **RESUME, epochs=4).fit(split), out_dir / f"straight-{rank}.pt")


def _save(model, path: Path) -> None:
    torch.save({"state": model.module.state_dict(), "history": model.history}, path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def split_dir(small_split: Split, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("distributed") / "split"
    small_split.save(path)
    return path


@pytest.fixture(scope="module")
def worker_outputs(split_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(
        _worker, args=(_free_port(), str(split_dir), str(out)), nprocs=WORLD_SIZE, start_method="spawn", join=True
    )
    return out


def _rank_outputs(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}-{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _assert_same_state(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


@pytest.mark.parametrize("name", list(WORKER_MODELS))
def test_ranks_end_with_identical_weights_and_history(worker_outputs: Path, name: str) -> None:
    rank0, rank1 = _rank_outputs(worker_outputs, name)
    _assert_same_state(rank0["state"], rank1["state"])
    assert [e["loss"] for e in rank0["history"]] == [e["loss"] for e in rank1["history"]]
    assert [e["valid_ndcg"] for e in rank0["history"]] == [e["valid_ndcg"] for e in rank1["history"]]
    # a pre-trained start (ACF after FISM) is validated as epoch 0, before any loss
    trained = [e for e in rank0["history"] if e["epoch"] > 0]
    assert all(e["loss"] is None for e in rank0["history"] if e["epoch"] == 0) and trained
    assert all(np.isfinite(e["loss"]) and e["valid_ndcg"] is not None for e in trained)


def test_cli_under_two_ranks_saves_on_rank_zero_and_beats_itempop(worker_outputs: Path, small_split: Split) -> None:
    model_dir = worker_outputs / "cli-fism"
    model = Recommender.load(model_dir)
    record = json.loads((model_dir / "training.json").read_text())
    assert model.name == "fism" and record["split_fingerprint"] == small_split.fingerprint
    assert not list(worker_outputs.glob(".cli-fism*"))  # no half-written folder left
    fism = evaluate(model, small_split, protocols=("full",), ks=(10,)).metrics["full"]["NDCG@10"]
    itempop = get_model("itempop")().fit(small_split)
    baseline = evaluate(itempop, small_split, protocols=("full",), ks=(10,)).metrics["full"]["NDCG@10"]
    assert fism > baseline + 0.03, (fism, baseline)
    valid = [e["valid_ndcg"] for e in model.history]
    assert len(valid) == FISM["epochs"] and max(valid) > valid[0]


def test_same_seed_same_weights_in_another_process_group(worker_outputs: Path) -> None:
    """The CLI's FISM (torchrun-style group) and the same two-rank run in a second group."""
    from_cli = Recommender.load(worker_outputs / "cli-fism")
    rank0, _ = _rank_outputs(worker_outputs, "fism")
    _assert_same_state(from_cli.module.state_dict(), rank0["state"])
    assert [e["loss"] for e in from_cli.history] == [e["loss"] for e in rank0["history"]]


def test_two_rank_checkpoint_resumes_exactly_and_only_with_two_ranks(worker_outputs: Path) -> None:
    resumed, straight = _rank_outputs(worker_outputs, "resumed")[1], _rank_outputs(worker_outputs, "straight")[1]
    _assert_same_state(resumed["state"], straight["state"])
    assert [e["epoch"] for e in resumed["history"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in resumed["history"]] == [e["loss"] for e in straight["history"]]
    refusal = worker_outputs / "single-process-resume.txt"
    assert refusal.is_file() and "differs in: world_size" in refusal.read_text()


def test_shards_are_disjoint_equal_and_cover_the_epoch() -> None:
    train = sp.random(30, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    train.data[:] = 1.0
    samplers = [ShardedBPRSampler(train, 8, 2, seed=1, rank=rank, world_size=3) for rank in range(3)]
    epochs = [list(sampler.epoch()) for sampler in samplers]
    assert len({len(batches) for batches in epochs}) == 1 and len(epochs[0]) == len(samplers[0])
    assert all(batch.users.size <= 3 for batches in epochs for batch in batches)  # ceil(8 / 3)
    pairs = [(u, p) for batches in epochs for b in batches for u, p in zip(b.users, b.positives, strict=True)]
    rows, cols = train.nonzero()
    assert set(pairs) == set(zip(rows, cols, strict=True))
    assert len(pairs) - train.nnz < 3  # only the padding up to a multiple of the world size repeats
    negatives = np.concatenate([b.negatives for batches in epochs for b in batches])
    users = np.concatenate([b.users for batches in epochs for b in batches])
    assert not train[users[:, None], negatives].toarray().any()
    again = ShardedBPRSampler(train, 8, 2, seed=1, rank=1, world_size=3)
    assert all(np.array_equal(a.negatives, b.negatives) for a, b in zip(again.epoch(), epochs[1], strict=True))


def test_single_process_has_one_replica_and_unused_parameters_are_found(small_split: Split) -> None:
    assert current_replicas().world_size == 1 and current_replicas().is_main
    data = TrainData.coerce(small_split)
    batch = probe_batch(BPRSampler(data.train, 16, 1, seed=0))
    attention = ["att_user.weight", "att_target.weight", "att_history.weight", "att_history.bias", "att_out.weight"]
    for options, expected in (({}, []), ({"item_attention": False}, attention)):
        model = _model("acf", **options)
        model.seen, model.module = data.train, model._build(data)
        assert unused_parameters(LossModule(model), batch) == expected
