"""`python -m rrec.stages.evaluate --method M` (DVC stage `evaluate@M`): the trained
policy on the valid and test splits beside the popularity and random references;
metrics JSON, a per-K CSV, the few figures `dvc metrics show` prints
(`reports/metrics/<method>.json`) and every example's target rank (`ranks.csv`, for paired
comparisons of runs) for DVC (`reports/eval/<method>/`), the policy's metrics
and test reasoning samples in its MLflow training run, and its model registered as a
version of `rrec-<category>` (promoted to `champion` only if it beats the champion)."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rrec import registry, tracking
from rrec.atomic import write_text
from rrec.baselines.reference import run_references
from rrec.config import Params
from rrec.evaluate import evaluate_trained
from rrec.paths import Paths
from rrec.report import write_headline
from rrec.stages import run

RANKS_CSV = "ranks.csv"


def write_reports(out: Path, report: dict[str, Any], ks: Sequence[int]) -> None:
    write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    w.writerow(["method", "split", "k", "hit", "ndcg"])
    for method, by_split in report["methods"].items():
        for split, m in by_split.items():
            for k in ks:
                w.writerow([method, split, k, m[f"hit@{k}"], m[f"ndcg@{k}"]])
    write_text(out / "metrics_by_k.csv", rows.getvalue())


def write_ranks(path: Path, ranks: dict[str, dict[int, int]]) -> None:
    """{split: {example_id: rank}} as `ranks.csv` (`read_ranks` reads it back)."""
    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    w.writerow(["split", "example_id", "rank"])
    for split, by_id in ranks.items():
        w.writerows([split, example_id, rank] for example_id, rank in by_id.items())
    write_text(path, rows.getvalue())


def read_ranks(path: Path) -> dict[str, dict[int, int]]:
    """`ranks.csv` as {split: {example_id: rank}}."""
    with path.open() as f:
        out: dict[str, dict[int, int]] = {}
        for row in csv.DictReader(f):
            out.setdefault(row["split"], {})[int(row["example_id"])] = int(row["rank"])
    return out


def evaluate_stage(params: Params, paths: Paths, method: str, *, register: bool = True) -> dict[str, Any]:
    tracking.require_reachable(paths.root)  # before any work: results are logged at the end
    started = time.monotonic()
    results, samples, summary, ranks = evaluate_trained(params, paths, method)
    seconds = time.monotonic() - started
    methods: dict[str, dict[str, dict[str, float]]] = {summary["method"]: results}
    methods.update(run_references(params, paths))
    report = {"category": params.data.category, "policy": summary["method"], "methods": methods}
    out = paths.eval_report(method)
    write_reports(out, report, params.evaluate.ks)
    write_ranks(out / RANKS_CSV, ranks)
    write_headline(paths.root, method, results["test"], results["valid"])

    # the policy's metrics go into its training run; the reference rows get runs of their
    # own in the baselines stage
    run_id = summary.get("mlflow_run_id")
    if run_id:
        digest = registry.split_digest(paths.split_file("test"), params.evaluate.max_users, params.seed)
        tracking.log_evaluation(run_id, results, samples, out / "metrics.json", paths.root, seconds=seconds,
                                tags={registry.SPLIT_TAG: digest})
        if register:
            report["registered"] = registry.register_and_promote(
                run_id, params.data.category, root=paths.root,
                tags={"rrec.method": method, "rrec.window_end": str(params.data.window.end)},
            )
    return report


if __name__ == "__main__":
    run("evaluate", evaluate_stage, with_method=True, torch_threads=True)
