"""One Prefect flow per pipeline stage.

Each flow loads the validated params, resolves the artefact paths and calls the
stage's plain function in `rrec/`. `dvc.yaml` runs these flows (through
`python -m flows.run STAGE`), so `dvc repro` and the Prefect UI see the same runs.
An exception inside a stage fails its flow run (and any MLflow run it opened).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rrec.config import Params, load_params
from rrec.paths import Paths


def _load(params_path: str, root: str) -> tuple[Params, Paths]:
    return load_params(Path(root) / params_path), Paths(Path(root))


def _jsonable(result: Any) -> Any:
    if isinstance(result, dict):
        return {str(k): _jsonable(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [_jsonable(v) for v in result]
    if isinstance(result, Path):
        return str(result)
    if isinstance(result, (str, int, float, bool)) or result is None:
        return result
    return repr(result)


@task(name="fetch-file", cache_policy=NO_CACHE)
def fetch_file(params: Params, paths: Paths, key: str) -> str:
    from rrec.data.download import download_one

    return str(download_one(params, paths, key))


@flow(name="download")
def download_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    params, paths = _load(params_path, root)
    if params.data.source == "sample":
        from rrec.data.download import run_download

        return _jsonable(run_download(params, paths))
    fetch = fetch_file.with_options(retries=params.data.retries, retry_delay_seconds=[2, 10, 30])
    return {key: fetch(params, paths, key) for key in ("interactions", "meta")}


@flow(name="window")
def window_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.data.window import run_window

    params, paths = _load(params_path, root)
    stats = run_window(params, paths)
    get_run_logger().info("window: %s", {k: stats.get(k) for k in ("users", "items", "interactions", "train", "valid", "test")})
    return _jsonable(stats)


@flow(name="prompts")
def prompts_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.prompts import run_prompts

    params, paths = _load(params_path, root)
    return _jsonable(run_prompts(params, paths))


@flow(name="backbone")
def backbone_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.model.backbone import build_backbone

    params, paths = _load(params_path, root)
    return _jsonable(build_backbone(params, paths))


@flow(name="items")
def items_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.items import run_items

    params, paths = _load(params_path, root)
    return _jsonable(run_items(params, paths))


@flow(name="train", flow_run_name="train-{method}")
def train_flow(method: str, params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.train.run import run_train

    params, paths = _load(params_path, root)
    return _jsonable(run_train(params, paths, method))


@flow(name="evaluate", flow_run_name="evaluate-{method}")
def evaluate_flow(method: str, params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.evaluate import run_evaluate

    params, paths = _load(params_path, root)
    return _jsonable(run_evaluate(params, paths, method))


@flow(name="baselines")
def baselines_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.baselines.stage import run_baselines_stage

    params, paths = _load(params_path, root)
    return _jsonable(run_baselines_stage(params, paths))


@flow(name="report")
def report_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.report import run_report

    params, paths = _load(params_path, root)
    return _jsonable(run_report(params, paths))


STAGE_FLOWS = {
    "download": download_flow,
    "window": window_flow,
    "prompts": prompts_flow,
    "backbone": backbone_flow,
    "items": items_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "baselines": baselines_flow,
    "report": report_flow,
}
