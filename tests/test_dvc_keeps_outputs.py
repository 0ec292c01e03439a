"""Outputs DVC keeps while a stage reruns (`persist: true`): a stage that stops before it
writes anything leaves the previous ones, with the real stage definitions of dvc.yaml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from rrec.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


def _dvc(project: Path, *args: str, **env: str) -> tuple[int, str]:
    bin_dir = Path(sys.executable).parent
    environ = {k: v for k, v in os.environ.items() if k != "RREC_DEBUG"}
    environ.update(env, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run([str(bin_dir / "dvc"), *args], cwd=project, env=environ,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_evaluate_keeps_its_previous_reports_when_tracking_is_down(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(ROOT / "rrec", project / "rrec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": stages["evaluate"]}}))
    for dep in ("models/trained/contrastive", "models/trained/recpo", "data/prompts", "data/processed"):
        (project / dep).mkdir(parents=True)
        (project / dep / "stand-in").write_text("x")
    previous = {f: f"previous {f}\n" for f in (
        "reports/eval/contrastive/ranks.csv", "reports/eval/contrastive/metrics.json",
        "reports/eval/contrastive/metrics_by_k.csv", "reports/metrics/contrastive.json")}
    for f, text in previous.items():
        (project / f).parent.mkdir(parents=True, exist_ok=True)
        (project / f).write_text(text)
    assert _dvc(project, "init", "--no-scm", "-q")[0] == 0

    dead = f"http://127.0.0.1:{free_port()}"
    rc, out = _dvc(project, "repro", "--single-item", "evaluate@contrastive", MLFLOW_TRACKING_URI=dead)
    assert rc != 0
    assert f"the MLflow tracking server at {dead} (MLFLOW_TRACKING_URI) does not answer" in out, out
    assert {f: (project / f).read_text() for f in previous if (project / f).exists()} == previous


def test_a_full_repro_with_tracking_down_stops_at_its_first_stage(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(ROOT / "rrec", project / "rrec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        s: stages[s] for s in ("download", "window", "prompts")}}))
    assert _dvc(project, "init", "--no-scm", "-q")[0] == 0

    dead = f"http://127.0.0.1:{free_port()}"
    rc, out = _dvc(project, "repro", MLFLOW_TRACKING_URI=dead)
    assert rc != 0
    assert (f"error: stage download failed: TrackingUnavailable: the MLflow tracking server at "
            f"{dead} (MLFLOW_TRACKING_URI) does not answer") in out, out
    assert "Running stage 'window'" not in out
    assert not any((project / "data" / "raw").glob("*")), "the download ran"
