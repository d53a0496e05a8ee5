"""The one training loop for every torch model.

:class:`Trainer` drives a :class:`~acfrec.models.base.TorchRecommender` through BPR epochs:
seeded sampling, the optimiser, early stopping on validation NDCG@k (full ranking, training
items excluded), restore of the best epoch's weights, and resumable per-epoch checkpoints.

Regularisation: ``config.weight_decay`` is *not* given to the optimiser. It is the L2 coefficient
each model applies inside ``_loss`` to the embeddings a batch actually uses (the usual BPR
regulariser), so rarely sampled items are not shrunk at every step the way optimiser weight decay
would shrink them.

Several processes (torchrun, see :mod:`acfrec.train.distributed`) train one model with
DistributedDataParallel: each rank trains on its shard of the triples, rank 0 validates and
checkpoints. A single process runs exactly the single-process loop.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm.auto import tqdm

from acfrec.data.sampler import BPRSampler
from acfrec.errors import ArtifactError
from acfrec.train.distributed import LossFunction, Replicas, current_replicas
from acfrec.utils import fingerprint_arrays

if TYPE_CHECKING:
    from acfrec.models.base import TorchConfig, TorchRecommender, TrainData

Callback = Callable[[int, dict], None]
Validator = Callable[["TorchRecommender", "TrainData"], float]

CHECKPOINT_NAME = "last.pt"
# Options that may change between an interrupted run and its resumption without changing results.
_RESUMABLE_CHANGES = frozenset({"epochs", "progress", "checkpoint_dir", "device", "num_threads"})
_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}


def default_validator(model: TorchRecommender, data: TrainData) -> float:
    """NDCG@``eval_k`` of the validation items, full ranking with training items excluded."""
    from acfrec.eval.evaluate import validation_ndcg as full_ranking_ndcg

    assert data.valid_items is not None
    return float(full_ranking_ndcg(model, data.train, data.valid_items, k=model.config.eval_k))


@dataclasses.dataclass
class _Progress:
    """Everything that changes across epochs and must survive an interruption."""

    epoch: int = 0  # last completed epoch
    history: list[dict] = dataclasses.field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False  # early stopping fired
    average: list[torch.Tensor] | None = None  # the weight average (config.average_half_life), one per parameter


class Trainer:
    """Trains a torch recommender on BPR triples.

    Args:
        config: the model's :class:`~acfrec.models.base.TorchConfig`.
        callbacks: each called as ``callback(epoch, entry)`` after every epoch, where ``entry`` is
            the epoch's history dict (on rank 0 only when several processes train).
        validator: ``validator(model, data) -> float`` (higher is better) used for early
            stopping; defaults to validation NDCG@``config.eval_k``. Only called when
            ``data.valid_items`` is given (on rank 0 only when several processes train).
    """

    def __init__(
        self, config: TorchConfig, callbacks: Iterable[Callback] = (), validator: Validator | None = None
    ) -> None:
        if config.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {config.optimizer!r}")
        if (
            config.epochs < 0 or config.batch_size < 1 or config.n_negatives < 1 or config.eval_every < 1
            or config.min_epochs < 0
        ):
            raise ValueError(
                "need epochs >= 0, batch_size >= 1, n_negatives >= 1, eval_every >= 1 and min_epochs >= 0; got "
                f"epochs={config.epochs}, batch_size={config.batch_size}, "
                f"n_negatives={config.n_negatives}, eval_every={config.eval_every}, min_epochs={config.min_epochs}"
            )
        if not config.average_half_life >= 0:  # NaN too
            raise ValueError(f"average_half_life must be >= 0 (in epochs; 0 is off), got {config.average_half_life}")
        self.config = config
        self.callbacks = list(callbacks)
        self.validator = validator or default_validator

    def fit(self, model: TorchRecommender, data: TrainData) -> list[dict]:
        """Train ``model.module`` in place; return the per-epoch history.

        History entries: ``{epoch, loss, valid_ndcg, seconds, pairs_per_second}`` where
        ``valid_ndcg`` is None on epochs without validation. A model that ``starts_trained``
        (pre-trained) is validated before training too, as epoch 0 (``loss`` None), and kept
        when no epoch beats it. With validation, training stops after ``patience`` evaluations
        without improvement (``patience <= 0``: never), but not before epoch ``min_epochs``, and
        the best evaluated epoch's weights are restored. With ``checkpoint_dir`` set, a run
        resumes from ``checkpoint_dir/last.pt`` and ends exactly where an uninterrupted run would.
        Under several processes every rank returns the same history and ends with the same weights.
        """
        config = self.config
        module = model.module
        if module is None:
            raise RuntimeError(f"{type(model).__name__}.module is not built: Trainer.fit runs inside model.fit")
        replicas = current_replicas()
        torch.manual_seed(config.seed)
        sampler = replicas.sampler(data.train, config.batch_size, config.n_negatives, config.seed)
        optimizer = _OPTIMIZERS[config.optimizer](module.parameters(), lr=config.lr)
        checkpoint = None if config.checkpoint_dir is None else Path(config.checkpoint_dir) / CHECKPOINT_NAME
        identity = _run_identity(model, data, replicas.world_size)
        progress = _Progress()
        validate = data.valid_items is not None and bool((np.asarray(data.valid_items) >= 0).any())
        if checkpoint is not None:
            progress = _resume(checkpoint, identity, module, optimizer, sampler, replicas) or progress
        loss_function = replicas.loss_function(model, sampler)
        average = _WeightAverage.start(module, config.average_half_life, len(sampler), progress)
        if validate and progress.epoch == 0 and model.starts_trained:
            # A pre-trained start is a candidate too: if training on only lowers the validation
            # score, the start is kept (recorded as epoch 0 with no loss).
            entry = {"epoch": 0, "loss": None, "valid_ndcg": None, "seconds": 0.0, "pairs_per_second": 0.0}
            self._validate(model, data, progress, entry, replicas, average)
            progress.history.append(entry)

        while progress.epoch < config.epochs and not progress.stopped:
            epoch = progress.epoch + 1
            entry = self._train_epoch(model, sampler, optimizer, epoch, loss_function, replicas, average)
            if validate and epoch % config.eval_every == 0:
                self._validate(model, data, progress, entry, replicas, average)
            progress.epoch = epoch
            progress.history.append(entry)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, identity, progress, module, optimizer, sampler, replicas)
            for callback in self.callbacks if replicas.is_main else ():
                callback(epoch, entry)

        if progress.best_state is not None:
            module.load_state_dict(progress.best_state)
        elif average is not None:  # no validation: the average of the last epochs is the model
            average.load_into(module)
        module.eval()
        replicas.barrier()
        return progress.history

    def _validate(
        self,
        model: TorchRecommender,
        data: TrainData,
        progress: _Progress,
        entry: dict[str, Any],
        replicas: Replicas,
        average: _WeightAverage | None,
    ) -> None:
        """Score ``model`` (its weight average, when kept) on validation into ``entry`` (its
        seconds included) and track the best state."""
        assert model.module is not None
        start = time.perf_counter()
        model.module.eval()
        with contextlib.nullcontext() if average is None else average.swapped_in(model.module):
            entry["valid_ndcg"] = replicas.from_main(lambda: self.validator(model, data))
            _track_best(progress, model.module, entry["epoch"], entry["valid_ndcg"], self.config)
        entry["seconds"] += time.perf_counter() - start

    def _train_epoch(
        self,
        model: TorchRecommender,
        sampler: BPRSampler,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        loss_function: LossFunction,
        replicas: Replicas,
        average: _WeightAverage | None,
    ) -> dict[str, Any]:
        assert model.module is not None
        model.module.train()
        device = model.device
        start = time.perf_counter()
        total_loss, n_pairs = 0.0, 0
        batches = tqdm(
            sampler.epoch(), total=len(sampler), desc=f"{model.name} epoch {epoch}",
            disable=not (self.config.progress and replicas.is_main), leave=False,
        )
        for batch in batches:
            users = torch.as_tensor(batch.users, device=device)
            positives = torch.as_tensor(batch.positives, device=device)
            negatives = torch.as_tensor(batch.negatives, device=device)
            loss = loss_function(users, positives, negatives)
            value = replicas.mean_loss(loss)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{model.name}: training loss is {value} at epoch {epoch} (after {n_pairs} pairs); "
                    f"lower lr (now {self.config.lr}) or weight_decay (now {self.config.weight_decay})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update(model.module)
            pairs = users.numel() * replicas.world_size  # every rank's step is the same size
            total_loss += value * pairs
            n_pairs += pairs
        seconds = time.perf_counter() - start
        return {
            "epoch": epoch,
            "loss": total_loss / max(n_pairs, 1),
            "valid_ndcg": None,
            "seconds": seconds,
            "pairs_per_second": n_pairs / max(seconds, 1e-9),
        }


class _WeightAverage:
    """An exponential moving average of a module's parameters, updated after every step.

    Its decay per step is set from a half-life in epochs, so the same setting means the same
    smoothing whatever the batch size. The tensors live in :class:`_Progress` (``average``), so a
    checkpoint carries them and a resumed run continues the same average.
    """

    def __init__(self, tensors: list[torch.Tensor], decay: float) -> None:
        self.tensors = tensors
        self._update = get_ema_multi_avg_fn(decay)

    @classmethod
    def start(
        cls, module: torch.nn.Module, half_life_epochs: float, steps_per_epoch: int, progress: _Progress
    ) -> _WeightAverage | None:
        """The average for this run (None when ``half_life_epochs`` is 0), kept in ``progress``.

        A fresh run starts it at the current weights (a pre-trained start included); a resumed
        run continues the checkpoint's.
        """
        if half_life_epochs == 0:
            return None
        parameters = list(module.parameters())
        if progress.average is None:
            progress.average = [parameter.detach().clone() for parameter in parameters]
        else:  # a checkpoint is read onto the CPU
            progress.average = [averaged.to(p.device) for averaged, p in zip(progress.average, parameters, strict=True)]
        decay = 0.5 ** (1.0 / (half_life_epochs * max(steps_per_epoch, 1)))
        return cls(progress.average, decay)

    def update(self, module: torch.nn.Module) -> None:
        self._update(self.tensors, [parameter.detach() for parameter in module.parameters()], None)

    def load_into(self, module: torch.nn.Module) -> None:
        _copy_into_parameters(module, self.tensors)

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[None]:
        """The average in ``module``'s parameters for the block; the trained weights after it."""
        trained = [parameter.detach().clone() for parameter in module.parameters()]
        self.load_into(module)
        try:
            yield
        finally:
            _copy_into_parameters(module, trained)


