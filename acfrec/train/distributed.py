"""Training on several processes: torch DistributedDataParallel (gloo on CPU), launched by torchrun.

The :class:`~acfrec.train.Trainer` asks :func:`current_replicas` who it trains with. Outside a
process group (or in a group of one) that is :class:`Replicas`, whose every hook is the
single-process behaviour itself, so single-process runs are unchanged bit for bit. Inside a
group of several processes it is :class:`DistributedReplicas`:

* every rank draws a disjoint shard of each epoch's BPR triples (:class:`ShardedBPRSampler`: the
  epoch's order is shared through ``seed``, negatives are drawn from ``(seed, rank)``), with
  ``ceil(batch_size / world_size)`` triples per rank and step, so one optimiser step still sees
  about ``batch_size`` triples and the tuned learning rates carry over;
* gradients are averaged by DistributedDataParallel around :class:`LossModule`, so every rank
  takes the same optimiser step and the replicas stay identical;
* rank 0 validates (the score is broadcast, so early stopping and best-epoch restore happen on
  every rank alike), writes the checkpoints (with every rank's RNG states) and, in ``acfrec
  train``, evaluates and saves; a resumed run reads the checkpoint on rank 0 and broadcasts it,
  so only rank 0 needs the checkpoint folder.

    torchrun --nproc_per_node 2 -m acfrec.cli train --split SPLIT --model fism --out MODEL_DIR
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from acfrec.data.sampler import BPRBatch, BPRSampler, sample_negatives

if TYPE_CHECKING:
    from acfrec.models.base import TorchRecommender

log = logging.getLogger(__name__)

T = TypeVar("T")
LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# How long a rank waits in a collective (rank 0 validating or saving while the others wait).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)


class Replicas:
    """The processes training one model together; this base class is a group of one.

    Every hook here is exactly what a single process does without any group, which keeps
    single-process training unchanged.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: validates, shows progress, runs callbacks, writes checkpoints."""
        return self.rank == 0

    def sampler(self, train: sp.csr_matrix, batch_size: int, n_negatives: int, seed: int) -> BPRSampler:
        """The BPR triples this process trains on."""
        return BPRSampler(train, batch_size, n_negatives, seed=seed)

    def loss_function(self, model: TorchRecommender, sampler: BPRSampler) -> LossFunction:
        """``(users, positives, negatives) -> loss`` whose backward leaves the step's gradients."""
        return model._loss

    def mean_loss(self, loss: torch.Tensor) -> float:
        """The step's loss over every process (here: this one's)."""
        return loss.item()

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` run on rank 0 only; every rank gets its value (or raises its error)."""
        return compute()

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` in rank order on rank 0 (an empty list elsewhere)."""
        return [value]

    def barrier(self) -> None:
        """Wait until every rank gets here."""


class DistributedReplicas(Replicas):
    """The ranks of the initialised default process group (see the module doc)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def sampler(self, train: sp.csr_matrix, batch_size: int, n_negatives: int, seed: int) -> BPRSampler:
        return ShardedBPRSampler(train, batch_size, n_negatives, seed, self.rank, self.world_size)

    def loss_function(self, model: TorchRecommender, sampler: BPRSampler) -> LossFunction:
        wrapper = LossModule(model)
        unused = unused_parameters(wrapper, probe_batch(sampler))
        if unused:
            # Some configurations build parameters their loss never reaches (ACF ablations, e.g.
            # item_attention=False): without this DDP waits for their gradients forever.
            log.info("%s: parameters outside the loss (DDP find_unused_parameters): %s", model.name, unused)
        # Buffers (histories, component features) are built from the same data on every rank and
        # never change: synced once at construction, broadcasting them before each forward would
        # only cost time.
        return DistributedDataParallel(wrapper, forward_sync_buffers=False, find_unused_parameters=bool(unused))

    def mean_loss(self, loss: torch.Tensor) -> float:
        # Every rank sees the same value, so a non-finite loss stops every rank at the same step.
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total.item() / self.world_size

    def from_main(self, compute: Callable[[], T]) -> T:
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box = [("ok", compute())]
            except Exception as raised:
                error, box = raised, [("error", f"{type(raised).__name__}: {raised}")]
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if error is not None:
            raise error
        if status == "error":
            raise RuntimeError(f"rank {self.rank}: rank 0 failed: {value}")
        return value

    def gather(self, value: T) -> list[T]:
        values: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values if values is not None else []

    def barrier(self) -> None:
        dist.barrier()


