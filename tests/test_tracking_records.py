"""What MLflow records of a run: the kept model's figures under names of their own, curves
only as curves, and a training run's duration that is its training's."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.pytorch
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


def test_the_logged_model_shows_the_kept_figures_once_against_the_test_split(tmp_path: Path) -> None:
    _write_splits(tmp_path)

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            return model_input

    with tracking.start_run(PARAMS, "train", run_name="recpo", root=tmp_path) as run:
        tracking.log_metrics({"ndcg@10": 0.04}, step=50, prefix="valid_")
        model = mlflow.pyfunc.log_model(name="recommender", python_model=Echo())
    report = tmp_path / "metrics.json"
    report.write_text("{}\n")
    tracking.log_evaluation(run.info.run_id, {"valid": {"ndcg@10": 0.04}, "test": {"ndcg@10": 0.035}}, [],
                            report, tmp_path)
    metrics = MlflowClient().get_logged_model(model.model_id).metrics
    names = [m.key for m in metrics]
    assert sorted(names) == sorted(set(names)) and {"best_valid_ndcg_at_10", "test_ndcg_at_10"} <= set(names)
    test = next(m for m in metrics if m.key == "test_ndcg_at_10")
    assert test.dataset_name == "Video_Games-test" and test.dataset_digest


def _write_splits(root: Path) -> None:
    import pandas as pd

    from rrec.paths import Paths

    for i, split in enumerate(("train", "valid", "test")):
        file = Paths(root).split_file(split)
        file.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"user_id": [f"u{i}"], "target_item_id": [i]}).to_parquet(file)


def test_a_baseline_run_shows_its_best_epoch_model_and_data(tmp_path: Path) -> None:
    import torch

    _write_splits(tmp_path)
    tracker = tracking.RunPerModel(PARAMS, "baselines", tmp_path)
    tracker.start("sasrec", {"lr": 0.001})
    best = {"ndcg@10": 0.08}
    for epoch, valid in ((1, {"ndcg@10": 0.05}), (2, best), (3, {"ndcg@10": 0.07})):
        tracker.log_epoch(epoch, 1.0 / epoch, valid)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_text(json.dumps({}))
    run_id = mlflow.last_active_run().info.run_id
    model = torch.nn.Linear(3, 2)
    tracker.finish({"ndcg@10": 0.075}, checkpoint, best, model)
    run = MlflowClient().get_run(run_id)
    metrics = run.data.metrics
    assert metrics["valid_ndcg_at_10"] == 0.07  # the last epoch: the curve's end
    assert metrics["best_valid_ndcg_at_10"] == 0.08 and metrics["test_ndcg_at_10"] == 0.075
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"Video_Games-train", "Video_Games-valid", "Video_Games-test"}
    assert all(d.dataset.digest and "processed" in d.dataset.source for d in inputs.values())
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert torch.equal(loaded.weight, model.weight)


def test_the_experiment_opens_as_model_training_with_descriptions(tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=tracking.configure(tmp_path))
    old = client.create_experiment("rrec-old", artifact_location=(tmp_path / "a").as_uri())  # made before
    assert tracking.ensure_experiment("rrec-old", tmp_path) == old
    for exp_id in (old, tracking.ensure_experiment("rrec", tmp_path)):
        tags = client.get_experiment(exp_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
        assert "rrec.method" in tags["mlflow.note.content"]
    _write_splits(tmp_path)
    with tracking.start_run(PARAMS, "train", run_name="recpo", root=tmp_path) as run:
        pass
    logged = client.get_run(run.info.run_id)
    assert logged.data.tags["mlflow.note.content"].startswith("recpo: training")
    assert len(logged.inputs.dataset_inputs) == 3  # the window's splits


def test_registered_models_and_versions_are_described(tmp_path: Path) -> None:
    from rrec import registry

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with tracking.start_run(PARAMS, "train", run_name="recpo", root=tmp_path) as run:
        mlflow.log_artifacts(str(tmp_path / "adapter"), artifact_path="model")
    version = registry.register_run_model(run.info.run_id, "model", "Cat", tmp_path,
                                          tags={"rrec.method": "recpo", "rrec.window_end": "2023-06-30"})
    client = MlflowClient()
    assert "history" in client.get_registered_model("rrec-Cat").description
    described = client.get_model_version("rrec-Cat", str(version)).description
    assert described == f"recpo trained in run {run.info.run_id}, window ending 2023-06-30"


def test_logging_the_splits_prints_none_of_mlflows_schema_hints(tmp_path: Path) -> None:
    import warnings

    import pandas as pd

    from rrec.paths import Paths

    paths = Paths(tmp_path)
    paths.split_file("train").parent.mkdir(parents=True)
    pd.DataFrame({"example_id": [0, 1], "user_id": ["u1", "u2"], "target": [3, 4]}).to_parquet(
        paths.split_file("train"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with mlflow.start_run():
                digests = tracking.log_splits("Cat", tmp_path)
    finally:
        mlflow.set_tracking_uri(None)
    assert len(digests) == 1
    hints = [m for m in map(str, (w.message for w in seen))
             if m.startswith("Hint") or "interpreted in multiple ways" in m]
    assert hints == []
