"""What `dvc plots show` and `dvc metrics show` render from the committed reports (the
pipeline's last run): every plot draws the columns it declares, and the metrics print
as a table a person can read, a row per method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from rrec.report import METHOD_ORDER

ROOT = Path(__file__).resolve().parent.parent


def _dvc(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_every_plot_is_declared_with_its_columns() -> None:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        for p in stage.get("do", stage).get("plots", []):
            props = next(iter(p.values())) if isinstance(p, dict) else {}
            assert {"x", "y"} <= set(props or {}), f"stage {name}: plot {p} names no x or y column"
    declared = {name: body for plot in spec["plots"] for name, body in plot.items()}
    rendered = json.loads(_dvc("plots", "show", "--json"))["data"]
    assert set(rendered) == set(declared), "dvc plots show draws plots dvc.yaml does not name"
    for name, body in declared.items():
        values = rendered[name][0]["content"]["data"]["values"]
        assert values, f"plot {name} has no data"
        for file, columns in body["y"].items():
            columns = [columns] if isinstance(columns, str) else columns
            header = (ROOT / file).read_text().splitlines()[0].split(",")
            assert body["x"] in header and set(columns) <= set(header), (name, file, header)
    # what the README promises
    assert {"loss", "valid_ndcg_at_10", "reasoning_length", "recpo_reward", "test_ndcg_by_k"} <= set(declared)


def test_dvc_metrics_show_prints_a_row_per_method() -> None:
    lines = [line for line in _dvc("metrics", "show").splitlines() if line.strip()]
    header, rows = lines[0], lines[1:]
    assert len(header.split()) <= 8, f"{len(header.split())} columns: {header}"
    assert all(len(line) <= 160 for line in lines), max(lines, key=len)
    names = [Path(row.split()[0]).stem for row in rows]
    assert sorted(names) == sorted(METHOD_ORDER), names
    assert "-" not in {cell for row in rows for cell in row.split()[1:]}, "a method lacks a column"