def current_replicas() -> Replicas:
    """:class:`DistributedReplicas` inside an initialised group of two or more, else a group of one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedReplicas()
    return Replicas()


def launched_with_several_processes() -> bool:
    """True under ``torchrun --nproc_per_node N`` (or ``--nnodes``) with N x nodes > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def torchrun_process_group(backend: str = "gloo", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[Replicas]:
    """Join torchrun's process group for the duration of the block; a group of one otherwise.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; the group is
    joined through them (``env://``). On success every rank waits at a final barrier, so when
    any process exits, rank 0 has finished what it does after training (evaluate, save).
    A group that is already initialised is used and left as it is.
    """
    if not launched_with_several_processes() or dist.is_initialized():
        yield current_replicas()
        return
    dist.init_process_group(backend=backend, timeout=timeout)
    try:
        replicas = current_replicas()
        yield replicas
        replicas.barrier()
    finally:
        dist.destroy_process_group()


class LossModule(nn.Module):
    """``forward(users, positives, negatives) = model._loss(...)`` with ``model.module`` as submodule.

    Models compute their loss in ``_loss``, not in ``module.forward``; this puts that loss in a
    module DistributedDataParallel can wrap, so its gradient hooks cover every parameter.
    """

    def __init__(self, model: TorchRecommender) -> None:
        super().__init__()
        if model.module is None:
            raise RuntimeError(f"{type(model).__name__}.module is not built: wrap it inside model.fit")
        self.module = model.module
        self.recommender = model  # not an nn.Module: held, not registered

    def forward(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        return self.recommender._loss(users, positives, negatives)


def probe_batch(sampler: BPRSampler) -> BPRBatch:
    """The first ``batch_size`` training pairs with negatives from a throwaway generator.

    The sampler's own generators are left untouched, so probing changes no epoch.
    """
    rows = np.arange(min(sampler.users.size, sampler.batch_size))
    users, positives = sampler.users[rows], sampler.items[rows]
    negatives = sample_negatives(
        np.random.default_rng(0), users, sampler.train.shape[1], sampler.sorted_keys, sampler.n_negatives
    )
    return BPRBatch(users, positives, negatives)


def unused_parameters(wrapper: LossModule, batch: BPRBatch) -> list[str]:
    """Names of the trainable parameters the loss of ``batch`` does not depend on.

    Walks the autograd graph of one loss (no backward, no gradient written) under a forked torch
    RNG, so the probe changes nothing the training run sees.
    """
    device = next(wrapper.parameters()).device
    with torch.random.fork_rng(devices=[]):
        loss = wrapper(*(torch.as_tensor(a, device=device) for a in (batch.users, batch.positives, batch.negatives)))
    reached: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            reached.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return [name for name, p in wrapper.module.named_parameters() if p.requires_grad and id(p) not in reached]


class ShardedBPRSampler(BPRSampler):
    """This rank's disjoint share of every epoch of BPR triples.

    All ranks draw the same epoch order (from ``seed``) and take every ``world_size``-th triple
    from ``rank`` on; the order is padded by repeating its start to a multiple of ``world_size``
    so that every rank runs the same number of equal steps (DDP needs them in lockstep).
    Negatives come from this rank's own generator, seeded by ``(seed, rank)``.

    ``batch_size`` is the global step size: each rank's batches hold ``ceil(batch_size /
    world_size)`` triples.
    """

    def __init__(
        self, train: sp.csr_matrix, batch_size: int, n_negatives: int, seed: int, rank: int, world_size: int
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1={world_size - 1}, got {rank}")
        super().__init__(train, -(-batch_size // world_size), n_negatives, seed=seed)
        self.rank, self.world_size = rank, world_size
        self.negative_rng = np.random.default_rng([seed, rank])
        self.shard_size = -(-self.users.size // world_size)

    def __len__(self) -> int:
        return -(-self.shard_size // self.batch_size)

    def epoch(self) -> Iterator[BPRBatch]:
        order = np.resize(self.rng.permutation(self.users.size), self.shard_size * self.world_size)
        rows = order[self.rank :: self.world_size]
        users, positives = self.users[rows], self.items[rows]
        negatives = sample_negatives(self.negative_rng, users, self.train.shape[1], self.sorted_keys, self.n_negatives)
        for start in range(0, users.size, self.batch_size):
            stop = start + self.batch_size
            yield BPRBatch(users[start:stop], positives[start:stop], negatives[start:stop])

    def state(self) -> dict:
        return {"order": self.rng.bit_generator.state, "negatives": self.negative_rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["order"]
        self.negative_rng.bit_generator.state = state["negatives"]
