"""The retraining gate compares the champion and the challenger on one test split: a
champion scored on another window's split is scored again, from the registry, on the
challenger's split before anything is promoted, and both figures are tagged on the
versions with the split's digest."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows import retrain
from flows.retrain import retrain_flow
from rrec import registry
from rrec.config import Params
from rrec.paths import Paths
from tests.test_flows import FakePipeline, empty_store, fake_pipeline  # noqa: F401  (fixtures)
from tests.test_registry import adapter_run, store  # noqa: F401  (fixtures)


def _tag_split(run_id: str, digest: str) -> None:
    MlflowClient().set_tag(run_id, registry.SPLIT_TAG, digest)


def test_figures_on_different_splits_are_not_compared(store: str, tmp_path: Path) -> None:  # noqa: F811
    name = "rrec-Cat"
    old = adapter_run(store, tmp_path, 0.30, "old")
    _tag_split(old, "aaaa")
    v1 = registry.register_run_model(old, "model", "Cat")
    assert registry.promote_if_better(name, v1) is True
    new = adapter_run(store, tmp_path, 0.10, "new")
    _tag_split(new, "bbbb")
    v2 = registry.register_run_model(new, "model", "Cat")
    assert registry.promote_if_better(name, v2) is False  # 0.10 vs 0.30: another split, not compared
    assert registry.champion_version(name) == v1
    # on one split, the champion scoring 0.05 there: the challenger wins
    assert registry.promote_if_better(name, v2, champion_value=0.05, challenger_value=0.10) is True
    assert registry.champion_version(name) == v2


def test_retrain_scores_the_champion_on_the_new_split(
    fake_pipeline: FakePipeline, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    fake, root = fake_pipeline, fake_pipeline.root
    fake.register_in_evaluate = True
    split = {"digest": "old-window"}
    trained = fake.train

    def train(params: Params, paths: Paths, method: str) -> None:
        trained(params, paths, method)
        _tag_split(mlflow.last_active_run().info.run_id, split["digest"])

    fake.train = train  # type: ignore[method-assign]
    fake.ndcg10 = {"contrastive": 0.20, "recpo": 0.05}
    assert retrain_flow(root=str(root))["promoted"] is True  # v1 (contrastive) is the champion

    scored = {"models:/rrec-Cat_A/1": 0.05, "models:/rrec-Cat_A/3": 0.07}
    monkeypatch.setattr(retrain, "score_on_split", lambda uri, root, params: {"ndcg@10": scored[uri]})
    split["digest"], fake.latest = "new-window", "2023-07-31"
    fake.ndcg10 = {"contrastive": 0.15, "recpo": 0.12}  # below the champion's 0.20 on its old split
    out = retrain_flow(root=str(root))
    assert out["version"] == 3 and out["test_split"] == "new-window"
    assert out["champion_ndcg10_recorded"] == pytest.approx(0.20)
    assert out["champion_ndcg10"] == pytest.approx(0.05) and out["challenger_ndcg10"] == pytest.approx(0.07)
    assert out["promoted"] is True
    client = MlflowClient()
    assert client.get_registered_model("rrec-Cat_A").aliases["champion"] == 3
    assert float(client.get_model_version("rrec-Cat_A", "1").tags["test_ndcg_at_10.new-window"]) == 0.05
    v3 = client.get_model_version("rrec-Cat_A", "3").tags
    assert v3[registry.SPLIT_TAG] == "new-window" and float(v3["test_ndcg_at_10.new-window"]) == 0.07


def test_a_registered_model_is_scored_on_another_windows_split(
    project_copy: tuple[Params, Paths], tmp_path: Path
) -> None:
    """For real: a tiny trained model, registered, loaded from the registry alone (the
    project copy it came from deleted) and scored on a window whose end moved (other item
    ids); on its own window the figure is the evaluate stage's."""
    from rrec.data.window import run_window
    from rrec.evaluate import evaluate_trained
    from rrec.prompts import run_prompts
    from rrec.serve.pyfunc import log_pyfunc
    from rrec.stages.train import train_stage
    from tests.conftest import TINY_OVERRIDES, write_params

    _, paths = project_copy  # the tiny project's data, backbone and item table
    root = paths.root
    params = write_params(root, {**TINY_OVERRIDES, "train.max_steps": 2, "train.eval_every": 2,
                                 "train.recpo.init": "backbone", "evaluate.max_users": 30})
    train_stage(params, paths, "contrastive")
    results, *_ = evaluate_trained(params, paths, "contrastive")
    uri = log_pyfunc(params, paths, "contrastive", "rrec-Video_Games")

    same = retrain.score_on_split(uri, root, params)
    assert same["ndcg@10"] == pytest.approx(results["test"]["ndcg@10"], abs=1e-6)
    assert same["n"] == results["test"]["n"] and same["n_unknown_target"] == 0

    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(paths.raw, Paths(moved).raw)
    end = params.data.window.end
    moved_params = write_params(moved, {**TINY_OVERRIDES, "evaluate.max_users": 30,
                                        "data.window.end": str(end.replace(month=end.month - 1))})
    run_window(moved_params, Paths(moved))
    run_prompts(moved_params, Paths(moved))
    shutil.rmtree(root)  # the registry alone
    other = retrain.score_on_split(uri, moved, moved_params)
    assert other["n"] > 0 and 0 <= other["ndcg@10"] <= other["hit@10"] <= 1
