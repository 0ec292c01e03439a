"""What MLflow records of a run: the kept model's figures under names of their own, curves
only as curves, and a training run's duration that is its training's."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from rrec import tracking
from rrec.config import parse_params

PARAMS = parse_params({})


def _history(client: MlflowClient, run_id: str, name: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, name)]


def test_evaluation_logs_the_kept_model_under_its_own_names_without_reopening_the_run(tmp_path: Path) -> None:
    with tracking.start_run(PARAMS, "train", run_name="recpo", root=tmp_path) as run:
        for step, ndcg in ((0, 0.01), (50, 0.04), (100, 0.03)):  # the curve; step 50 is kept
            tracking.log_metrics({"ndcg@10": ndcg}, step=step, prefix="valid_")
    client = MlflowClient()
    ended = client.get_run(run.info.run_id).info
    report = tmp_path / "metrics.json"
    report.write_text("{}\n")

    tracking.log_evaluation(
        run.info.run_id, {"valid": {"ndcg@10": 0.04, "n": 10}, "test": {"ndcg@10": 0.035, "n": 12}},
        [{"history": "a", "rank": 3}], report, tmp_path, seconds=42.0,
    )
    after = client.get_run(run.info.run_id)
    assert after.info.end_time == ended.end_time and after.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "valid_ndcg_at_10") == [(0, 0.01), (50, 0.04), (100, 0.03)]
    assert after.data.metrics["best_valid_ndcg_at_10"] == 0.04
    assert after.data.metrics["test_ndcg_at_10"] == 0.035
    assert after.data.metrics["test_n"] == 12 and after.data.metrics["evaluate_seconds"] == 42.0
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "test_reasoning_samples.json"} <= files


def test_a_baseline_run_shows_its_best_epoch(tmp_path: Path) -> None:
    tracker = tracking.RunPerModel(PARAMS, "baselines", tmp_path)
    tracker.start("sasrec", {"lr": 0.001})
    best = {"ndcg@10": 0.08}
    for epoch, valid in ((1, {"ndcg@10": 0.05}), (2, best), (3, {"ndcg@10": 0.07})):
        tracker.log_epoch(epoch, 1.0 / epoch, valid)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_text(json.dumps({}))
    run_id = mlflow.last_active_run().info.run_id
    tracker.finish({"ndcg@10": 0.075}, checkpoint, best)
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert metrics["valid_ndcg_at_10"] == 0.07  # the last epoch: the curve's end
    assert metrics["best_valid_ndcg_at_10"] == 0.08 and metrics["test_ndcg_at_10"] == 0.075
