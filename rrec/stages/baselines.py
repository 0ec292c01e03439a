"""`python -m rrec.stages.baselines` (DVC stage `baselines`): SASRec, GRU4Rec and Caser,
plus the popularity and random reference rows, each as one MLflow run; their test
metrics in one JSON (`reports/eval/baselines.json`) and, for `dvc metrics show`, a few
figures a model (`reports/metrics/baselines/<model>.json`)."""

from __future__ import annotations

import json
from typing import Any

from rrec import tracking
from rrec.atomic import write_text
from rrec.baselines.reference import run_references
from rrec.baselines.train import run_baselines
from rrec.config import Params
from rrec.paths import Paths
from rrec.report import write_headline
from rrec.stages import run


def run_baselines_stage(params: Params, paths: Paths) -> dict[str, Any]:
    tracking.require_reachable(paths.root)
    tracker = tracking.RunPerModel(params, "baselines", paths.root)
    try:
        results = run_baselines(params, paths, tracker)
    except BaseException:
        tracker.close_failed()
        raise
    report: dict[str, Any] = {
        name: {"test": r.test, "best_valid": r.best_valid, "best_epoch": r.best_epoch,
               "train_seconds": round(r.train_seconds, 1), "stopped_early": r.stopped_early}
        for name, r in results.items()
    }
    for name, by_split in run_references(params, paths).items():
        with tracking.start_run(params, "baselines", run_name=name, tags={"rrec.method": name}, root=paths.root):
            tracking.log_metrics(by_split["test"], prefix="test_")
            tracking.log_metrics(by_split["valid"], prefix="best_valid_")  # the column the trained share
        report[name] = {"test": by_split["test"], "best_valid": by_split["valid"]}
    write_text(paths.baselines_report, json.dumps(report, indent=2) + "\n")
    for name, r in report.items():
        write_headline(paths.root, name, r["test"], r["best_valid"], folder="baselines")
    return report


if __name__ == "__main__":
    run("baselines", run_baselines_stage)
