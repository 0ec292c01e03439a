"""The `report` stage: one table of every method's test metrics, read from MLflow.

For each method (tag `rrec.method`) the newest finished run of the current category
and data version is taken, so the table always compares runs on the same data.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rrec.atomic import atomic_path
from rrec.config import Params
from rrec.paths import Paths
from rrec.tracking import data_version, finished_runs_by_method

# Display order: reference rows, classic baselines, then the LLM methods.
METHOD_ORDER = ["random", "popularity", "gru4rec", "caser", "sasrec", "contrastive", "recpo"]
# `dvc metrics show` prints a row per file: one small file a method, a few columns each
METRICS_DIR = Path("reports") / "metrics"
HEADLINE_TEST = ("ndcg@5", "ndcg@10", "ndcg@20", "hit@10", "n")
HEADLINE_VALID = ("ndcg@10",)
# test NDCG@K, a column per method of METHOD_ORDER (empty when it has no run): dvc plots
BY_K_CSV = "ndcg_by_k.csv"


def headline(test: dict[str, float], best_valid: dict[str, float]) -> dict[str, dict[str, float]]:
    """The few figures of a method that `dvc metrics show` prints (the rest is in
    reports/comparison.md and MLflow)."""
    return {
        "test": {k: round(test[k], 4) if k != "n" else int(test[k]) for k in HEADLINE_TEST if k in test},
        "best_valid": {k: round(best_valid[k], 4) for k in HEADLINE_VALID if k in best_valid},
    }


def write_headline(root: Path, method: str, test: dict[str, float], best_valid: dict[str, float],
                   folder: str | None = None) -> Path:
    out = root / METRICS_DIR / (folder or "") / f"{method}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(headline(test, best_valid), indent=2) + "\n")
    return out


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


def write_by_k(rows: list[dict[str, Any]], ks: list[int], path: Path) -> None:
    """Test NDCG@K: a row per K, a column per method of METHOD_ORDER (then any other)."""
    by_method = {r["method"]: r for r in rows}
    methods = METHOD_ORDER + [m for m in by_method if m not in METHOD_ORDER]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["k", *methods])
        for k in ks:
            w.writerow([k, *("" if (v := by_method.get(m, {}).get(f"ndcg@{k}")) is None else v for m in methods)])


def run_report(params: Params, paths: Paths) -> dict[str, Any]:
    rows = comparison_rows(params, paths.root)
    if not rows:
        raise RuntimeError(
            "no finished runs with test metrics in MLflow for category "
            f"{params.data.category!r}; run the evaluate and baselines stages first"
        )
    paths.reports.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.reports / BY_K_CSV) as tmp:
        write_by_k(rows, params.evaluate.ks, tmp)
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
