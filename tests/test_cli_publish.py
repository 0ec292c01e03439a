"""`rrec catalogue ... --publish ALIAS` without --method changes the model the alias serves:
its method is read from the registry (the version's tag, else its run's)."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from rrec import registry
from rrec.cli import _served_method
from rrec.config import parse_params
from rrec.paths import Paths
from tests.test_registry import adapter_run, empty_store, store  # noqa: F401  (fixtures)


def test_the_published_alias_names_the_method(store: str, tmp_path: Path) -> None:  # noqa: F811
    params, paths = parse_params({"data": {"category": "Cat"}}), Paths(tmp_path)
    assert _served_method(params, paths, "champion") is None  # nothing registered: recpo then
    run_id = adapter_run(store, tmp_path, 0.3, "c")
    MlflowClient().set_tag(run_id, "rrec.method", "contrastive")
    version = registry.register_run_model(run_id, "model", "Cat")  # no version tag: the run's
    registry.set_alias("rrec-Cat", "champion", version)
    assert _served_method(params, paths, "champion") == "contrastive"
    other = registry.register_run_model(adapter_run(store, tmp_path, 0.2, "r"), "model", "Cat",
                                        tags={"rrec.method": "recpo"})
    registry.set_alias("rrec-Cat", "challenger", other)
    assert _served_method(params, paths, "challenger") == "recpo"
