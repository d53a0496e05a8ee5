"""Scale-out on Ray: the topn step shards users, the encode step shards items, over Ray tasks.

Ray is optional (``pip install 'acfrec[distributed]'``); asking for ``backend: ray`` without it
raises a :class:`PipelineError` saying so. Tasks receive paths, not objects: every worker reads
the model and split (or content) itself and writes its own parts, so on a cluster the pipeline's
``workdir`` and inputs must be on storage every node sees under the same path (NFS, a shared
volume). Each task writes complete parts exactly as the local backend does (same chunks, same
files), and the driver verifies them and writes the manifest, so both backends give the same
output and a rerun resumes from the parts already written whichever backend wrote them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.spec import PipelineError, RayConfig
from pipelines.topn import TopnSettings, part_ranges, prepare_folder, write_manifest

log = logging.getLogger("acfrec")


def require_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise PipelineError(
            "backend: ray needs the Ray package, which is not installed: pip install 'acfrec[distributed]' "
            "(or ray[default]), or use backend: local"
        ) from error
    return ray


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[Any]:
    """Ray, initialised from ``config`` unless it already is (then it is left running)."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"address": config.address, "include_dashboard": False, "log_to_driver": False}
    if config.address is None and config.num_cpus is not None:
        kwargs["num_cpus"] = config.num_cpus
    if config.runtime_env:
        kwargs["runtime_env"] = config.runtime_env
    ray.init(**kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def shards(n_tasks: int, config: RayConfig, ray: Any) -> list[np.ndarray]:
    """``range(n_tasks)`` cut into contiguous groups, one per Ray task (empty groups dropped)."""
    count = config.shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return [group for group in np.array_split(np.arange(n_tasks), min(count, max(n_tasks, 1))) if group.size]


# --------------------------------------------------------------------------- topn
def _topn_task(model_dir: str, split_dir: str, out: str, settings: TopnSettings, key: str, parts: list[int]) -> list[int]:
    """One worker: load the model and split, write its parts (those not already complete)."""
    import torch

    from acfrec.data.split import Split
    from acfrec.models.base import Recommender
    from pipelines.topn import write_parts

    torch.set_num_threads(1)  # one task per CPU: more threads only oversubscribe
    model, split = Recommender.load(model_dir), Split.load(split_dir)
    return write_parts(model, split, Path(out), settings, key, parts, progress=False)


def topn_on_ray(
    model_dir: Path, split_dir: Path, out: Path, settings: TopnSettings, key: str, config: RayConfig, progress: bool = True
) -> dict[str, Any]:
    """:func:`pipelines.topn.write_topn` with the parts spread over Ray tasks; returns the manifest."""
    from acfrec.data.split import Split
    from acfrec.models.base import Recommender
    from pipelines.topn import finished_manifest, retrieval_kind

    settings.check()
    split, model = Split.load(split_dir), Recommender.load(model_dir)
    finished = finished_manifest(out, key)
    if finished is not None:
        return finished
    n_parts = len(part_ranges(split.n_users, settings.chunk_users))
    prepare_folder(out, n_parts)
    with ray_session(config) as ray:
        task = ray.remote(_topn_task)
        groups = shards(n_parts, config, ray)
        log.info("  top-N on Ray: %d parts in %d tasks", n_parts, len(groups))
        written = ray.get([
            task.remote(str(model_dir), str(split_dir), str(out), settings, key, group.tolist()) for group in groups
        ])
    log.info("  Ray tasks wrote %d parts (the rest were complete already)", sum(len(w) for w in written))
    return write_manifest(out, key, split, settings, retrieval_kind(model, settings))


# --------------------------------------------------------------------------- encode
def _encode_task(encoder_dir: str, corpus: Any) -> Any:
    """One worker: load the trained encoder and encode its share of the items."""
    import torch

    from encoders import Encoder

    torch.set_num_threads(1)
    return Encoder.load(encoder_dir).encode(corpus)


def encode_on_ray(
    encoder: str,
    content: Path,
    out: Path,
    config: RayConfig,
    *,
    encoder_config: dict[str, Any],
    encoder_dir: Path,
    checkpoint_dir: Path | None = None,
    tracker: Any = None,
    progress: bool = True,
    holdout: float = 0.1,
    retrain: bool = False,
) -> Path:
    """:func:`acfrec.encode.encode_to_store` with the encoding of the items sharded over Ray tasks.

    The encoder is trained (or loaded from ``encoder_dir``) once, here, on the same items as the
    local backend trains on; the workers only encode, so the store equals the local one. The
    built-in featurisers (``pca-pixels``, ``hashed-bow``) fit on the whole catalogue at once
    and run locally.
    """
    from acfrec import encode as encode_module

    if encoder in encode_module.FEATURISERS:
        log.info("  %s is a one-pass featuriser: encoding locally", encoder)
        return encode_module.encode_to_store(encoder, content, out, config=encoder_config, tracker=tracker, progress=progress)
    from acfrec.cli import _NullTracker

    corpus = encode_module.read_content(content)
    tracker = tracker if tracker is not None else _NullTracker()
    with tracker.run(f"encode {encoder}", tags={"acfrec.command": "encode", "acfrec.encoder": encoder}) as run:
        trained, figures, held_items = encode_module.trained_encoder(
            encoder, corpus, str(content), encoder_config, encoder_dir, checkpoint_dir, run, progress, holdout, retrain
        )
        with ray_session(config) as ray:
            task = ray.remote(_encode_task)
            groups = shards(corpus.n_items, config, ray)
            log.info("  encoding %d items on Ray in %d tasks", corpus.n_items, len(groups))
            pieces = ray.get([task.remote(str(encoder_dir), corpus.subset(group)) for group in groups])
        meta = {
            **encode_module.store_meta(encoder, trained, encoder_dir, str(content), figures, held_items, holdout),
            "backend": "ray",
        }
        _write_store(out, pieces, meta)
        run.log_metrics({"n_components": sum(p.matrix.shape[0] for p in pieces)})
    return out


def _write_store(out: Path, pieces: list[Any], meta: dict[str, Any]) -> None:
    """One component store from the workers' Components, in item order."""
    from acfrec.data.components import ComponentStore

    matrix = np.concatenate([piece.matrix for piece in pieces])
    counts = np.concatenate([np.diff(piece.offsets) for piece in pieces])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    item_ids = [item for piece in pieces for item in piece.item_ids]
    ComponentStore.write(out, item_ids, (matrix, offsets), meta=meta)
