"""benchmarks/quality.py --workdir: a method is trained again exactly when a param that
changes its training or its evaluation changed."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from rrec.config import load_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def method_key():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks/quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._method_key


def _changed(params: dict, section: str, name: str, value) -> dict:
    out = copy.deepcopy(params)
    out[section][name] = value
    return out


@pytest.mark.parametrize("method", ["contrastive", "recpo"])
def test_the_reward_probe_keeps_a_kept_result_and_the_learning_rate_does_not(method_key, method) -> None:
    params = load_params(ROOT / "params.yaml").model_dump(mode="json")
    key = method_key(params, method)
    assert method_key(_changed(params, "train", "reward_probe_users", 7), method) == key
    assert method_key(_changed(params, "train", "lr", 1e-5), method) != key
    assert method_key(_changed(params, "model", "tau", 0.5), method) != key


def test_rollout_settings_retrain_recpo_only(method_key) -> None:
    params = load_params(ROOT / "params.yaml").model_dump(mode="json")
    rollout = {**params["train"]["rollout"], "group_size": 8}
    changed = _changed(params, "train", "rollout", rollout)
    assert method_key(changed, "contrastive") == method_key(params, "contrastive")
    assert method_key(changed, "recpo") != method_key(params, "recpo")
