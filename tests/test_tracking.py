"""MLflow tracking: values written by Tracker are read back with MlflowClient from a local store."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from acfrec.data.split import Split
from acfrec.errors import ArtifactError
from acfrec.tracking import Tracker, dataframe_markdown, default_tracking_uri, flatten, metric_key, sqlite_uri


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One SQLite store for the whole session (creating MLflow's tables costs seconds, a run
    # milliseconds); every test logs to an experiment of its own.
    return sqlite_uri(tmp_path_factory.getbasetemp() / "acfrec-mlflow" / "mlflow.db")


@pytest.fixture
def tracker(store_uri: str, request: pytest.FixtureRequest) -> Tracker:
    return Tracker(experiment=request.node.name, tracking_uri=store_uri)


def artifact_paths(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def test_metric_key_mapping() -> None:
    assert metric_key("test.full.HR@10") == "test.full.HR_at_10"
    assert metric_key("valid.sampled.NDCG@100") == "valid.sampled.NDCG_at_100"
    assert metric_key("train.loss") == "train.loss"
    assert metric_key("a(b)=c") == "a_b__c"


def test_flatten_nests_with_dots() -> None:
    assert flatten({"model": {"dim": 8, "opt": {"lr": 0.1}}, "seed": 0, "empty": {}}) == {
        "model.dim": 8, "model.opt.lr": 0.1, "seed": 0, "empty": {}
    }
    assert flatten({"x": 1}, prefix="p") == {"p.x": 1}


def test_default_uri_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ACFREC_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert not (tmp_path / "mlruns").exists(), "resolving the URI must not create anything"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///b.db")
    assert default_tracking_uri(tmp_path) == "sqlite:///b.db"
    monkeypatch.setenv("ACFREC_TRACKING_URI", "sqlite:///a.db")
    assert default_tracking_uri(tmp_path) == "sqlite:///a.db"
    assert Tracker(tracking_uri="sqlite:///c.db").tracking_uri == "sqlite:///c.db"


def test_run_logs_params_epoch_metrics_finals_and_artefacts(tracker: Tracker, store_uri: str) -> None:
    table = pd.DataFrame({"model": ["fism", "bpr-mf"], "full NDCG@10": [0.25, 0.125]})
    with tracker.run("fism", params={"model": {"dim": 8, "lr": 0.01}, "ks": (10, 20)}, tags={"kind": "t"}) as run:
        callback = tracker.epoch_callback()
        for epoch in (1, 2, 3):
            callback(epoch, {"epoch": epoch, "loss": 1.0 / epoch, "valid_ndcg": None if epoch == 2 else 0.1 * epoch})
        logged = tracker.log_metrics({"full": {"HR@10": 0.5, "NDCG@10": 0.25}, "note": "text"}, prefix="test")
        tracker.log_config({"data": {"seed": 3}, "eval": {"ks": [10, 20]}})
        tracker.log_table(table, "results.csv")
        tracker.log_table(table, "results.md")

    client = MlflowClient(store_uri)
    data = client.get_run(run.run_id)
    assert data.info.status == "FINISHED" and data.info.run_name == "fism"
    assert data.data.params == {
        "model.dim": "8", "model.lr": "0.01", "ks": "[10, 20]", "data.seed": "3", "eval.ks": "[10, 20]"
    }
    assert data.data.tags["kind"] == "t"
    assert logged == {"test.full.HR_at_10": 0.5, "test.full.NDCG_at_10": 0.25}
    assert data.data.metrics["test.full.HR_at_10"] == 0.5
    loss = client.get_metric_history(run.run_id, "train.loss")
    assert [(m.step, m.value) for m in loss] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    ndcg = client.get_metric_history(run.run_id, "train.valid_ndcg")
    assert [m.step for m in ndcg] == [1, 3], "None values are skipped, not logged as 0"
    assert "train.epoch" not in data.data.metrics

    assert artifact_paths(client, run.run_id) == {"config.yaml", "results.csv", "results.md"}
    folder = Path(client.download_artifacts(run.run_id, "", str(Path(store_uri[len("sqlite:///"):]).parent / "dl")))
    assert yaml.safe_load((folder / "config.yaml").read_text()) == {"data": {"seed": 3}, "eval": {"ks": [10, 20]}}
    assert pd.read_csv(folder / "results.csv").equals(table)
    assert (folder / "results.md").read_text() == dataframe_markdown(table)
    assert "| fism | 0.2500 |" in (folder / "results.md").read_text()


def test_artefacts_live_beside_the_sqlite_store(tracker: Tracker, store_uri: str) -> None:
    with tracker.run("a") as run:
        tracker.log_text("hello", "note.txt")
    artifact_uri = MlflowClient(store_uri).get_run(run.run_id).info.artifact_uri
    store_folder = Path(store_uri[len("sqlite:///"):]).parent
    assert artifact_uri.startswith((store_folder / "artifacts").as_uri())


def test_nested_runs_are_children(tracker: Tracker, store_uri: str) -> None:
    with tracker.run("parent") as parent:
        with tracker.run("child-a") as child_a:
            assert tracker.active is child_a
        with tracker.run("child-b") as child_b:
            pass
        assert tracker.active is parent
    client = MlflowClient(store_uri)
    for child in (child_a, child_b):
        assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in client.get_run(parent.run_id).data.tags


def test_failed_block_marks_the_run_failed(tracker: Tracker, store_uri: str) -> None:
    with pytest.raises(RuntimeError), tracker.run("boom") as run:
        raise RuntimeError("training diverged")
    assert MlflowClient(store_uri).get_run(run.run_id).info.status == "FAILED"
    with pytest.raises(ArtifactError, match="no MLflow run is open"):
        tracker.log_metrics({"x": 1.0})


def test_params_are_immutable_but_relogging_the_same_value_is_fine(tracker: Tracker) -> None:
    with tracker.run("p") as run:
        run.log_params({"dim": 8})
        run.log_params({"dim": 8})
        with pytest.raises(ValueError, match="param 'dim' is already logged .* as '8'; cannot change it to '16'"):
            run.log_params({"dim": 16})


def test_log_split_records_fingerprint_and_summary(tracker: Tracker, store_uri: str, small_split: Split) -> None:
    with tracker.run("split") as run:
        tracker.log_split(small_split)
    data = MlflowClient(store_uri).get_run(run.run_id).data
    summary = small_split.summary()
    assert data.tags["split.fingerprint"] == small_split.fingerprint
    assert data.params["split.fingerprint"] == small_split.fingerprint
    for key in ("n_users", "n_items", "n_train", "n_test"):
        assert data.params[f"split.{key}"] == str(summary[key])
    assert data.params["split.tie_rule"] == small_split.meta["tie_rule"]


def test_log_artifact_folder_and_missing_path(tracker: Tracker, store_uri: str, tmp_path: Path) -> None:
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"full": {"HR@10": 0.5}}))
    with tracker.run("art") as run:
        tracker.log_artifact(folder, "eval")
        with pytest.raises(ArtifactError, match="does not exist"):
            tracker.log_artifact(tmp_path / "nope.txt")
    assert [a.path for a in MlflowClient(store_uri).list_artifacts(run.run_id, "eval")] == ["eval/metrics.json"]
