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


def score_on_split(model_uri: str, root: Path, params: Any, split: str = "test") -> dict[str, float]:
    """A registered recommender (loaded from the registry alone) scored on `split` of the
    window in `root`: the examples the evaluate stage scores (`evaluate.max_users`), items
    matched by parent_asin to the model's own catalogue, the model's prompts. An example
    whose target the model's catalogue lacks counts as a miss; history items it lacks are
    left out of the prompt. Returns {ndcg@K, hit@K, n, n_unknown_target}."""
    import pyarrow.parquet as pq

    from rrec.metrics import hit_from_ranks, ndcg_from_ranks, scorer_ranks
    from rrec.prompts import load_user_prompts
    from rrec.serve.pyfunc import load_recommender

    paths = Paths(root)
    rec = load_recommender(model_uri)
    items = pq.read_table(paths.items_file, columns=["item_id", "parent_asin"]).to_pydict()
    asin = dict(zip(items["item_id"], items["parent_asin"], strict=True))
    chosen = set(load_user_prompts(paths, split).sample_users(params.evaluate.max_users, params.seed).example_ids)
    rows = [e for e in pq.read_table(paths.split_file(split)).to_pylist() if e["example_id"] in chosen]
    convs, histories, targets = [], [], []
    for e in rows:
        target = rec.catalogue.id_of_asin(asin[e["target_item_id"]])
        known = [(j, r, t) for i, r, t in zip(e["history_item_ids"], e["history_ratings"], e["history_timestamps"],
                                               strict=True)
                 if (j := rec.catalogue.id_of_asin(asin[i])) is not None]
        if target is None or not known:
            continue
        now = int(e["target_timestamp"])
        parsed = rec.parse_history([{"item_id": j, "rating": r, "timestamp": int(t)} for j, r, t in known], now)
        convs.append(rec.conversation(parsed, now))
        histories.append(parsed.item_ids)
        targets.append(target)
    n = len(rows)
    out: dict[str, float] = {"n": float(n), "n_unknown_target": float(n - len(targets))}
    if not targets:
        return {**out, **{f"{m}@{k}": 0.0 for k in params.evaluate.ks for m in ("ndcg", "hit")}}
    states, _ = rec.user_states(convs)
    ranks = scorer_ranks(lambda idx: rec.table.score(states[idx], rec.model.tau), histories, targets,
                         batch_size=256, progress=False)
    for k in params.evaluate.ks:  # the examples left out are misses: they add 0 to the sums
        out[f"ndcg@{k}"] = float(ndcg_from_ranks(ranks, k).sum()) / n
        out[f"hit@{k}"] = float(hit_from_ranks(ranks, k).sum()) / n
    return out


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(root: str, params_path: str, version: int, before: dict[str, Any]) -> dict[str, Any]:
    """Promote `version` if it beats the champion `before` this run on the same test split.
    When the champion was scored on another split (the window moved), it is scored again
    on the challenger's split, from the registry, and that figure decides; both figures
    and the split's digest are tagged on the two versions. The evaluate stage may already
    have promoted `version` during `dvc repro` (same split); either way `promoted` says
    whether the champion changed to this version in this retraining."""
    from rrec import registry

    root_path = Path(root)
    params = load_params(root_path / params_path)
    name = registry.model_name(params.data.category)
    challenger = registry.version_metric(name, version, root=root_path)
    split = registry.version_split(name, version, root_path)
    champion_score, values = before["ndcg10"], {}
    if before["version"] is not None and before["version"] != version and split is not None \
            and registry.version_split(name, before["version"], root_path) != split:
        # both scored here, the same way, on the challenger's split
        champion_score = score_on_split(f"models:/{name}/{before['version']}", root_path, params)["ndcg@10"]
        challenger = score_on_split(f"models:/{name}/{version}", root_path, params)["ndcg@10"]
        values = {"champion_value": champion_score, "challenger_value": challenger}
        get_run_logger().info(
            "test split %s: champion v%s NDCG@10 %.6g (%s on its own split), challenger v%s %.6g",
            split, before["version"], champion_score, before["ndcg10"], version, challenger)
        registry.tag_version(name, before["version"], f"{registry.METRIC}.{split}", repr(champion_score), root_path)
    if split is not None:
        registry.tag_version(name, version, registry.SPLIT_TAG, split, root_path)
        registry.tag_version(name, version, f"{registry.METRIC}.{split}", repr(challenger), root_path)
    registry.promote_if_better(name, version, root=root_path, **values)
    now = registry.champion_version(name, root=root_path)
    promoted = now == version and before["version"] != version
    return {"challenger_ndcg10": challenger, "champion_ndcg10": champion_score,
            "champion_ndcg10_recorded": before["ndcg10"], "test_split": split, "promoted": promoted}


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

    Returns {version, promoted, challenger_ndcg10, champion_ndcg10, champion_ndcg10_recorded,
    test_split, method, run_id, window_end}; `champion_ndcg10` is the champion's figure on
    the challenger's test split (`test_split`, its digest), `champion_ndcg10_recorded` the
    one on its own split (None when there was no champion). When nothing changed, DVC skips every stage and the
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
