"""One Prefect flow per pipeline stage.

Each flow loads the validated params, resolves the artefact paths and calls the
stage's plain function in `rrec/`. `dvc.yaml` runs these flows (through
`python -m flows.run STAGE`), so `dvc repro` and the Prefect UI see the same runs.
An exception inside a stage fails its flow run (and any MLflow run it opened).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rrec.config import Params, load_params
from rrec.paths import Paths

COMPUTE_MARK = "rrec-stage-compute"


@contextmanager
def _timed(stage: str) -> Iterator[None]:
    """Log the stage's own compute time (the rrec function, imports excluded), in a
    line `benchmarks/orchestration_overhead.py` reads to separate it from the cost of
    DVC, Prefect and process start-up."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    get_run_logger().info("%s %s %.2f", COMPUTE_MARK, stage, seconds)
    print(f"{COMPUTE_MARK} {stage} {seconds:.2f}", flush=True)


def _load(params_path: str, root: str) -> tuple[Params, Paths]:
    return load_params(Path(root) / params_path), Paths(Path(root))


def _run(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    with _timed(stage):
        return _jsonable(fn(*args))


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

        return _run("download", run_download, params, paths)
    # download_one retries transient failures itself (data.retries) and fails at once on a
    # deterministic one (HTTP 404, a failed integrity check): no retries on top here
    with _timed("download"):
        return {key: fetch_file(params, paths, key) for key in ("interactions", "meta")}


@flow(name="window")
def window_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.data.window import run_window

    params, paths = _load(params_path, root)
    with _timed("window"):
        stats = run_window(params, paths)
    get_run_logger().info("window: %s", {k: stats.get(k) for k in ("users", "items", "interactions", "train", "valid", "test")})
    return _jsonable(stats)


@flow(name="prompts")
def prompts_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.prompts import run_prompts

    params, paths = _load(params_path, root)
    return _run("prompts", run_prompts, params, paths)


@flow(name="backbone")
def backbone_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.model.backbone import build_backbone

    params, paths = _load(params_path, root)
    return _run("backbone", build_backbone, params, paths)


@flow(name="items")
def items_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.items import run_items

    params, paths = _load(params_path, root)
    return _run("items", run_items, params, paths)


@flow(name="train", flow_run_name="train-{method}")
def train_flow(method: str, params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.train.run import run_train

    params, paths = _load(params_path, root)
    return _run(f"train@{method}", run_train, params, paths, method)


@flow(name="evaluate", flow_run_name="evaluate-{method}")
def evaluate_flow(method: str, params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.evaluate import run_evaluate

    params, paths = _load(params_path, root)
    return _run(f"evaluate@{method}", run_evaluate, params, paths, method)


@flow(name="baselines")
def baselines_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.baselines.stage import run_baselines_stage

    params, paths = _load(params_path, root)
    return _run("baselines", run_baselines_stage, params, paths)


@flow(name="report")
def report_flow(params_path: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    from rrec.report import run_report

    params, paths = _load(params_path, root)
    return _run("report", run_report, params, paths)


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
