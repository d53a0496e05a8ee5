"""The ``acfrec`` command, run in-process through ``acfrec.cli.main`` on a tiny generated CSV."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from acfrec.cli import main
from acfrec.data.split import Split
from acfrec.datasets import PlantedData, planted_interactions
from acfrec.eval.evaluate import EvalResult
from acfrec.models import Recommender
from acfrec.tracking import sqlite_uri

FAST = ["dim=8", "epochs=2", "batch_size=256"]


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One SQLite store for the whole session (creating MLflow's tables costs seconds, a run
    # milliseconds); every test logs to an experiment of its own.
    return sqlite_uri(tmp_path_factory.getbasetemp() / "acfrec-mlflow" / "mlflow.db")


@pytest.fixture(scope="module")
def planted() -> PlantedData:
    return planted_interactions(n_users=80, n_items=150, n_classes=5, interactions_per_user=(5, 12), seed=1)


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory: pytest.TempPathFactory, planted: PlantedData) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    planted.frame.rename({"user": "user_id", "item": "item_id"}).write_csv(path)
    return path


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory, csv_path: Path) -> Path:
    out = tmp_path_factory.mktemp("split") / "split"
    assert main(["prepare", "--data", str(csv_path), "--out", str(out), "--seed", "5", "-q"]) == 0
    return out


def track(store_uri: str, experiment: str) -> list[str]:
    return ["--tracking-uri", store_uri, "--experiment", experiment]


def runs_of(store_uri: str, experiment: str) -> list:
    client = MlflowClient(store_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment} was not created"
    return client.search_runs([found.experiment_id])


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err
    return err


def test_help_runs_as_a_module_subprocess() -> None:
    out = subprocess.run([sys.executable, "-m", "acfrec", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("prepare", "train", "evaluate", "compare", "demo"):
        assert command in out.stdout
    assert "examples:" in out.stdout


def test_prepare_writes_split_and_recbole_files(
    tmp_path: Path, csv_path: Path, planted: PlantedData, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "split"
    code = main(["prepare", "--data", str(csv_path), "--out", str(out), "--tie-rule", "item_id", "--n-negatives", "20",
                 "--export-recbole", str(tmp_path / "rb"), "--name", "tiny", "--seed", "2"])
    assert code == 0
    split = Split.load(out)
    assert json.loads(capsys.readouterr().out) == split.summary()
    assert split.n_users == planted.frame["user"].n_unique()
    assert split.negatives.shape == (split.n_users, 20)
    assert (split.meta["tie_rule"], split.meta["seed"]) == ("item_id", 2)
    lines = sum(len((tmp_path / "rb" / f"tiny.{part}.inter").read_text().splitlines()) - 1
                for part in ("train", "valid", "test"))
    assert lines == planted.frame.height


def test_train_then_evaluate_are_tracked_and_agree(
    tmp_path: Path, split_dir: Path, store_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "bpr"
    code = main(["train", "--split", str(split_dir), "--model", "bpr-mf", "--set", *FAST, "patience=0",
                 "--out", str(model_dir), "--ks", "5", "10", *track(store_uri, "train"), "--seed", "4"])
    assert code == 0
    assert "HR@10" in capsys.readouterr().out
    record = json.loads((model_dir / "training.json").read_text())
    assert record["split_fingerprint"] == Split.load(split_dir).fingerprint

    client = MlflowClient(store_uri)
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["model.name"], params["model.dim"], params["model.epochs"], params["model.seed"]) == (
        "bpr-mf", "8", "2", "4")
    assert params["split.fingerprint"] == record["split_fingerprint"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [1, 2]
    for target in ("valid", "test"):
        for protocol in ("full", "sampled"):
            assert run.data.metrics[f"{target}.{protocol}.HR_at_10"] == pytest.approx(
                record["metrics"][target][protocol]["HR@10"])
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}

    code = main(["evaluate", "--split", str(split_dir), "--model-dir", str(model_dir), "--ks", "5", "10",
                 *track(store_uri, "evaluate")])
    assert code == 0
    printed = capsys.readouterr().out
    result = EvalResult.load(model_dir / "eval-test")
    assert result.metrics == record["metrics"]["test"], "a reloaded model scores exactly as it did after training"
    assert f"{result.metrics['full']['NDCG@10']:.4f}" in printed
    (evaluated,) = runs_of(store_uri, "evaluate")
    assert evaluated.data.metrics["test.sampled.NDCG_at_5"] == pytest.approx(result.metrics["sampled"]["NDCG@5"])
    assert {a.path for a in client.list_artifacts(evaluated.info.run_id)} >= {"results.csv", "eval"}


def test_evaluate_refuses_a_model_from_another_split(
    tmp_path: Path, csv_path: Path, split_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "pop"
    assert main(["train", "--split", str(split_dir), "--model", "itempop", "--out", str(model_dir), "--no-track"]) == 0
    other = tmp_path / "other-split"
    assert main(["prepare", "--data", str(csv_path), "--out", str(other), "--seed", "99", "-q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--split", str(other), "--model-dir", str(model_dir), "--no-track"]) == 2
    assert "was trained on a split with fingerprint" in one_line_error(capsys)


def test_compare_logs_parent_and_child_runs(
    tmp_path: Path, split_dir: Path, store_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    code = main(["compare", "--split", str(split_dir), "--models", "itempop", "bpr-mf", "als",
                 "--set", *FAST, "als.factors=8", "als.iterations=2", "--ks", "10", "--out", str(out),
                 *track(store_uri, "compare")])
    assert code == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "results.csv")
    assert list(table["model"]) == ["itempop", "bpr-mf", "als"]
    assert table["best"].sum() == 1
    assert "**" in printed and "p_value" in printed and "| itempop |" in printed
    assert (out / "results.md").read_text().strip() in printed

    runs = runs_of(store_uri, "compare")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"itempop", "bpr-mf", "als"}
    fingerprint = Split.load(split_dir).fingerprint
    assert parent.data.tags["split.fingerprint"] == fingerprint
    assert parent.data.tags["acfrec.best_model"] == table.loc[table["best"], "model"].item()
    client = MlflowClient(store_uri)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"config.yaml", "results.csv", "results.md"}
    for name, child in children.items():
        assert child.data.params["split.fingerprint"] == fingerprint
        expected = table.loc[table["model"] == name, "full NDCG@10"].item()
        assert child.data.metrics["test.full.NDCG_at_10"] == pytest.approx(expected)
    assert children["als"].data.params["model.factors"] == "8"
    assert [m.step for m in client.get_metric_history(children["bpr-mf"].info.run_id, "train.loss")] == [1, 2]
    assert len(client.get_metric_history(children["als"].info.run_id, "train.seconds")) == 2
    assert EvalResult.load(out / "eval" / "als").metrics["full"]["NDCG@10"] == pytest.approx(
        children["als"].data.metrics["test.full.NDCG_at_10"])


def test_compare_from_data_file_without_tracking(tmp_path: Path, csv_path: Path) -> None:
    out = tmp_path / "cmp"
    code = main(["compare", "--data", str(csv_path), "--models", "itempop", "fism", "--set", *FAST,
                 "--protocols", "sampled", "--ks", "10", "--metric", "HR@10", "--out", str(out), "--no-track", "-q"])
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert [c for c in table.columns if " " in c] == ["sampled HR@10", "sampled NDCG@10", "sampled Recall@10",
                                                       "sampled MRR"]


def test_demo_small_writes_top10_with_external_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--small", "--out", str(out), "--no-track", "--set", "*.epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert "top10.parquet" in printed and "by acf" in printed
    for model in ("itempop", "bpr-mf", "fism", "svdpp", "als", "acf"):
        assert f"| {model} |" in printed
    split = Split.load(out / "split")
    # ACF attended over the catalogue's frames; its model folder and attention picture are saved.
    model = Recommender.load(out / "model")
    assert model.name == "acf" and model.module.has_content and model.n_items == split.n_items
    assert (out / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "attention.png").stat().st_size > 5_000
    top = pl.read_parquet(out / "top10.parquet")
    assert top.columns == ["user", "rank", "item", "score"]
    assert top["user"].n_unique() == split.n_users and top.height == 10 * split.n_users
    assert top["user"].str.starts_with("u").all() and top["item"].str.starts_with("i").all()
    first = top.filter(pl.col("user") == split.users.external_ids[0])
    assert first["rank"].to_list() == list(range(10))
    assert (np.diff(first["score"].to_numpy()) <= 0).all()
    # No known interaction (train, valid or test) is recommended.
    users = split.users.to_index(top["user"].to_list())
    items = split.items.to_index(top["item"].to_list())
    assert split.train[users, items].sum() == 0
    assert not np.any(split.test_items[users] == items) and not np.any(split.valid_items[users] == items)


def test_tracked_demo_logs_the_model_and_picture_and_the_api_examples_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's promise: the demo's folder and its MLflow model both serve the API examples."""
    import mlflow

    import acfrec

    uri = sqlite_uri(tmp_path / "mlflow.db")
    out = tmp_path / "demo"
    assert main(["demo", "--small", "--out", str(out), "--tracking-uri", uri, "--set", "*.epochs=1"]) == 0
    model_uri = next(line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("model: runs:/"))
    run_id = model_uri.split("/")[1]
    logged = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
    assert {"model", "top10.parquet", "attention.png", "results.csv"} <= logged

    local = acfrec.load(out / "model")
    served = acfrec.load(model_uri, tracking_uri=uri)
    top = pl.read_parquet(out / "top10.parquet")
    user, item = top["user"][0], top["item"][0]
    rec = local.recommend(users=[user], k=10, exclude_seen=True)
    assert list(rec.columns) == ["user", "rank", "item", "score"] and len(rec) == 10
    scores = local.score(user=user, items=[item, top["item"][1]])
    pd.testing.assert_frame_equal(served.score(user=user, items=[item, top["item"][1]]), scores)
    assert local.recommend_for_history(items=[item], k=5)["item"].nunique() == 5
    why = local.explain(user=user, item=item)
    assert why["history"] and all("components" in entry for entry in why["history"])
    assert len(local.similar_items(item=item, k=3)) == 3
    mlflow.set_tracking_uri(uri)
    pairs = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"user": [user, user], "item": [item, top["item"][1]]}))
    np.testing.assert_allclose(pairs["score"].to_numpy(), scores["score"].to_numpy(), rtol=1e-5)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["prepare", "--data", "{tmp}/missing.csv", "--out", "{tmp}/s"], "interactions file not found: {tmp}/missing.csv"),
        (["train", "--split", "{split}", "--model", "nope", "--out", "{tmp}/m"], "unknown model 'nope'; available:"),
        (["train", "--split", "{split}", "--model", "fism", "--set", "dimm=3", "--out", "{tmp}/m"],
         "'dimm=3': none of the models (fism) has that option"),
        (["compare", "--split", "{split}", "--models", "fism", "--set", "fism.dimm=3"],
         "unknown key 'fism.dimm'; did you mean 'dim'?"),
        (["compare", "--split", "{split}", "--models", "fism", "--set", "eval.kz=[1]"], "unknown key 'eval.kz'"),
        (["train", "--split", "{tmp}/no-split", "--model", "fism", "--out", "{tmp}/m"], "is not a saved split"),
        (["evaluate", "--split", "{split}", "--model-dir", "{tmp}/none"], "is not a saved acfrec model"),
        (["compare", "--config", "{tmp}/nope.yaml", "--split", "{split}"], "config file not found"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(
    argv: list[str], expected: str, tmp_path: Path, split_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fill(text: str) -> str:
        return text.format(tmp=tmp_path, split=split_dir)

    assert main([fill(a) for a in argv] + ["--no-track"]) == 2
    error = one_line_error(capsys)
    assert error.startswith(f"acfrec {argv[0]}: error:")
    assert fill(expected) in error
    assert not (tmp_path / "m").exists()


ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k" / "ml-100k.inter"


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not ML100K.is_file(), reason=f"ML-100K not found at {ML100K} (../shared/data is absent)")
def test_ml100k_prepare_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    split_dir = tmp_path / "split"
    assert main(["prepare", "--data", str(ML100K), "--out", str(split_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_users"], summary["n_items"], summary["n_test"]) == (943, 1682, 943)
    assert summary["n_train"] == 100_000 - 2 * 943
    out = tmp_path / "cmp"
    assert main(["compare", "--split", str(split_dir), "--models", "itempop", "als", "--set", "als.factors=32",
                 "als.iterations=5", "--ks", "10", "--out", str(out), "--no-track", "-q"]) == 0
    table = pd.read_csv(out / "results.csv").set_index("model")
    assert table.loc["als", "full NDCG@10"] > table.loc["itempop", "full NDCG@10"] > 0.0
    assert table.loc["itempop", "p_value"] < 0.05, "943 paired users separate ALS from popularity"


def test_demo_names_a_bad_catalogue_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--small", "--out", str(tmp_path / "d"), "--no-track", "--set", "data.planted.frames=3"]
    assert main(argv) == 2
    error = one_line_error(capsys)
    assert "data.planted (generator: catalogue)" in error and "'frames'" in error


def test_demo_names_an_unknown_catalogue_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--small", "--out", str(tmp_path / "d"), "--no-track", "--set", "data.planted.preset=dense"]
    assert main(argv) == 2
    error = one_line_error(capsys)
    assert "unknown planted catalogue preset 'dense'" in error and "'legible'" in error
