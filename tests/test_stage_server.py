"""The stage server (flows/stage_server.py): stages forked from it behave like stages
run in their own process (exit status, outputs, errors), and a stage whose environment
differs from the server's runs on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.stage_server import ENV_SOCKET, stage_server
from tests.conftest import ROOT, TINY_OVERRIDES, write_params

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the stage server forks and passes fds (Linux)")


def _flows_run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("forked")
    write_params(root, TINY_OVERRIDES)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "RREC_STAGE_SERVER_DEBUG": "1",
    }
    with stage_server(env, ROOT) as served_env:
        socket_path = Path(served_env[ENV_SOCKET])
        deadline = time.monotonic() + 300
        while not socket_path.exists():  # it listens once its imports are done
            assert time.monotonic() < deadline, "the stage server never listened"
            time.sleep(0.5)
        yield root, served_env


def test_a_forked_stage_writes_its_outputs_and_exits_0(served) -> None:
    root, env = served
    out = _flows_run(["download", "--root", str(root)], env, ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage server: running in forked process" in out.stderr
    assert "rrec-stage-compute download" in out.stdout + out.stderr
    assert sorted(p.name for p in (root / "data" / "raw").iterdir()) == [
        "Video_Games.csv.gz", "Video_Games.jsonl.gz", "meta_Video_Games.jsonl.gz",
    ]


def test_a_forked_stage_passes_its_errors_and_exit_status_back(served) -> None:
    root, env = served
    # an interactive shell's prompt differs from the server's: no reason not to fork
    out = _flows_run(["no_such_stage", "--root", str(root)], {**env, "PS1": "rrec$ "}, ROOT)
    assert out.returncode == 2
    assert "stage server: running in forked process" in out.stderr
    assert "unknown stage 'no_such_stage'" in out.stderr
    bad = root / "bad.yaml"
    bad.write_text("data: {source: nowhere}\n")
    out = _flows_run(["window", "--root", str(root), "--params", "bad.yaml"], env, ROOT)
    assert out.returncode == 2 and "data.source" in out.stderr, out.stderr[-3000:]


def test_a_stage_with_another_environment_runs_on_its_own(served) -> None:
    root, env = served
    out = _flows_run(["no_such_stage", "--root", str(root)], {**env, "RREC_SOMETHING_ELSE": "1"}, ROOT)
    assert "stage server declined" in out.stderr and "RREC_SOMETHING_ELSE" in out.stderr
    assert "running in forked process" not in out.stderr
    assert out.returncode == 2 and "unknown stage 'no_such_stage'" in out.stderr
