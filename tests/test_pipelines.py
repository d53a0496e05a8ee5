"""Pipelines from YAML (pipelines.runner): steps in order, content-hash skipping, resume after a
failure, --force, --dry-run, the acfrec run command, MLflow, and errors that name the culprit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml

from acfrec.cli import main
from acfrec.config import ConfigError
from pipelines import PipelineError, read_topn, run_pipeline
from pipelines.runner import build_steps
from pipelines.spec import load_pipeline

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "pipelines" / "examples"
ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k" / "ml-100k.inter"


def tiny_pipeline(workdir: Path, **changes: Any) -> dict[str, Any]:
    pipeline: dict[str, Any] = {
        "name": "tiny",
        "workdir": str(workdir),
        "seed": 3,
        "tracking": {"enabled": False},
        "steps": {
            "prepare": {"data": {"planted": {"n_users": 60, "n_items": 130, "n_classes": 5,
                                             "interactions_per_user": [5, 12]}}},
            "train": {"models": ["itempop", {"name": "als", "params": {"factors": 8, "iterations": 2}}]},
            "evaluate": {"ks": [5, 10], "metric": "NDCG@10"},
            "topn": {"model": "train/als", "k": 5, "chunk_users": 25},
        },
    }
    pipeline.update(changes)
    return pipeline


def write_yaml(path: Path, pipeline: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def statuses(outcomes: list) -> dict[str, str]:
    return {o.name: o.status for o in outcomes}


@pytest.fixture
def pipeline_file(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "tiny.yaml", tiny_pipeline(tmp_path / "run"))


def test_runs_every_step_then_skips_them_all(pipeline_file: Path, tmp_path: Path):
    first = run_pipeline(pipeline_file)
    assert statuses(first) == dict.fromkeys(["prepare", "train", "evaluate", "topn"], "run")
    run = tmp_path / "run"
    assert (run / "prepare" / "meta.json").is_file()
    assert {p.name for p in (run / "train").iterdir()} == {"itempop", "als"}
    results = pl.read_csv(run / "evaluate" / "results.csv")
    assert set(results["model"]) == {"itempop", "als"}
    assert {"full NDCG@10", "sampled NDCG@10"} <= set(results.columns)
    topn = read_topn(run / "topn")
    assert topn.columns == ["user", "rank", "item", "score"]
    assert topn["user"].n_unique() == 60 and topn.height == 300
    state = json.loads((run / "pipeline-state.json").read_text())
    assert set(state["steps"]) == {"prepare", "train", "evaluate", "topn"}

    again = run_pipeline(pipeline_file)
    assert statuses(again) == dict.fromkeys(["prepare", "train", "evaluate", "topn"], "skip")
    assert all("unchanged since" in o.reason for o in again)


def test_a_change_reruns_only_what_depends_on_it(pipeline_file: Path, tmp_path: Path):
    run_pipeline(pipeline_file)
    outcomes = run_pipeline(pipeline_file, overrides=["steps.topn.k=3"])
    assert statuses(outcomes) == {"prepare": "skip", "train": "skip", "evaluate": "skip", "topn": "run"}
    assert outcomes[-1].reason == "its config changed"
    assert read_topn(tmp_path / "run" / "topn").group_by("user").len()["len"].max() == 3

    als_model = tmp_path / "run" / "train" / "itempop" / "state.pt"
    before = als_model.stat().st_mtime_ns
    changed = run_pipeline(pipeline_file, overrides=["steps.topn.k=3", "steps.train.models=[itempop, {name: als, params: {factors: 8, iterations: 3}}]"])
    assert statuses(changed) == {"prepare": "skip", "train": "run", "evaluate": "run", "topn": "run"}
    assert changed[2].reason.startswith("input models changed")
    assert als_model.stat().st_mtime_ns == before  # itempop's options did not change: kept, not retrained


def test_failure_then_rerun_resumes_at_the_failed_step(tmp_path: Path):
    broken = tiny_pipeline(tmp_path / "run")
    broken["steps"]["topn"]["model"] = "train/bpr-mf"  # never trained
    path = write_yaml(tmp_path / "tiny.yaml", broken)
    with pytest.raises(PipelineError, match=r"steps\.topn\.model: input .*train/bpr-mf does not exist"):
        run_pipeline(path)
    state = json.loads((tmp_path / "run" / "pipeline-state.json").read_text())
    assert set(state["steps"]) == {"prepare", "train", "evaluate"}
    resumed = run_pipeline(path, overrides=["steps.topn.model=train/als"])
    assert statuses(resumed) == {"prepare": "skip", "train": "skip", "evaluate": "skip", "topn": "run"}


def test_dry_run_says_why_and_writes_nothing(pipeline_file: Path, tmp_path: Path):
    planned = run_pipeline(pipeline_file, dry_run=True)
    assert statuses(planned) == dict.fromkeys(["prepare", "train", "evaluate", "topn"], "would-run")
    assert planned[0].reason == "no successful run recorded"
    assert planned[1].reason == "its input comes from prepare, which runs first"
    assert not (tmp_path / "run").exists()
    run_pipeline(pipeline_file)
    planned = run_pipeline(pipeline_file, dry_run=True, overrides=["steps.evaluate.ks=[5]"])
    assert statuses(planned) == {"prepare": "would-skip", "train": "would-skip", "evaluate": "would-run", "topn": "would-skip"}


def test_force_and_removed_outputs_rerun_a_step(pipeline_file: Path, tmp_path: Path):
    run_pipeline(pipeline_file)
    forced = run_pipeline(pipeline_file, force=["evaluate"])
    assert statuses(forced) == {"prepare": "skip", "train": "skip", "evaluate": "run", "topn": "skip"}
    assert forced[2].reason.startswith("forced (--force)")
    (tmp_path / "run" / "topn" / "manifest.json").unlink()
    outcomes = run_pipeline(pipeline_file)
    assert statuses(outcomes)["topn"] == "run"
    assert "is missing or was changed" in outcomes[-1].reason
    with pytest.raises(PipelineError, match="--force trian: no such step"):
        run_pipeline(pipeline_file, force=["trian"])


def test_acfrec_run_command(pipeline_file: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["run", str(pipeline_file), "--no-track", "-q"]) == 0
    assert main(["run", str(pipeline_file), "--dry-run", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "topn      topn      would-skip" in printed
    assert main(["run", str(pipeline_file), "--set", "steps.train.models=[nope]", "-q"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    helped = subprocess.run([sys.executable, "-m", "pipelines", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--dry-run" in helped.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stepz": {}}, r"unknown key 'stepz'; did you mean 'steps'"),
        ({"backend": "spark"}, r"backend must be one of 'local', 'ray'"),
        ({"steps": {"bake": {}}}, r"steps\.bake: unknown step type 'bake'"),
        ({"steps": {"train": {"modles": ["itempop"]}}}, r"unknown key 'steps\.train\.modles'; did you mean 'models'"),
        ({"steps": {"prepare": {"data": {"path": "no/such/ratings.csv"}}}},
         r"steps\.prepare\.data: input .*no/such/ratings\.csv does not exist"),
        ({"steps": {"train": {"models": ["itempop"], "split": "later"}, "later": {"type": "prepare", "data": {"planted": {}}}}},
         r"steps\.train\.split: 'later' refers to step 'later', which runs later"),
        ({"steps": {"prepare": {"data": {}}}}, r"steps\.prepare\.data: set `path`"),
        ({"steps": {"topn": {"model": "m", "exclude": "none"}}}, r"steps\.topn\.exclude must be one of 'all', 'train'"),
        ({"steps": {}}, r"`steps` is empty"),
    ],
)
def test_bad_pipeline_files_are_named(tmp_path: Path, change: dict[str, Any], message: str):
    pipeline = tiny_pipeline(tmp_path / "run")
    steps = change.pop("steps", None)
    pipeline.update(change)
    if steps is not None:
        pipeline["steps"] = {**pipeline["steps"], **steps} if steps else {}
        if "later" in steps:
            pipeline["steps"] = {"train": steps["train"], "later": steps["later"]}
    if "stepz" in change:
        pipeline.pop("steps")
    with pytest.raises(ConfigError, match=message):
        run_pipeline(write_yaml(tmp_path / "bad.yaml", pipeline))


def test_ray_backend_without_ray_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    from pipelines.ray_backend import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(PipelineError, match=r"backend: ray needs the Ray package.*acfrec\[distributed\]"):
        require_ray()


def test_mlflow_gets_training_evaluation_and_topn_runs(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from acfrec.tracking import sqlite_uri

    uri = sqlite_uri(tmp_path / "mlruns" / "mlflow.db")
    tracking = {"enabled": True, "uri": uri, "experiment": "pipeline-test"}
    pipeline = tiny_pipeline(tmp_path / "run", tracking=tracking)
    pipeline["steps"]["train"]["log_model"] = True
    path = write_yaml(tmp_path / "tiny.yaml", pipeline)
    run_pipeline(path)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pipeline-test").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"train itempop", "train als", "evaluate evaluate", "itempop", "als", "topn topn"} <= set(by_name)
    evaluation = by_name["evaluate evaluate"]
    assert evaluation.data.tags["acfrec.best_model"] in {"itempop", "als"}
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id)} >= {"results.csv", "results.md"}
    assert "test.full.NDCG_at_10" in by_name["als"].data.metrics
    assert by_name["topn topn"].data.metrics["rows"] == 300
    # log_model: the trained model is logged as an MLflow pyfunc model
    assert "model" in {a.path for a in client.list_artifacts(by_name["train als"].info.run_id)}


@pytest.mark.parametrize("example", ["demo.yaml", "ml100k.yaml"])
def test_examples_are_valid(example: str):
    config, specs = load_pipeline(EXAMPLES / example)
    steps = build_steps(config, specs, example)
    assert [s.type for s in steps][-1] == "topn"


@pytest.mark.shared_data
@pytest.mark.skipif(not ML100K.is_file(), reason=f"ML-100K not found at {ML100K} (../shared/data)")
def test_ml100k_example_dry_run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # the example names the data relative to the repository
    planned = run_pipeline(EXAMPLES / "ml100k.yaml", dry_run=True, overrides=["workdir=/nonexistent/ml100k"])
    assert planned[0].status == "would-run"


# ============================================================================ encode
DARN_TINY = {"layers": [8], "baseline_hidden": 8, "eval_samples": 2, "epochs": 1, "batch_size": 16, "max_steps_per_epoch": 2}


@pytest.fixture(scope="module")
def catalogue_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Digit-frame content (.npz) and the interactions of a tiny planted catalogue (.csv)."""
    from acfrec.datasets.catalogue import planted_catalogue

    catalogue = planted_catalogue(n_users=50, n_items=40, frames_per_item=(2, 3), interactions_per_user=(5, 10), seed=0)
    folder = tmp_path_factory.mktemp("catalogue")
    content, interactions = folder / "frames.npz", folder / "interactions.csv"
    np.savez(content, images=catalogue.frames, offsets=catalogue.item_offsets, item_ids=catalogue.item_ids.astype(str))
    catalogue.interactions.rename({"user": "user_id", "item": "item_id"}).write_csv(interactions)
    return content, interactions


