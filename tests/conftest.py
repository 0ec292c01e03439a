"""Shared fixtures: a tiny but complete project (sample data -> prompts -> tiny backbone
-> item table) built once per test session, small enough for CPU tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from rrec.config import Params, load_params
from rrec.paths import Paths

ROOT = Path(__file__).resolve().parent.parent

# Small, fast settings on top of the committed params.yaml.
TINY_OVERRIDES: dict = {
    "data.sample.n_items": 300,
    "data.sample.n_users": 500,
    "data.window.min_items": 150,
    "data.window.max_history": 5,
    "data.window.max_malformed_share": 0.05,
    "model.tiny.vocab_size": 600,
    "model.tiny.hidden_size": 32,
    "model.tiny.num_layers": 2,
    "model.tiny.num_heads": 4,
    "model.tiny.num_kv_heads": 2,
    "model.tiny.intermediate_size": 64,
    "model.tiny.pretrain_steps": 3,
    "model.tiny.pretrain_batch_size": 8,
    "model.tiny.pretrain_seq_len": 64,
    "items.batch_size": 64,
    "items.chunk_size": 64,
    "train.batch_size": 8,
    "train.micro_batch_size": 16,
    "train.max_steps": 6,
    "train.eval_every": 3,
    "train.checkpoint_every": 2,
    "train.eval_max_users": 24,
    "train.warmup_steps": 2,
    "train.lr": 0.005,
    "train.eval_samples": 2,
    "train.rollout.group_size": 2,
    "train.rollout.max_new_tokens": 4,
    # each test trains one method alone; starting from the contrastive model is tested
    # in test_train.py and end to end in test_pipeline_e2e.py
    "train.recpo.init": "backbone",
    # two warm-up steps, then RecPO proper: a resume at step 2 crosses the boundary
    "train.recpo.item_warmup_steps": 2,
    "evaluate.max_new_tokens": 4,
    "evaluate.max_users": 40,
    "baselines.epochs": 2,
}


def write_params(root: Path, overrides: dict) -> Params:
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_params(root / "params.yaml")


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Paths]:
    """data/raw .. models/item_table of a tiny project, built through the stage functions."""
    from rrec.data.download import run_download
    from rrec.data.window import run_window
    from rrec.items import run_items
    from rrec.model.backbone import build_backbone
    from rrec.prompts import run_prompts

    root = tmp_path_factory.mktemp("tiny_project")
    params = write_params(root, TINY_OVERRIDES)
    paths = Paths(root)
    run_download(params, paths)
    run_window(params, paths)
    run_prompts(params, paths)
    build_backbone(params, paths)
    run_items(params, paths)
    return params, paths


@pytest.fixture
def project_copy(tiny_project: tuple[Params, Paths], tmp_path: Path) -> tuple[Params, Paths]:
    """A private copy of the tiny project, for tests that train or write into it."""
    params, paths = tiny_project
    dst = tmp_path / "project"
    shutil.copytree(paths.root, dst, ignore=shutil.ignore_patterns("mlflow", "checkpoints", "trained"))
    return load_params(dst / "params.yaml"), Paths(dst)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """One Prefect test server for the whole session (a fixture defined once here: modules
    that each defined it would start servers of their own, and a flow could report its
    task runs to another server than the one a test reads)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test logs to its own MLflow store, never the project's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
