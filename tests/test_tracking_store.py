"""The project's own MLflow store (`mlflow/`) in a checkout that was moved or copied."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from rrec import reachability, registry, tracking


@pytest.fixture
def own_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reachability, "_REACHED", set())
    monkeypatch.setattr(tracking, "_RELOCATED", set())
    yield
    mlflow.set_tracking_uri(None)


def _run_with_model(exp_id: str, tag: str) -> str:
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_text(tag, f"model/{tag}.txt")
    return run.info.run_id


@pytest.mark.parametrize("how", ["move", "copy"])
def test_a_moved_or_copied_checkout_writes_into_its_own_store(
    own_store: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    exp_id = tracking.ensure_experiment("rrec-test", old)
    first = _run_with_model(exp_id, "first")
    registry.register_run_model(first, "model", "Cat", root=old)

    if how == "move":
        old.rename(new)
    else:
        shutil.copytree(old, new)
        shutil.rmtree(old / "mlflow" / "artifacts")  # anything written there would show
    monkeypatch.setattr(reachability, "_REACHED", set())
    monkeypatch.setattr(tracking, "_RELOCATED", set())
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # mlflow.set_tracking_uri set it; a new process starts without

    assert tracking.ensure_experiment("rrec-test", new) == exp_id
    note = capsys.readouterr().err
    second = _run_with_model(exp_id, "second")
    version = registry.register_run_model(second, "model", "Cat", root=new)

    assert not (old / "mlflow" / "artifacts").exists()
    assert list((new / "mlflow" / "artifacts").rglob("second.txt"))
    assert mlflow.artifacts.load_text(f"runs:/{first}/model/first.txt") == "first"
    client = MlflowClient()
    for v in client.search_model_versions("name = 'rrec-Cat'"):
        assert str(old) not in (v.source or "") + (getattr(v, "storage_location", None) or "")
    assert version == 2
    for exp in client.search_experiments():
        assert str(old) not in exp.artifact_location
    assert f"its artifact locations now point into this checkout, {new}" in note
