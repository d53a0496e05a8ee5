"""Shared fixtures: a small planted leave-one-out split that every model can fit in seconds."""

from __future__ import annotations

import pytest
import torch

from acfrec.data.interactions import Interactions
from acfrec.data.split import Split
from acfrec.data.splitting import leave_one_out
from acfrec.datasets import PlantedData, planted_interactions

# At most 20 interactions per user leaves >= 100 of the 120 items for the 99 sampled negatives.
SMALL_PLANTED = dict(
    n_users=200, n_items=120, n_classes=10, classes_per_user=2, interactions_per_user=(5, 20), seed=0
)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Test tensors are tiny: one intra-op thread beats two by a wide margin on a 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_planted() -> PlantedData:
    """~200 users x 120 items of planted interactions (about 2,500 rows)."""
    return planted_interactions(**SMALL_PLANTED)


@pytest.fixture(scope="session")
def small_split(small_planted: PlantedData) -> Split:
    """Leave-one-out split of :func:`small_planted` with 99 negatives per user (seed 0).

    Session-scoped and shared: tests must not modify it.
    """
    interactions = Interactions.from_frame(small_planted.frame, timestamp_col="timestamp", source="planted")
    return leave_one_out(interactions, seed=0, n_negatives=99)
