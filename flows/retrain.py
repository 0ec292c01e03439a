"""Scheduled retraining: fresh data, a window that ends at the newest interaction, a new
model, and a promotion only when it beats the champion.

    python -m flows.retrain run      # once, now
    python -m flows.retrain serve    # on the weekly schedule, in this process

`prefect.yaml` declares the same schedule as the deployment `rrec-retrain` for a
process work pool (`prefect deploy --all`, then `prefect worker start --pool rrec-local`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import pipeline
from rrec.config import load_params
from rrec.data.latest import latest_interaction_date
from rrec.model.loading import TRAIN_SUMMARY
from rrec.paths import Paths
from rrec.registry import MODEL_NAME as MODEL_ARTIFACT  # what the train stage logs

CRON = "0 3 * * 1"  # Mondays 03:00 UTC
TIMEZONE = "UTC"
DEPLOYMENT = "rrec-retrain"


def run_dvc(args: Sequence[str], root: Path) -> None:
    """`dvc <args>` in `root`, output streamed to the Prefect logger; raises on failure.

    The one place this flow touches DVC: tests replace it with a fake pipeline."""
    pipeline.run_dvc(args, root)


def window_end_override(params_path: str, end: dt.date) -> str:
    """The `dvc exp run -S` argument that sets `data.window.end` in `params_path`: quoted,
    so that YAML reads a string (a bare date would reach DVC as a date object)."""
    return f"{params_path}:data.window.end='{end.isoformat()}'"


# ------------------------------------------------------------------------- tasks


@task(name="download", cache_policy=NO_CACHE)
def download_task(root: str, refresh: bool) -> None:
    # no task retries: the stage retries transient network failures itself (data.retries)
    # and a deterministic one (HTTP 404, a failed integrity check) would only fail again
    # --force: DVC cannot see that the files behind the URLs changed, so only a forced
    # run fetches what is new; unchanged files hash the same and downstream is skipped.
    run_dvc(["repro", "--force", "download"] if refresh else ["repro", "download"], Path(root))


@task(name="latest-date", cache_policy=NO_CACHE)
def latest_date_task(root: str, params_path: str) -> dt.date:
    params = load_params(Path(root) / params_path)
    return latest_interaction_date(params, Paths(Path(root)))


@task(name="reproduce", cache_policy=NO_CACHE)
def reproduce_task(root: str, params_path: str, end: dt.date) -> None:
    """`dvc exp run -S`: the window moved to `end` (DVC edits params.yaml, keeping its
    comments and quoting), the pipeline reproduced and recorded as a DVC experiment."""
    run_dvc(["exp", "run", "-S", window_end_override(params_path, end)], Path(root))


def _trained_run(root: Path, method: str) -> str:
    """The MLflow run id of one method's training, from its train summary."""
    summary_path = Paths(root).trained(method) / TRAIN_SUMMARY
    if not summary_path.exists():
        raise FileNotFoundError(
            f"{summary_path}: not found; the train stage writes it "
            f"(run `dvc repro train@{method}`)"
        )
    summary = json.loads(summary_path.read_text())
    run_id = summary.get("mlflow_run_id")
    if not run_id:
        raise ValueError(f"{summary_path}: has no `mlflow_run_id`; train with MLflow tracking on")
    return run_id


@task(name="register-best", cache_policy=NO_CACHE)
def register_best_task(root: str, params_path: str, methods: list[str] | None) -> dict[str, Any]:
    """Register the trained method with the best test NDCG@10 (the version the evaluate
    stage registered, if it did); returns its method, run id, version and metric."""
    from rrec import registry

    root_path = Path(root)
    params = load_params(root_path / params_path)
    candidates = []
    for method in methods or params.train.methods:
        run_id = _trained_run(root_path, method)
        ndcg = registry.run_metric(run_id, registry.METRIC, root_path)
        if ndcg is None:
            raise ValueError(
                f"MLflow run {run_id} (train@{method}) has no {registry.METRIC}; the evaluate "
                f"stage logs it (run `dvc repro evaluate@{method}`)"
            )
        candidates.append({"method": method, "run_id": run_id, "ndcg": ndcg})
    best = max(candidates, key=lambda c: c["ndcg"])  # first listed method wins a tie
    get_run_logger().info(
        "test NDCG@10 by method: %s; challenger: %s",
        {c["method"]: round(c["ndcg"], 6) for c in candidates}, best["method"],
    )
    # a run that already has a version (the evaluate stage registers) gets that one back
    best["version"] = registry.register_run_model(
        best["run_id"], MODEL_ARTIFACT, params.data.category, root_path,
        tags={"rrec.method": best["method"], "rrec.window_end": str(params.data.window.end)},
    )
    return best


