"""A failing stage, run as DVC runs it (`python -m rrec.stages.STAGE`), prints one message
naming the setting and exits non-zero; the traceback only with RREC_DEBUG=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rrec.data.download import run_download
from rrec.paths import Paths

from .conftest import TINY_OVERRIDES, write_params

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def failing_window(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose window stage must stop: the sample's 'no_metadata' interactions
    are far above the allowed dropped share."""
    root = tmp_path_factory.mktemp("failing_window")
    params = write_params(root, {**TINY_OVERRIDES, "data.window.max_dropped_share": 0.0001})
    run_download(params, Paths(root))
    return root


def run_window(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("RREC_DEBUG", "PREFECT_API_URL")}
    return subprocess.run(
        [sys.executable, "-m", "rrec.stages.window", "--root", str(root)],
        cwd=REPO, env={**environ, **env}, capture_output=True, text=True, timeout=300,
    )


def test_a_failing_stage_prints_one_message_naming_the_setting(failing_window: Path) -> None:
    done = run_window(failing_window)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "stage window failed" in errors[0] and "data.window.max_dropped_share" in errors[0]
    assert "RREC_DEBUG=1" in out
    assert "Traceback" not in out and "─ Traceback" not in out
    assert "nanobind" not in out  # DuckDB's leak reports at exit
    assert "telemetry" not in out.lower()  # the Prefect server's, without internet


def test_the_traceback_comes_back_with_the_debug_switch(failing_window: Path) -> None:
    done = run_window(failing_window, RREC_DEBUG="1")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" in out and "WindowError" in out


def test_model_stages_run_with_the_params_thread_count(tmp_path: Path) -> None:
    """The thread count is part of what a model stage computes, so it comes from
    params.yaml (`threads`), not from the machine."""
    import torch

    from rrec.stages import stage_main

    write_params(tmp_path, {"threads": 3})
    seen: list[int] = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        status = stage_main("probe", lambda params, paths: seen.append(torch.get_num_threads()),
                            ["--root", str(tmp_path)], torch_threads=True)
        assert status == 0 and seen == [3]
        torch.set_num_threads(1)
        stage_main("probe", lambda params, paths: seen.append(torch.get_num_threads()), ["--root", str(tmp_path)])
        assert seen == [3, 1]  # a stage that does not compute with the model leaves torch alone
    finally:
        torch.set_num_threads(before)


def test_a_warning_is_one_line_without_the_internal_source_line(tmp_path: Path) -> None:
    import gzip
    import json

    write_params(tmp_path, {"data.category": "Toy", "data.window.end": "2023-06-30",
                            "data.window.min_items": 1})
    paths = Paths(tmp_path)
    paths.raw.mkdir(parents=True)
    t = 1672574400000  # 2023-01-01 12:00 UTC in ms
    rows = [f"u{i % 2},A{i % 3},4.0,{t + i * 86_400_000}" for i in range(10)]  # A2: no metadata
    with gzip.open(paths.rating_only_file("Toy"), "wt") as fh:
        fh.write("\n".join(["user_id,parent_asin,rating,timestamp", *rows]) + "\n")
    with gzip.open(paths.meta_file("Toy"), "wt") as fh:
        fh.write("\n".join(json.dumps({"parent_asin": a, "title": f"The Item {a}", "price": 5.0})
                           for a in ("A0", "A1")) + "\n")
    done = run_window(tmp_path)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "dropped as bad data" in line]
    assert warned == [line for line in done.stderr.splitlines() if line.startswith("warning: window: 30.0%")]
    assert len(warned) == 1, done.stderr
    assert "__init__.py" not in done.stderr and "work(params" not in done.stderr


def test_a_tracking_server_lost_during_a_stage_gets_the_tracking_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    from rrec import reachability
    from rrec.processes import free_port
    from rrec.stages import stage_main

    write_params(tmp_path, {})
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("RREC_DEBUG", raising=False)
    monkeypatch.setattr(reachability, "_REACHED", {dead})  # it answered the start-up check

    def work(params: object, paths: object) -> None:
        MlflowClient(dead).get_experiment("0")  # what a stage's logging does once the server is gone

    assert stage_main("probe", work, ["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        f"error: stage probe failed: TrackingUnavailable: the MLflow tracking server at {dead} "
        "(MLFLOW_TRACKING_URI) stopped answering during the stage (connection refused); start it, "
        "point MLFLOW_TRACKING_URI at a running one, or unset it to track into the project's own "
        "store (mlflow/), then run the stage again"
    )
    assert "API request" not in err and "HTTPConnectionPool" not in err


def test_every_stage_stops_before_its_work_when_tracking_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even a stage that logs nothing (the data stages) checks first, so that a full
    `dvc repro` stops at its first stage instead of computing up to train."""
    from rrec import reachability
    from rrec.processes import free_port
    from rrec.stages import stage_main

    write_params(tmp_path, {})
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.delenv("RREC_DEBUG", raising=False)
    monkeypatch.setattr(reachability, "_REACHED", set())
    worked: list[bool] = []

    assert stage_main("download", lambda params, paths: worked.append(True), ["--root", str(tmp_path)]) == 1
    assert worked == []
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: stage download failed: TrackingUnavailable: the MLflow tracking server at {dead} "
        "(MLFLOW_TRACKING_URI) does not answer (ConnectionError); start it, point "
        "MLFLOW_TRACKING_URI at a running one, or unset it to track into the project's own "
        "store (mlflow/)"
    )
