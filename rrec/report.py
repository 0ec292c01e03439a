"""The `report` stage: one table of every method's test metrics, read from MLflow.

For each method (tag `rrec.method`) the newest finished run of the current category
and data version is taken, so the table always compares runs on the same data.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rrec.atomic import atomic_path
from rrec.config import Params
from rrec.paths import Paths
from rrec.tracking import data_version, finished_runs_by_method

# Display order: reference rows, classic baselines, then the LLM methods.
METHOD_ORDER = ["random", "popularity", "gru4rec", "caser", "sasrec", "contrastive", "recpo"]


def comparison_rows(params: Params, root: Path | None = None) -> list[dict[str, Any]]:
    ks = params.evaluate.ks
    runs = finished_runs_by_method(params.tracking.experiment, params.data.category, data_version(root), root)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows = []
    for method in sorted(runs, key=lambda m: (rank.get(m, len(rank)), m)):
        run = runs[method]
        n = run["metrics"].get("test_n")
        row: dict[str, Any] = {"method": method, "n": None if n is None else int(n), "run_id": run["run_id"]}
        for k in ks:
            for name in ("hit", "ndcg"):
                row[f"{name}@{k}"] = run["metrics"].get(f"test_{name}_at_{k}")
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_markdown(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One table per number of test examples scored: only methods scored on the same
    examples sit side by side (a sampled evaluation gets a table of its own)."""
    cols = [c for c in rows[0] if c != "run_id"] + ["run_id"] if rows else ["method"]
    lines = [f"# {title}"]
    for n in sorted({r.get("n") for r in rows}, key=lambda v: -1 if v is None else -v):
        lines += ["", f"Scored on {_fmt(n)} test examples." if n is not None else "Number of test examples not recorded.", ""]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            if r.get("n") == n:
                lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    path.write_text("\n".join(lines) + "\n")


def run_report(params: Params, paths: Paths) -> dict[str, Any]:
    rows = comparison_rows(params, paths.root)
    if not rows:
        raise RuntimeError(
            "no finished runs with test metrics in MLflow for category "
            f"{params.data.category!r}; run the evaluate and baselines stages first"
        )
    paths.reports.mkdir(parents=True, exist_ok=True)
    md, csv_path = paths.reports / "comparison.md", paths.reports / "comparison.csv"
    title = f"Test metrics, {params.data.category} (data version {data_version(paths.root)})"
    # Both are written in full before either replaces its old version; the Markdown is
    # renamed into place first (the inner block ends first), then the CSV.
    with atomic_path(csv_path) as csv_tmp, atomic_path(md) as md_tmp:
        write_markdown(rows, md_tmp, title)
        with open(csv_tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return {"methods": [r["method"] for r in rows], "markdown": str(md), "csv": str(csv_path)}