def content_pipeline(workdir: Path, content: Path, interactions: Path) -> dict[str, Any]:
    return {
        "name": "content", "workdir": str(workdir), "seed": 0, "tracking": {"enabled": False},
        "steps": {
            "prepare": {"data": {"path": str(interactions), "n_negatives": 20}},
            "encode": {"encoder": "darn", "content": str(content), "config": DARN_TINY},
            "train": {"components": "encode", "models": [
                {"name": "acf", "params": {"dim": 8, "attention_dim": 8, "epochs": 1, "batch_size": 256, "max_components": 3}}]},
        },
    }


def test_encode_step_builds_the_store_acf_trains_on(tmp_path: Path, catalogue_files: tuple[Path, Path]):
    pytest.importorskip("acfrec.encode")
    from acfrec.data.components import ComponentStore

    path = write_yaml(tmp_path / "content.yaml", content_pipeline(tmp_path / "run", *catalogue_files))
    assert statuses(run_pipeline(path)) == {"prepare": "run", "encode": "run", "train": "run"}
    store = ComponentStore.open(tmp_path / "run" / "encode")
    assert store.n_items == 40 and store.meta["encoder"] == "darn"
    meta = json.loads((tmp_path / "run" / "train" / "acf" / "meta.json").read_text())
    assert meta["config"]["components_path"] == str(tmp_path / "run" / "encode")
    assert statuses(run_pipeline(path)) == dict.fromkeys(["prepare", "encode", "train"], "skip")
    retrained = run_pipeline(path, overrides=["steps.encode.config.epochs=2"])
    assert statuses(retrained) == {"prepare": "skip", "encode": "run", "train": "run"}
    assert [p.name for p in (tmp_path / "run").glob("encode.encoder-*")].__len__() == 1  # the old encoder is gone


