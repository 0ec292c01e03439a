"""Every command that tests/test_docs_commands.py lists in RUN, run as the docs write it
(text taken from README.md and docs/*.md) in a fresh copy of the repository on a tiny
embedded default, with no MLFLOW_TRACKING_URI or PREFECT_API_URL of the test's own.
The substitutions: a free port for 5000/5001, a real ASIN for B0XXXXXXX, and the input
files a user writes (histories.jsonl, new_meta.jsonl.gz) written first."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, TINY_OVERRIDES, write_params
from tests.test_docs_commands import RUN, Command, commands

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    dst = tmp_path_factory.mktemp("docs") / "rrec"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    write_params(dst, {**TINY_OVERRIDES, "train.max_steps": 4, "train.eval_every": 2,
                       "train.recpo.max_steps": 4, "train.recpo.item_warmup_steps": 2})
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "PREFECT_HOME": str(dst / ".prefect-home"), "PYTHONPATH": str(dst), "OMP_NUM_THREADS": "1"}
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "VIRTUAL_ENV"):
        env.pop(var, None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dst, env=env, check=True, capture_output=True)
    return dst, env


def _documented() -> list[Command]:
    """The RUN commands as the docs write them, in RUN's order (first occurrence each)."""
    found = {}
    for c in commands():
        for prefix in RUN:
            if c.text.startswith(prefix):
                found.setdefault(prefix, c)
    missing = [p for p in RUN if p not in found]
    assert not missing, f"RUN lists commands the docs no longer show: {missing}"
    return [found[p] for p in RUN]


def _sh(text: str, root: Path, env: dict[str, str], timeout: int = 1800) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", "-c", text], cwd=root, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"`{text}` exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-5000:] if proc.stderr else "exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"{url} did not answer in {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_every_documented_command_runs_as_written(clone: tuple[Path, dict[str, str]]) -> None:
    root, env = clone
    ports = {"5000": str(_free_port()), "5001": str(_free_port())}
    servers: dict[str, subprocess.Popen] = {}
    try:
        for cmd in _documented():
            text = cmd.text
            for doc_port, port in ports.items():
                text = text.replace(f"-p {doc_port}", f"-p {port}").replace(f"--port {doc_port}", f"--port {port}")
                text = text.replace(f"127.0.0.1:{doc_port}", f"127.0.0.1:{port}")
            if "B0XXXXXXX" in text:
                items = pq.read_table(root / "data" / "processed" / "items.parquet").to_pylist()
                text = text.replace("B0XXXXXXX", items[3]["parent_asin"])
            if "histories.jsonl" in text:
                (root / "histories.jsonl").write_text('[12, 40, 7]\n{"history": [3, 9], "k": 5}\n')
            if "new_meta.jsonl.gz" in text:
                with gzip.open(root / "new_meta.jsonl.gz", "wt") as f:
                    f.write(json.dumps({"parent_asin": "BNEW000001", "title": "A New Game",
                                        "price": 19.99, "main_category": "Video Games"}) + "\n")
            if " serve " in text or text.startswith("mlflow ui"):
                proc = subprocess.Popen(["bash", "-c", text], cwd=root, env=env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                servers[text] = proc
                port = ports["5001"] if " serve " in text else ports["5000"]
                _wait_for(f"http://127.0.0.1:{port}/health", proc)
                continue
            out = _sh(text, root, env)
            if text.startswith("curl"):
                answer = json.loads(out.stdout)
                assert len(answer["predictions"]) == 1 and answer["predictions"][0]["items"], answer
            if text.startswith("rrec recommend") and "--json" not in text:
                assert "== request 0: history, oldest first" in out.stdout and "Loading weights" not in out.stderr
            if text == "dvc plots show":
                assert (root / "dvc_plots" / "index.html").exists()
            if text == "cat reports/comparison.md":
                assert "| recpo |" in out.stdout
        ui = next(t for t in servers if t.startswith("mlflow ui"))
        with urllib.request.urlopen(
            f"http://127.0.0.1:{ports['5000']}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=rrec",
            timeout=30,
        ) as answer:
            tags = {t["key"]: t["value"] for t in json.load(answer)["experiment"]["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development", ui
        assert not (root / "mlflow.db").exists(), "a documented command used MLflow's default store"
    finally:
        for proc in servers.values():
            _stop(proc)
