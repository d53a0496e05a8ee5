"""The MLflow pyfunc model: logged in a real tracked run, loaded back, the same numbers in-process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import acfrec
from acfrec.data.split import Split
from acfrec.errors import ArtifactError, DataValidationError
from acfrec.models import get_model

mlflow = pytest.importorskip("mlflow")

from acfrec.tracking import Tracker  # noqa: E402
from acfrec.tracking.pyfunc import log_recommender, predict_frame  # noqa: E402


@pytest.fixture(scope="module")
def logged(small_split: Split, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small BPR-MF saved, logged inside a run of a fresh SQLite store, and loaded back through MLflow."""
    root = tmp_path_factory.mktemp("pyfunc")
    model = get_model("bpr-mf")(dim=16, epochs=3, progress=False).fit(small_split)
    folder = model.save(root / "bpr-mf")
    tracker = Tracker("pyfunc-test", tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    with tracker.run("bpr-mf") as run:
        uri = log_recommender(run, folder)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.tracking_uri)
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(previous)
    return {"model": model, "folder": folder, "tracker": tracker, "uri": uri, "run_id": run.run_id, "pyfunc": loaded}


def test_log_returns_a_runs_uri_with_a_signature(logged: dict) -> None:
    assert logged["uri"] == f"runs:/{logged['run_id']}/model"
    signature = logged["pyfunc"].metadata.get_input_schema()
    assert signature.input_names() == ["user", "item", "k"]
    assert [p.name for p in logged["pyfunc"].metadata.get_params_schema().params] == ["k", "exclude_seen"]


def test_pyfunc_scores_pairs_like_the_model(logged: dict, small_split: Split) -> None:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, small_split.n_users, 50), rng.integers(0, small_split.n_items, 50)
    request = pd.DataFrame({"user": small_split.users.to_external(users), "item": small_split.items.to_external(items)})
    answer = logged["pyfunc"].predict(request)
    assert list(answer.columns) == ["user", "item", "score"]
    assert answer["item"].tolist() == request["item"].tolist()
    expected = logged["model"].score(users, items[:, None])[:, 0]
    np.testing.assert_allclose(answer["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pyfunc_top_n_like_the_model(logged: dict, small_split: Split) -> None:
    answer = logged["pyfunc"].predict(pd.DataFrame({"user": ["u3", "u8"], "k": [4, 2]}))
    assert list(answer.columns) == ["user", "rank", "item", "score"]
    assert answer["user"].tolist() == ["u3"] * 4 + ["u8"] * 2 and answer["rank"].tolist() == [0, 1, 2, 3, 0, 1]
    users = small_split.users.to_index(["u3", "u8"])
    _, scores = logged["model"].recommend(users, k=4)
    np.testing.assert_allclose(answer["score"].to_numpy(), np.concatenate([scores[0], scores[1, :2]]), rtol=1e-5)
    with_params = logged["pyfunc"].predict(pd.DataFrame({"user": ["u3"]}), params={"k": 3, "exclude_seen": False})
    _, unfiltered = logged["model"].recommend(users[:1], k=3, exclude_seen=False)
    np.testing.assert_allclose(with_params["score"].to_numpy(), unfiltered[0], rtol=1e-5)


def test_acfrec_load_takes_the_run_uri_and_the_mlflow_folder(logged: dict, tmp_path: Path) -> None:
    service = acfrec.load(logged["uri"], tracking_uri=logged["tracker"].tracking_uri)
    direct = acfrec.load(logged["folder"])
    pd.testing.assert_frame_equal(service.recommend(["u1", "u2"], k=5), direct.recommend(["u1", "u2"], k=5))
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=logged["uri"], dst_path=str(tmp_path), tracking_uri=logged["tracker"].tracking_uri
    )
    pd.testing.assert_frame_equal(acfrec.load(local).score("u1", ["i1", "i2"]), direct.score("u1", ["i1", "i2"]))
    with pytest.raises(ArtifactError, match="cannot download"):
        acfrec.load(f"runs:/{'0' * 32}/model", tracking_uri=logged["tracker"].tracking_uri)


def test_acfrec_load_takes_a_registered_model(logged: dict) -> None:
    store = logged["tracker"].tracking_uri
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)  # else the registry is MLflow's default
    client.create_registered_model("acfrec-bpr-mf")
    client.create_model_version("acfrec-bpr-mf", source=logged["uri"], run_id=logged["run_id"])
    client.set_registered_model_alias("acfrec-bpr-mf", "champion", "1")
    expected = acfrec.load(logged["folder"]).recommend("u4", k=3)
    for uri in ("models:/acfrec-bpr-mf/1", "models:/acfrec-bpr-mf@champion", "models:/acfrec-bpr-mf/latest"):
        service = acfrec.load(uri, tracking_uri=store)
        pd.testing.assert_frame_equal(service.recommend("u4", k=3), expected)


def test_only_servable_folders_are_logged(logged: dict, small_split: Split, tmp_path: Path) -> None:
    bare = get_model("itempop")().fit(small_split.train).save(tmp_path / "bare")
    with logged["tracker"].run("bare") as run, pytest.raises(ArtifactError, match="users.json, items.json missing"):
        log_recommender(run, bare)


def test_predict_names_what_is_missing(logged: dict) -> None:
    service = acfrec.load(logged["folder"])
    with pytest.raises(DataValidationError, match="'user' column"):
        predict_frame(service, pd.DataFrame({"customer": ["u1"]}))


@pytest.mark.skipif(
    os.environ.get("ACFREC_TEST_SERVE") != "1",
    reason="starts an HTTP server (20-90 s on 2 shared cores); run with ACFREC_TEST_SERVE=1",
)
@pytest.mark.skipif(shutil.which("mlflow", path=str(Path(sys.executable).parent)) is None, reason="no mlflow CLI")
def test_mlflow_models_serve(logged: dict, tmp_path: Path) -> None:
    """``mlflow models serve --env-manager local`` answers /invocations with the model's top-N."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", logged["uri"],
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    # the server runs uvicorn from the environment's bin folder
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["tracker"].tracking_uri, PATH=path)
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["user"], "data": [["u3"]]}, "params": {"k": 3}}).encode()
        answer = _post_when_up(f"http://127.0.0.1:{port}/invocations", body, server, deadline=time.monotonic() + 90)
        if answer is None:
            pytest.skip(f"mlflow models serve did not come up: {(tmp_path / 'serve.log').read_text()[-500:]}")
        rows = pd.DataFrame(answer["predictions"])
        expected = logged["pyfunc"].predict(pd.DataFrame({"user": ["u3"]}), params={"k": 3})
        assert rows["item"].tolist() == expected["item"].tolist()
        np.testing.assert_allclose(rows["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _post_when_up(url: str, body: bytes, server: subprocess.Popen, deadline: float) -> dict | None:
    while time.monotonic() < deadline and server.poll() is None:
        try:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    return None