# ============================================================================ Ray
@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray instance shared by the Ray tests (Ray's local_mode is gone from Ray 2.x)."""
    ray = pytest.importorskip("ray")
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            break
        except Exception as error:  # Ray gives its raylet 30 s to start, too few on an overloaded machine
            ray.shutdown()
            if attempt == 2:
                pytest.skip(f"a local Ray instance did not start on this machine: {error}")
    yield ray
    ray.shutdown()


def test_topn_on_ray_equals_local(pipeline_file: Path, tmp_path: Path, local_ray: Any):
    run_pipeline(pipeline_file)
    local = read_topn(tmp_path / "run" / "topn")
    on_ray = run_pipeline(pipeline_file, overrides=["backend=ray", "ray.shards=2"], force=["topn"])
    assert statuses(on_ray) == {"prepare": "skip", "train": "skip", "evaluate": "skip", "topn": "run"}
    assert read_topn(tmp_path / "run" / "topn").equals(local)
    assert len(json.loads((tmp_path / "run" / "topn" / "manifest.json").read_text())["parts"]) == 3
    assert statuses(run_pipeline(pipeline_file))["topn"] == "skip"  # the backend is not part of the config hash


def test_encode_on_ray_equals_local(tmp_path: Path, catalogue_files: tuple[Path, Path], local_ray: Any):
    pytest.importorskip("acfrec.encode")
    from acfrec.data.components import ComponentStore
    from acfrec.encode import encode_to_store
    from pipelines.ray_backend import encode_on_ray
    from pipelines.spec import RayConfig

    content = catalogue_files[0]
    encode_to_store("darn", content, tmp_path / "local", config=DARN_TINY, progress=False)
    encode_on_ray("darn", content, tmp_path / "ray", RayConfig(shards=3), encoder_config=DARN_TINY,
                  encoder_dir=tmp_path / "ray.encoder", progress=False)
    local, ray_store = ComponentStore.open(tmp_path / "local"), ComponentStore.open(tmp_path / "ray")
    assert list(local.items.external_ids) == list(ray_store.items.external_ids)
    np.testing.assert_array_equal(local.counts(), ray_store.counts())
    np.testing.assert_array_equal(np.asarray(local.matrix), np.asarray(ray_store.matrix))
    assert local.meta["heldout"] == ray_store.meta["heldout"]
    assert local.meta["n_heldout_items"] == ray_store.meta["n_heldout_items"]
    # The saved encoder was trained with other options: an error naming the fix, unless retrain.
    other = {**DARN_TINY, "seed": 7}
    with pytest.raises(ConfigError, match="--retrain"):
        encode_on_ray("darn", content, tmp_path / "ray2", RayConfig(shards=2), encoder_config=other,
                      encoder_dir=tmp_path / "ray.encoder", progress=False)
    encode_on_ray("darn", content, tmp_path / "ray2", RayConfig(shards=2), encoder_config=other,
                  encoder_dir=tmp_path / "ray.encoder", progress=False, retrain=True)
    assert ComponentStore.open(tmp_path / "ray2").meta["encoder_config"]["seed"] == 7


def test_add_items_step_then_topn_recommends_the_new_items(tmp_path: Path, catalogue_files: tuple[Path, Path]):
    """Items with content but no interaction yet: added to the trained ACF, then in the top-N lists."""
    pytest.importorskip("acfrec.encode")
    content, interactions = catalogue_files
    new_items = {f"i{k}" for k in range(32, 40)}
    warm_only = tmp_path / "warm.csv"
    pl.read_csv(interactions).filter(~pl.col("item_id").is_in(sorted(new_items))).write_csv(warm_only)
    pipeline = content_pipeline(tmp_path / "run", content, warm_only)
    pipeline["steps"]["train"]["models"][0]["params"].update(content_tower=True, epochs=2)
    pipeline["steps"]["add_items"] = {"model": "train/acf", "components": "encode"}
    pipeline["steps"]["topn"] = {"model": "add_items", "k": 40, "chunk_users": 20}
    path = write_yaml(tmp_path / "cold.yaml", pipeline)
    assert statuses(run_pipeline(path))["add_items"] == "run"
    lists = read_topn(tmp_path / "run" / "topn")
    assert new_items <= set(lists["item"].to_list())  # every new item is rankable and ranked
    assert lists.group_by("user").agg(pl.col("item").n_unique() == pl.len()).to_series(1).all()
    assert statuses(run_pipeline(path))["add_items"] == "skip"
