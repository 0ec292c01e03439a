"""The one place that talks to MLflow.

The tracking store is `mlflow/` in the project (sqlite + artifacts) unless
`MLFLOW_TRACKING_URI` says otherwise. Every run carries the git commit, the flat
params and the data version (the `dvc.lock` hash of the processed data).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rrec.config import Params
from rrec.reachability import require_reachable, store_dir, tracking_uri

PROJECT_ROOT = Path(__file__).resolve().parent.parent


HTTP_RETRIES = 2


def configure(root: Path | None = None) -> str:
    """Point MLflow at the project's store (checked with `require_reachable`); returns
    the tracking URI.

    A tracking server that goes away in the middle of a stage fails the stage's next
    MLflow call after 2 retries (seconds, not MLflow's default of 7 retries, minutes);
    checkpoints and the reports written before it stay on disk.
    `MLFLOW_HTTP_REQUEST_MAX_RETRIES` overrides this."""
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_RETRIES))
    uri = require_reachable(root)
    store_dir(root).mkdir(parents=True, exist_ok=True)
    own = store_dir(root).resolve()
    if uri == f"sqlite:///{own / 'mlflow.db'}" and uri not in _RELOCATED:
        relocate_store(own)
        _RELOCATED.add(uri)
    mlflow.set_tracking_uri(uri)
    return uri


_RELOCATED: set[str] = set()
# Every column of MLflow's sqlite schema that records where artifacts are.
_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def relocate_store(store: Path) -> list[Path]:
    """Make the project's own store (`mlflow/`) follow its checkout when it is copied or
    moved: MLflow records absolute artifact locations, so locations under the checkout the
    store was made in are rewritten to this one (the artifacts came along with it).
    Returns the checkouts moved away from."""
    import sqlite3
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    store = store.resolve()
    db = store / "mlflow.db"
    if not db.is_file():
        return []
    con = sqlite3.connect(db, timeout=30)
    try:
        tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return []
        old_roots: set[Path] = set()
        for (loc,) in con.execute("SELECT artifact_location FROM experiments"):
            if loc and loc.startswith("file://"):
                where = Path(url2pathname(urlparse(loc).path))
                if where.name == "artifacts" and where.parent.name == store.name and where.parent != store:
                    old_roots.add(where.parent.parent)
        new_root = store.parent
        for old_root in sorted(old_roots):
            prefixes = [(old_root.as_uri() + "/", new_root.as_uri() + "/"), (f"{old_root}/", f"{new_root}/")]
            with con:
                for table, column in _LOCATION_COLUMNS:
                    if table not in tables or column not in {c[1] for c in con.execute(f"PRAGMA table_info({table})")}:
                        continue
                    for rowid, value in con.execute(f"SELECT rowid, {column} FROM {table}").fetchall():
                        for old, new in prefixes:
                            if isinstance(value, str) and value.startswith(old):
                                con.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?",
                                            (new + value[len(old):], rowid))
                                break
            print(f"note: the MLflow store {store} was made in the checkout {old_root}; its artifact "
                  f"locations now point into this checkout, {new_root}", file=sys.stderr, flush=True)
        return sorted(old_roots)
    finally:
        con.close()


# MLflow's UI opens an experiment in its GenAI view (traces) unless it is tagged as model
# training; the note is the experiment's description there.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "rrec: LLM recommenders (R2ec, RecPO) and their baselines. One run a trained model "
        "(tag rrec.method); best_valid_* and test_* are the kept model's figures, valid_* the "
        "curves. Models: rrec-<category> with aliases champion and challenger."
    ),
}


# the stages whose runs learn from the window's splits: they log them as datasets
DATASET_STAGES = ("train", "baselines")
# a run's description in MLflow's UI
RUN_NOTES = {
    "train": (
        "{name}: training (per-step loss and the valid_* curves at every evaluation, reasoning "
        "samples under reasoning/), then its evaluation: best_valid_* and test_* are the kept "
        "model's; the model is logged as `recommender`."
    ),
    "baselines": "{name}: baseline; loss and valid_* per epoch, best_valid_* and test_* of the best epoch.",
}


def ensure_experiment(name: str, root: Path | None = None) -> str:
    """The experiment's id, created (or completed) with `EXPERIMENT_TAGS`."""
    import mlflow

    configure(root)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return mlflow.create_experiment(name, artifact_location=artifact_location(root), tags=EXPERIMENT_TAGS)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in exp.tags:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def artifact_location(root: Path | None = None) -> str | None:
    """Artifacts live beside a local sqlite store (`mlflow/artifacts` by default); a
    tracking server decides for itself."""
    uri = tracking_uri(root)
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or Path.cwd(), capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root or Path.cwd(), capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_version(root: Path | None = None, stages: tuple[str, ...] = ("window", "prompts")) -> str:
    """A short hash of the recorded outputs of the data stages in dvc.lock."""
    lock = (root or Path.cwd()) / "dvc.lock"
    if not lock.exists():
        return "unversioned"
    recorded = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    hashes = {
        s: [o.get("md5") for o in recorded.get(s, {}).get("outs", [])] for s in stages if s in recorded
    }
    if not hashes:
        return "unversioned"
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def start_run(
    params: Params,
    stage: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    root: Path | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run with the project's standard tags and params; `run_id` re-opens a
    run (a resumed training) instead of starting one.

    A failing body ends the run FAILED (MLflow's own context manager does this)."""
    import mlflow

    exp_id = ensure_experiment(params.tracking.experiment, root)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    all_tags = {
        "mlflow.note.content": RUN_NOTES.get(stage, f"stage {stage}").format(name=run_name or stage),
        "rrec.stage": stage,
        "rrec.category": params.data.category,
        "rrec.data_version": data_version(root),
        "mlflow.source.git.commit": git_commit(root),
        **(tags or {}),
    }
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name or stage, tags=all_tags) as run:
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.flat().items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        if stage in DATASET_STAGES:
            log_splits(params.data.category, root)
        yield run


SPLITS = ("train", "valid", "test")


def log_splits(category: str, root: Path | None = None) -> list[str]:
    """Log the window's splits (`data/processed/<split>.parquet`) as MLflow datasets of the
    active run, each with its digest and source; returns the digests (none when the window
    has not been written)."""
    import mlflow
    import pandas as pd

    from rrec.paths import Paths

    paths = Paths(root or Path.cwd())
    digests = []
    for split in SPLITS:
        file = paths.split_file(split)
        if not file.exists():
            continue
        with warnings.catch_warnings():
            # MLflow's hints on every split (a path source "interpreted in multiple ways",
            # integer columns in the inferred schema) say nothing about these files
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(pd.read_parquet(file), source=str(file.resolve()),
                                              name=f"{category}-{split}")
            # the schema is inferred (and hinted about) when the dataset is logged
            mlflow.log_input(dataset, context="training" if split == "train" else split)
        digests.append(dataset.digest)
    return digests


def log_metrics(metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
    import mlflow

    mlflow.log_metrics(metric_names(metrics, prefix), step=step)


def metric_names(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """MLflow's names for `metrics` (`@` spelled `_at_`) under `prefix`."""
    return {f"{prefix}{k}".replace("@", "_at_"): float(v) for k, v in metrics.items()}


def log_evaluation(
    run_id: str, results: dict[str, dict[str, float]], samples: list[dict[str, Any]], report_file: Path,
    root: Path | None = None, seconds: float | None = None, tags: dict[str, str] | None = None,
) -> None:
    """A trained policy's evaluation into its training run, without reopening it (its
    start and end stay those of the training): the kept model's figures under names of
    their own, `best_valid_<metric>` and `test_<metric>` (the `valid_<metric>` curves are
    the training's), the evaluation's duration (`evaluate_seconds`), the test reasoning
    samples as a table, the metrics file and `tags`."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=configure(root))
    names = {"valid": "best_valid_", "test": "test_"}
    now = int(time.time() * 1000)
    logged = {k: v for split, m in results.items() for k, v in metric_names(m, names.get(split, f"{split}_")).items()}
    if seconds is not None:
        logged["evaluate_seconds"] = round(seconds, 1)
    run = client.get_run(run_id)
    # the figures also appear on the run's logged model, the test ones against the test split
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    model_id = max(models, key=lambda m: m.creation_timestamp).model_id if models else None
    test_set = next((d.dataset for d in run.inputs.dataset_inputs if d.dataset.name.endswith("-test")), None)

    def metric(key: str, value: float) -> Metric:
        on_test = test_set is not None and key.startswith("test_")
        return Metric(key, value, now, 0, model_id=model_id, run_id=run_id,
                      dataset_name=test_set.name if on_test else None,
                      dataset_digest=test_set.digest if on_test else None)

    client.log_batch(run_id, metrics=[metric(k, v) for k, v in logged.items()],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    client.log_table(run_id, {k: [s[k] for s in samples] for k in samples[0]} if samples else {},
                     "test_reasoning_samples.json")
    client.log_artifact(run_id, str(report_file))


def finished_runs_by_method(
    experiment: str, category: str, version: str | None = None, root: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Newest FINISHED run per `rrec.method` tag for a category (and data version)."""
    import mlflow

    configure(root)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    query = f"tags.`rrec.category` = '{category}' and attributes.status = 'FINISHED'"
    if version is not None:
        query += f" and tags.`rrec.data_version` = '{version}'"
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], output_format="list"
    )
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        method = run.data.tags.get("rrec.method")
        if method and method not in out and any(k.startswith("test_") for k in run.data.metrics):
            out[method] = {"run_id": run.info.run_id, "metrics": dict(run.data.metrics)}
    return out


class RunPerModel:
    """Tracker for trainers that train several models in a row (the classic baselines):
    one MLflow run per model, tagged `rrec.method = <model name>`. A run still open when
    `close_failed` is called (the trainer raised) is ended FAILED."""

    def __init__(self, params: Params, stage: str, root: Path | None = None) -> None:
        self.params, self.stage, self.root = params, stage, root
        self._active = False

    def start(self, name: str, model_params: dict[str, Any]) -> None:
        import mlflow

        exp_id = ensure_experiment(self.params.tracking.experiment, self.root)
        mlflow.start_run(
            experiment_id=exp_id,
            run_name=name,
            tags={
                "mlflow.note.content": RUN_NOTES["baselines"].format(name=name),
                "rrec.stage": self.stage,
                "rrec.method": name,
                "rrec.category": self.params.data.category,
                "rrec.data_version": data_version(self.root),
                "mlflow.source.git.commit": git_commit(self.root),
            },
        )
        self._active = True
        log_splits(self.params.data.category, self.root)
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in model_params.items()})

    def log_epoch(self, epoch: int, loss: float, valid: dict[str, float]) -> None:
        log_metrics({"loss": loss}, step=epoch)
        log_metrics(valid, step=epoch, prefix="valid_")

    def finish(
        self, test: dict[str, float], checkpoint: Path, best_valid: dict[str, float] | None = None,
        model: Any = None,
    ) -> None:
        """The kept (best-epoch) model's figures under names of their own: `test_<metric>`
        and `best_valid_<metric>` (`valid_<metric>` is the per-epoch curve); the model as an
        MLflow PyTorch model `model` (loadable with `mlflow.pytorch.load_model`), its
        checkpoint file under `checkpoint/`."""
        import mlflow

        log_metrics(test, prefix="test_")
        log_metrics(best_valid or {}, prefix="best_valid_")
        mlflow.log_artifact(str(checkpoint), artifact_path="checkpoint")
        if model is not None:
            import mlflow.pytorch

            mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                     pip_requirements=["torch"])
        mlflow.end_run()
        self._active = False

    def close_failed(self) -> None:
        import mlflow

        if self._active:
            mlflow.end_run(status="FAILED")
            self._active = False