def _copy_into_parameters(module: torch.nn.Module, tensors: list[torch.Tensor]) -> None:
    """Overwrite ``module``'s parameters, in order, with ``tensors``."""
    with torch.no_grad():
        for parameter, values in zip(module.parameters(), tensors, strict=True):
            parameter.copy_(values)


def _track_best(progress: _Progress, module: torch.nn.Module, epoch: int, score: float, config: TorchConfig) -> None:
    if score > progress.best_score:
        progress.best_score, progress.best_epoch, progress.bad_epochs = score, epoch, 0
        progress.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return
    progress.bad_epochs += 1
    progress.stopped = 0 < config.patience <= progress.bad_epochs and epoch >= config.min_epochs


def _run_identity(model: TorchRecommender, data: TrainData, world_size: int = 1) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: model, config, training data, processes."""
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in _RESUMABLE_CHANGES}
    train = data.train
    valid = np.empty(0, dtype=np.int64) if data.valid_items is None else np.asarray(data.valid_items)
    identity = {
        "model": model.name,
        "config": config,
        "data": fingerprint_arrays(train.indptr.astype(np.int64), train.indices.astype(np.int64), valid),
    }
    if world_size > 1:  # each rank trains on its shard: another world size is another run
        identity["world_size"] = world_size
    return identity


def _save_checkpoint(
    path: Path,
    identity: dict[str, Any],
    progress: _Progress,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: BPRSampler,
    replicas: Replicas,
) -> None:
    """Write the checkpoint through a temporary file and ``os.replace``: never half-written.

    With several processes rank 0 writes it, with every rank's RNG states (in rank order).
    """
    rngs = replicas.gather((sampler.state(), torch.get_rng_state()))
    if not replicas.is_main:
        return
    sampler_rngs, torch_rngs = zip(*rngs, strict=True)
    several = replicas.world_size > 1
    payload = {
        "identity": identity,
        "progress": dataclasses.asdict(progress),
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler_rng": list(sampler_rngs) if several else sampler_rngs[0],
        "torch_rng": list(torch_rngs) if several else torch_rngs[0],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _resume(
    path: Path,
    identity: dict[str, Any],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: BPRSampler,
    replicas: Replicas,
) -> _Progress | None:
    """Load ``path`` when it exists (rank 0 reads it, every rank gets it); None when it does not."""
    payload = replicas.from_main(lambda: _read_checkpoint(path, identity))
    if payload is None:
        return None
    module.load_state_dict(payload["module"])
    optimizer.load_state_dict(payload["optimizer"])
    several = replicas.world_size > 1
    sampler.set_state(payload["sampler_rng"][replicas.rank] if several else payload["sampler_rng"])
    torch.set_rng_state(payload["torch_rng"][replicas.rank] if several else payload["torch_rng"])
    return _Progress(**copy.deepcopy(payload["progress"]))


def _read_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        saved = payload["identity"]
    except Exception as error:  # a foreign or truncated file: say which
        raise ArtifactError(f"cannot resume from checkpoint {path}: {error}") from error
    if saved != identity:
        differing = [key for key in ("model", "data", "world_size") if saved.get(key) != identity.get(key)]
        differing += [
            f"config.{key}" for key in sorted(identity["config"])
            if saved.get("config", {}).get(key) != identity["config"][key]
        ]
        raise ArtifactError(
            f"checkpoint {path} belongs to a different run (differs in: {', '.join(differing)}); "
            "delete it or choose another checkpoint_dir"
        )
    return payload