@task(name="champion", cache_policy=NO_CACHE)
def champion_task(root: str, params_path: str) -> dict[str, Any]:
    """The champion (version, test NDCG@10) before this retraining."""
    from rrec import registry

    root_path = Path(root)
    name = registry.model_name(load_params(root_path / params_path).data.category)
    version = registry.champion_version(name, root=root_path)
    metric = None if version is None else registry.version_metric(name, version, root=root_path)
    return {"version": version, "ndcg10": metric}


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(root: str, params_path: str, version: int, before: dict[str, Any]) -> dict[str, Any]:
    """Promote `version` if it beats the champion `before` this run. The evaluate stage may
    already have promoted it during `dvc repro`; either way `promoted` says whether the
    champion changed to this version in this retraining."""
    from rrec import registry

    root_path = Path(root)
    name = registry.model_name(load_params(root_path / params_path).data.category)
    challenger = registry.version_metric(name, version, root=root_path)
    registry.promote_if_better(name, version, root=root_path)
    now = registry.champion_version(name, root=root_path)
    promoted = now == version and before["version"] != version
    return {"challenger_ndcg10": challenger, "champion_ndcg10": before["ndcg10"], "promoted": promoted}


@flow(name="retrain")
def retrain_flow(
    root: str = ".",
    params_path: str = "params.yaml",
    refresh_data: bool = True,
    methods: list[str] | None = None,
) -> dict[str, Any]:
    """Download, move `data.window.end` to the newest interaction and reproduce
    (`dvc exp run -S`), promote.

    Of the trained `methods` (default: `train.methods` of the params), the one with the
    best test NDCG@10 is the challenger: it becomes a new version of `rrec-<category>`
    and the `champion` only if it beats the current champion strictly.

    Returns {version, promoted, challenger_ndcg10, champion_ndcg10, method, run_id,
    window_end}; `champion_ndcg10` is that of the champion the challenger was compared
    with (None when there was none). When nothing changed, DVC skips every stage and the
    same version is compared with itself, which changes nothing.
    """
    logger = get_run_logger()
    download_task(root, refresh_data)
    end = latest_date_task(root, params_path)
    logger.info("data.window.end: %s", end)
    before = champion_task(root, params_path)
    reproduce_task(root, params_path, end)
    best = register_best_task(root, params_path, methods)
    outcome = promote_task(root, params_path, best["version"], before)
    logger.info(
        "version %d (%s): test NDCG@10 %s vs champion %s -> %s", best["version"], best["method"],
        outcome["challenger_ndcg10"], outcome["champion_ndcg10"],
        "promoted" if outcome["promoted"] else "champion kept",
    )
    return {"version": best["version"], **outcome, "method": best["method"],
            "run_id": best["run_id"], "window_end": end.isoformat()}


app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)


@app.command("run")
def run_cmd(
    root: str = typer.Option(".", help="project root holding dvc.yaml and params.yaml"),
    params: str = typer.Option("params.yaml", help="parameter file, relative to --root"),
    refresh_data: bool = typer.Option(True, help="force the download stage to fetch again"),
) -> None:
    """Retrain once, now."""
    typer.echo(json.dumps(retrain_flow(root=root, params_path=params, refresh_data=refresh_data)))


@app.command("serve")
def serve_cmd(cron: str = typer.Option(CRON, help=f"cron schedule ({TIMEZONE})")) -> None:
    """Serve the flow on its schedule from this process (needs PREFECT_API_URL to a server)."""
    from prefect.schedules import Cron

    retrain_flow.serve(name=DEPLOYMENT, schedule=Cron(cron, timezone=TIMEZONE))


if __name__ == "__main__":
    app()
