"""Quality floors on the real ML-100K leave-one-out split (file-order ties, seed 0).

The floors sit a little under what the tuned defaults measured (see README "Results"), far above
ItemPop (full-ranking HR@10 0.0838): a regression in a model, the sampler, the trainer or the
metric shows up here. Sampled-protocol figures are checked against the published range too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from acfrec.config import load_run_config
from acfrec.data.io import read_interactions
from acfrec.data.split import Split
from acfrec.data.splitting import leave_one_out
from acfrec.eval.evaluate import evaluate
from acfrec.models import get_model

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k" / "ml-100k.inter"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ML100K.is_file(), reason=f"ML-100K not found at {ML100K} (../shared/data)"),
]

ITEMPOP_FULL_HR10 = 0.0838
# model -> (full HR@10 floor, full NDCG@10 floor); measured with the defaults: BPR-MF 0.117/0.064,
# FISM 0.134/0.073, SVD++ 0.135/0.074.
FLOORS = {"bpr-mf": (0.105, 0.057), "fism": (0.120, 0.065), "svdpp": (0.120, 0.065)}


@pytest.fixture(scope="module")
def split() -> Split:
    return leave_one_out(read_interactions(ML100K), seed=0)


def test_itempop_matches_the_known_figure(split: Split) -> None:
    result = evaluate(get_model("itempop")().fit(split), split, ks=(10,))
    assert result.metrics["full"]["HR@10"] == pytest.approx(ITEMPOP_FULL_HR10, abs=0.002)
    # NCF-style sampled protocol: ItemPop lands in the published range for MovieLens (~0.40-0.46).
    assert 0.35 < result.metrics["sampled"]["HR@10"] < 0.50


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_tuned_model_beats_itempop_clearly(split: Split, name: str) -> None:
    model = get_model(name)(progress=False, seed=0).fit(split)
    result = evaluate(model, split, ks=(10,))
    hr_floor, ndcg_floor = FLOORS[name]
    full = result.metrics["full"]
    assert full["HR@10"] >= hr_floor, full
    assert full["NDCG@10"] >= ndcg_floor, full
    assert full["HR@10"] > 1.25 * ITEMPOP_FULL_HR10
    # The published sampled-99 figures on ML-1M for these models are HR@10 0.66-0.68; ML-100K lands
    # in a similar range. Far below would mean a bug in the model, the sampler or the metric.
    assert result.metrics["sampled"]["HR@10"] > 0.55, result.metrics["sampled"]


def test_acf_of_the_packaged_config_starts_from_its_fism_and_does_not_fall_below_it(split: Split) -> None:
    """The acceptance "ACF without content is at least as good as FISM": in the ml100k config
    ACF's FISM stage is the config's FISM baseline (same batch size, whole histories), and the
    start is kept unless an ACF epoch validates higher. Seed 0 measured (README): no ACF epoch
    does, so ACF is that FISM exactly (full HR@10 / NDCG@10 0.1347 / 0.0732); ~3 minutes."""
    params = {spec.name: spec.params for spec in load_run_config("ml100k").models}
    fism = get_model("fism")(**{**params["fism"], "progress": False, "seed": 0}).fit(split)
    acf = get_model("acf")(**{**params["acf"], "progress": False, "seed": 0}).fit(split)
    start = acf.history[0]
    assert start["epoch"] == 0 and start["valid_ndcg"] == pytest.approx(max(e["valid_ndcg"] for e in fism.history), abs=1e-6)
    scores = {name: evaluate(model, split, protocols=("full",), ks=(10,)).metrics["full"] for name, model in (("fism", fism), ("acf", acf))}
    assert scores["acf"]["NDCG@10"] >= scores["fism"]["NDCG@10"] - 1e-9, scores
