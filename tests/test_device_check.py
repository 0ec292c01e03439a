"""The prepared device check (scripts/device_check.sh, scripts/device_check.py) runs its
CPU-comparable parts here, on the tiny project, so that it cannot rot: item states in
bfloat16 against the CPU float32 table, a few contrastive and RecPO steps; the
DeepSpeed and vLLM parts are reported as skipped without CUDA, never as passed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device_check.py"

PARTS = [
    "items: device vs CPU states",
    "contrastive steps",
    "recpo steps (hf rollout)",
    "recpo: accelerate + DeepSpeed ZeRO-2",
    "recpo: vLLM rollout",
]


def _module():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_device_check_runs_on_cpu_and_reports_skips(tiny_project, tmp_path: Path) -> None:
    _, paths = tiny_project
    out = tmp_path / "out"
    out.mkdir()
    rows_file = tmp_path / "rows.json"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_check.sh"), "run", str(paths.root),
         "--steps", "2", "--dtype", "bfloat16", "--json", str(rows_file)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(rows_file.read_text())["rows"]
    assert list(rows) == PARTS
    for name in PARTS[:3]:
        assert rows[name]["status"] == "passed", rows[name]
    assert "cosine min" in rows[PARTS[0]]["note"] and "bfloat16" in rows[PARTS[0]]["note"]
    assert rows[PARTS[1]]["steps"] == 2 and rows[PARTS[1]]["first_s"] > 0
    assert rows[PARTS[2]]["s_per_step"] > 0
    for name in PARTS[1:3]:
        assert "2 optimiser steps, checkpoint resumed at step 2" in rows[name]["note"], rows[name]
    table = (out / "device_check.md").read_text()
    assert "| part | status | steps | s/step | first s | peak GPU MiB | note |" in table
    for name in PARTS:
        assert f"| {name} |" in table
    if not torch.cuda.is_available():
        for name in PARTS[3:]:
            assert rows[name]["status"] == "skipped" and "no CUDA" in rows[name]["note"]
            assert f"| {name} | skipped |" in table
        assert "3 passed, 0 failed, 2 skipped (a skip is not a pass)" in proc.stdout


def test_items_outside_tolerance_fail(
    tiny_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, paths = tiny_project
    dc = _module()
    monkeypatch.setattr(dc, "COS_MIN", 1.01)  # no table meets it
    row = dc.check_items(paths.root, tmp_path, "bfloat16")
    assert row["status"] == "failed", row


def test_table_and_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dc = _module()
    rows = [("a", dc._failed("broke")), ("b", dc._skipped("no CUDA device"))]
    monkeypatch.setattr(dc, "run", lambda *a, **k: rows)
    assert dc.main(["run", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "| a | failed |" in printed and "| b | skipped |" in printed
    assert "0 passed, 1 failed, 1 skipped" in printed
    rows[:] = [("b", dc._skipped("no CUDA device"))]
    assert dc.main(["run", str(tmp_path)]) == 0
    assert dc.main(["run", str(tmp_path), "--require-all"]) == 2
