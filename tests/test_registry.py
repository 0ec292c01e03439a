"""The MLflow model registry helpers against a real sqlite tracking store in tmp_path."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rrec import registry


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with its tables created (slow), copied by each test."""
    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh tracking store for one test; yields the experiment id to log runs into."""
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_store, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    yield mlflow.create_experiment("rrec-test", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(None)


def adapter_run(exp_id: str, tmp_path: Path, ndcg10: float | None, tag: str) -> str:
    """A finished run with a tiny LoRA-adapter-like directory logged under `model`."""
    src = tmp_path / f"adapter-{tag}"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "tag": tag}))
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_artifacts(str(src), artifact_path="model")
        if ndcg10 is not None:
            mlflow.log_metric("test_ndcg_at_10", ndcg10)
    return run.info.run_id


def test_model_name() -> None:
    assert registry.model_name("Video_Games") == "rrec-Video_Games"


def test_no_champion_before_anything_is_registered(store: str, tmp_path: Path) -> None:
    assert registry.champion_metric("rrec-Nothing") is None
    run_id = adapter_run(store, tmp_path, 0.3, "a")
    registry.register_run_model(run_id, "model", "Cat")
    assert registry.champion_metric("rrec-Cat") is None  # registered, but no alias yet


def test_register_plain_artifacts_keeps_the_files(store: str, tmp_path: Path) -> None:
    first = registry.register_run_model(adapter_run(store, tmp_path, 0.1, "a"), "model", "Cat")
    run_b = adapter_run(store, tmp_path, 0.2, "b")
    second = registry.register_run_model(run_b, "model", "Cat")
    assert (first, second) == (1, 2)
    mv = MlflowClient().get_model_version("rrec-Cat", "2")
    assert mv.run_id == run_b
    out = Path(mlflow.artifacts.download_artifacts(mv.source, dst_path=str(tmp_path / "dl")))
    assert json.loads((out / "adapter_config.json").read_text()) == {"r": 8, "tag": "b"}


def test_registering_a_run_again_returns_its_version(store: str, tmp_path: Path) -> None:
    run_a = adapter_run(store, tmp_path, 0.1, "a")
    assert registry.register_run_model(run_a, "model", "Cat", tags={"rrec.method": "recpo"}) == 1
    assert registry.register_run_model(run_a, "model", "Cat") == 1
    assert registry.register_run_model(adapter_run(store, tmp_path, 0.2, "b"), "model", "Cat") == 2
    assert registry.register_run_model(run_a, "model", "Other") == 1  # another category's model
    assert MlflowClient().get_model_version("rrec-Cat", "1").tags == {"rrec.method": "recpo"}


def test_register_an_mlflow_model(store: str) -> None:
    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context: object, model_input: list[str]) -> list[str]:
            return model_input

    with mlflow.start_run(experiment_id=store) as run:
        mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
    version = registry.register_run_model(run.info.run_id, "model", "Cat")
    assert version == 1
    loaded = mlflow.pyfunc.load_model("models:/rrec-Cat/1")
    assert loaded.predict(["x", "y"]) == ["x", "y"]


def test_register_without_a_model_fails(store: str) -> None:
    with mlflow.start_run(experiment_id=store) as run:
        mlflow.log_metric("test_ndcg_at_10", 0.5)
    with pytest.raises(MlflowException, match=run.info.run_id):
        registry.register_run_model(run.info.run_id, "model", "Cat")


def test_promotion_follows_the_metric(store: str, tmp_path: Path) -> None:
    name = "rrec-Cat"
    client = MlflowClient()

    def new_version(ndcg: float | None, tag: str) -> int:
        return registry.register_run_model(adapter_run(store, tmp_path, ndcg, tag), "model", "Cat")

    v1 = new_version(0.10, "v1")
    assert registry.promote_if_better(name, v1) is True  # no champion yet
    assert registry.champion_metric(name) == pytest.approx(0.10)

    v2 = new_version(0.25, "v2")
    assert registry.promote_if_better(name, v2) is True
    aliases = client.get_registered_model(name).aliases
    assert aliases == {"champion": v2, "challenger": v2}
    assert client.get_model_version(name, str(v1)).tags[registry.REPLACED_BY_TAG] == str(v2)
    assert registry.REPLACED_AT_TAG in client.get_model_version(name, str(v1)).tags

    v3 = new_version(0.20, "v3")
    assert registry.promote_if_better(name, v3) is False
    assert client.get_registered_model(name).aliases == {"champion": v2, "challenger": v3}
    assert registry.REPLACED_BY_TAG not in client.get_model_version(name, str(v2)).tags

    v4 = new_version(0.25, "v4")  # a tie is not an improvement
    assert registry.promote_if_better(name, v4) is False
    assert registry.champion_metric(name) == pytest.approx(0.25)
    assert client.get_registered_model(name).aliases["champion"] == v2

    assert registry.promote_if_better(name, v2) is False  # already the champion

    v5 = new_version(None, "v5")
    with pytest.raises(ValueError, match="test_ndcg_at_10"):
        registry.promote_if_better(name, v5)
    assert client.get_registered_model(name).aliases["champion"] == v2


def test_set_alias_and_other_metric(store: str, tmp_path: Path) -> None:
    run_id = adapter_run(store, tmp_path, 0.4, "a")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("test_hit_at_10", 0.7)
    version = registry.register_run_model(run_id, "model", "Cat")
    registry.set_alias("rrec-Cat", "champion", version)
    assert registry.champion_metric("rrec-Cat", metric="test_hit_at_10") == pytest.approx(0.7)
    assert registry.champion_metric("rrec-Cat", metric="valid_ndcg_at_10") is None


def test_an_unreachable_tracking_server_stops_a_stage_at_once_with_the_fix(tmp_path, monkeypatch):
    """Issue 14 item 10: a tracking server that is down is named (MLFLOW_TRACKING_URI)
    within seconds, before a stage computes anything."""
    import socket
    import time

    from rrec import tracking
    from rrec.config import parse_params
    from rrec.paths import Paths
    from rrec.reachability import TrackingUnavailable
    from rrec.stages.evaluate import evaluate_stage

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="MLFLOW_TRACKING_URI") as err:
        tracking.require_reachable(tmp_path)
    assert f"127.0.0.1:{port}" in str(err.value) and time.monotonic() - started < 10
    # the stages that log check before loading anything (nothing exists here)
    from rrec.stages.baselines import run_baselines_stage
    from rrec.train.run import run_train

    for stage in (lambda p, paths: evaluate_stage(p, paths, "contrastive"), run_baselines_stage,
                  lambda p, paths: run_train(p, paths, "recpo")):
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable):
            stage(parse_params({}), Paths(tmp_path))
        assert time.monotonic() - started < 10


def test_a_tracking_server_failing_mid_stage_fails_in_seconds(tmp_path, monkeypatch) -> None:
    """The server answered the stage's start check, then fails every call (HTTP 503):
    the next MLflow call gives up after `tracking.HTTP_RETRIES` retries, in seconds
    (MLflow's default, 7 retries with exponential back-off, takes minutes)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rrec import tracking

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            ok = self.path.startswith("/health")
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"no")

        do_GET = do_POST = _answer  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
        tracking.configure(tmp_path)
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - MLflow's own error, whatever its type
            tracking.ensure_experiment("rrec", tmp_path)
        assert time.monotonic() - started < 30
    finally:
        server.shutdown()
        server.server_close()
