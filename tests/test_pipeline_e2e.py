"""`dvc repro` end to end on a tiny version of the embedded default, in a fresh copy of
the repository: every stage runs (through Prefect), a second repro does nothing, a
param change re-runs only the stages that depend on it, and a failing stage leaves
nothing DVC would take for done."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY_OVERRIDES, write_params

pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory):
    """A copy of the tracked and untracked-but-not-ignored files, as a fresh git repo."""
    dst = tmp_path_factory.mktemp("clone")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    write_params(dst, {**TINY_OVERRIDES, "train.max_steps": 4, "train.eval_every": 2})
    env = {
        **os.environ,
        "PREFECT_HOME": str(dst / ".prefect-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow' / 'mlflow.db'}",
        "PYTHONPATH": str(dst),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PREFECT_API_URL", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "clone"]):
        _sh(cmd, dst, env)
    yield dst, env


def test_repro_runs_every_stage_then_nothing(clone):
    root, env = clone
    dvc = [sys.executable, "-m", "dvc"]
    first = _sh([*dvc, "repro"], root, env)
    ran = _ran(first.stdout)
    assert ran[:5] == ["download", "window", "prompts", "backbone", "items"]
    assert set(ran) == {
        "download", "window", "prompts", "backbone", "items", "train@contrastive", "train@recpo",
        "evaluate@contrastive", "evaluate@recpo", "baselines", "report",
    }
    assert (root / "dvc.lock").exists()
    for method in ("contrastive", "recpo"):
        m = json.loads((root / "reports" / "eval" / method / "metrics.json").read_text())
        assert {"popularity", "random", method} <= set(m["methods"])
    table = (root / "reports" / "comparison.csv").read_text()
    for method in ("random", "popularity", "gru4rec", "caser", "sasrec", "contrastive", "recpo"):
        assert f"\n{method}," in table
    shown = _sh([*dvc, "metrics", "show", "--json"], root, env).stdout
    assert "ndcg@10" in shown

    second = _sh([*dvc, "repro"], root, env)
    assert _ran(second.stdout) == []
    assert "up to date" in second.stdout.lower()


def test_param_change_reruns_only_dependent_stages(clone):
    root, env = clone
    dvc = [sys.executable, "-m", "dvc"]
    tree = yaml.safe_load((root / "params.yaml").read_text())
    tree["baselines"]["epochs"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    out = _sh([*dvc, "repro"], root, env)
    assert _ran(out.stdout) == ["baselines", "report"]


def test_failing_stage_leaves_nothing_dvc_accepts(clone):
    root, env = clone
    dvc = [sys.executable, "-m", "dvc"]
    tree = yaml.safe_load((root / "params.yaml").read_text())
    original = tree["data"]["window"]["max_malformed_share"]
    tree["data"]["window"]["max_malformed_share"] = 0.0  # the sample has malformed lines: window fails
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    out = _sh([*dvc, "repro"], root, env, check=False)
    assert out.returncode != 0
    assert _ran(out.stdout) == ["window"]
    assert "malformed" in out.stderr + out.stdout
    assert not (root / "data" / "processed").exists()
    status = _sh([*dvc, "status", "window"], root, env).stdout
    assert "window" in status and "changed" in status  # DVC does not take it for done

    # one message naming the setting, no traceback
    assert (out.stderr + out.stdout).count("error: stage window failed") == 1
    assert "data.window.max_malformed_share" in out.stderr and "Traceback" not in out.stderr

    # back to the good value: the finished stages are not redone (DVC restores the
    # window's outputs recorded for these params from its cache, or re-runs it)
    tree["data"]["window"]["max_malformed_share"] = original
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    again = _sh([*dvc, "repro"], root, env)
    assert "download" not in _ran(again.stdout)
    assert (root / "data" / "processed" / "train.parquet").exists()
    assert "up to date" in _sh([*dvc, "status"], root, env).stdout.lower()
