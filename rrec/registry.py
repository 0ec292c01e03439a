"""The MLflow model registry: one registered model per category, a champion and a challenger.

Every trained model becomes a new version of `rrec-<category>` and takes the
`challenger` alias. It takes the `champion` alias only if its run's test NDCG@10 is
strictly higher than the current champion's; a replaced champion keeps tags saying
which version replaced it and when.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rrec.tracking import configure

log = logging.getLogger(__name__)

MODEL_NAME = "recommender"  # the artifact path a trained run logs its MLflow model under
CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC = "test_ndcg_at_10"
REPLACED_BY_TAG = "rrec.replaced_by"
REPLACED_AT_TAG = "rrec.replaced_at"
# on a run: the digest of the test split its test metrics were measured on
SPLIT_TAG = "rrec.test_split_digest"


def model_name(category: str) -> str:
    return f"rrec-{category}"


def _client(root: Path | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=configure(root))


def register_run_model(
    run_id: str,
    artifact_path: str,
    category: str,
    root: Path | None = None,
    tags: dict[str, str] | None = None,
) -> int:
    """Register the model at `artifact_path` of run `run_id` as a new version of
    `rrec-<category>`; returns the version number. A run that already has a version
    of that model gets that version back instead of a second one.

    An MLflow model (logged with `log_model(name=artifact_path)`) is registered as such;
    plain files logged under `artifact_path` (e.g. a LoRA adapter) are registered from
    the run's artifact location."""
    client = _client(root)
    name = model_name(category)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return min(int(mv.version) for mv in existing)
    version = _register(client, run_id, artifact_path, name, tags)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=MODEL_DESCRIPTION.format(category=category))
    tags = tags or {}
    client.update_model_version(name, str(version), description=(
        f"{tags.get('rrec.method', 'model')} trained in run {run_id}"
        + (f", window ending {tags['rrec.window_end']}" if "rrec.window_end" in tags else "")
    ))
    return version


MODEL_DESCRIPTION = (
    "rrec recommender for the {category} catalogue: predict takes records with `history` "
    "(item ids, oldest first) and optional `k`; returns the top-k items with the reasoning. "
    "`champion` serves; `challenger` is the newest trained version."
)


def _register(client: MlflowClient, run_id: str, artifact_path: str, name: str, tags: dict[str, str] | None) -> int:
    files = {Path(f.path).name for f in client.list_artifacts(run_id, artifact_path)}
    if not files or "MLmodel" in files:
        # MLflow 3 resolves runs:/ to the logged model of that name when the run's own
        # artifacts do not hold it, and fails naming the run when there is none.
        mv = mlflow.register_model(f"runs:/{run_id}/{artifact_path}", name, tags=tags)
        return int(mv.version)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return int(mv.version)


def set_alias(name: str, alias: str, version: int | str, root: Path | None = None) -> None:
    _client(root).set_registered_model_alias(name, alias, str(version))


def tag_version(name: str, version: int | str, key: str, value: str, root: Path | None = None) -> None:
    _client(root).set_model_version_tag(name, str(version), key, value)


def model_version_by_alias(name: str, alias: str, root: Path | None = None) -> ModelVersion | None:
    """The model version `alias` points to (its run id, tags, ...); None when there is none."""
    try:
        return _client(root).get_model_version_by_alias(name, alias)
    except MlflowException:  # no such registered model, or no such alias
        return None


def version_method(version: ModelVersion, root: Path | None = None) -> str | None:
    """The method (`rrec.method`) of a version: its tag, else its run's."""
    if version.tags.get("rrec.method"):
        return version.tags["rrec.method"]
    return _client(root).get_run(version.run_id).data.tags.get("rrec.method") if version.run_id else None


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:  # no such registered model, or no such alias
        return None


def run_metric(run_id: str, metric: str = METRIC, root: Path | None = None) -> float | None:
    """The metric's last value on a run (None if never logged)."""
    return _client(root).get_run(run_id).data.metrics.get(metric)


def version_metric(
    name: str, version: int | str, metric: str = METRIC, root: Path | None = None
) -> float | None:
    """The metric's last value on the run behind a model version (None if not logged)."""
    mv = _client(root).get_model_version(name, str(version))
    return run_metric(mv.run_id, metric, root) if mv.run_id else None


def split_digest(split_file: Path, max_users: int | None = None, seed: int = 0) -> str:
    """What a test figure was measured on: the split file's bytes and the users sampled
    from it (`evaluate.max_users`, `seed`), as 16 hex digits."""
    h = hashlib.sha256(Path(split_file).read_bytes())
    h.update(f"max_users={max_users};seed={seed if max_users is not None else ''}".encode())
    return h.hexdigest()[:16]


def version_split(name: str, version: int | str, root: Path | None = None) -> str | None:
    """The test split digest the run behind a version was scored on (None: not recorded)."""
    client = _client(root)
    mv = client.get_model_version(name, str(version))
    return client.get_run(mv.run_id).data.tags.get(SPLIT_TAG) if mv.run_id else None


def champion_version(name: str, root: Path | None = None) -> int | None:
    return _version_by_alias(_client(root), name, CHAMPION)


def champion_metric(name: str, metric: str = METRIC, root: Path | None = None) -> float | None:
    """The metric of the run behind the `champion` alias; None when there is no champion
    (or its run never logged the metric)."""
    version = champion_version(name, root)
    if version is None:
        return None
    return version_metric(name, version, metric, root)


def promote_if_better(
    name: str, version: int | str, metric: str = METRIC, root: Path | None = None,
    *, champion_value: float | None = None, challenger_value: float | None = None,
) -> bool:
    """Make `version` the challenger, and the champion if its metric strictly beats the
    champion's (or there is no champion yet). Returns whether it became the champion.

    The two figures must be measured on the same test split: `champion_value` and
    `challenger_value` are the two models' figures on one split; without them, the champion's recorded
    figure is used only when both runs recorded the same split (`SPLIT_TAG`, or neither
    did), else the champion is kept and the challenger waits for a comparison on one split
    (the retraining flow scores the champion on the new split)."""
    client = _client(root)
    version = int(version)
    challenger = challenger_value if challenger_value is not None else version_metric(name, version, metric, root)
    if challenger is None:
        raise ValueError(
            f"model {name} version {version}: its run has no metric {metric!r}, so it cannot "
            f"be compared with the champion; the evaluate stage logs test metrics onto the "
            f"training run (run `dvc repro evaluate`)"
        )
    current = _version_by_alias(client, name, CHAMPION)
    if current == version:
        log.info("%s version %d is already the champion", name, version)
        return False
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    if current is not None and champion_value is None:
        ours, theirs = version_split(name, version, root), version_split(name, current, root)
        if ours != theirs:
            log.warning("%s: champion v%d was scored on test split %s, challenger v%d on %s; not compared "
                        "here (the retraining flow scores the champion on the new split)",
                        name, current, theirs, version, ours)
            return False
    best = champion_value if champion_value is not None else (
        None if current is None else version_metric(name, current, metric, root))
    if current is not None and best is None:
        log.warning("%s champion version %d has no %s; replacing it", name, current, metric)
    if best is not None and not challenger > best:
        log.info("%s: challenger v%d %s=%.6g does not beat champion v%d (%.6g); keeping the champion",
                 name, version, metric, challenger, current, best)
        return False
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if current is not None:
        client.set_model_version_tag(name, str(current), REPLACED_BY_TAG, str(version))
        client.set_model_version_tag(
            name, str(current), REPLACED_AT_TAG, dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        )
    log.info("%s: version %d (%s=%.6g) is the champion now (was %s)",
             name, version, metric, challenger, current)
    return True


def register_and_promote(run_id: str, category: str, tags: dict[str, str], root: Path | None = None) -> dict[str, object]:
    """Register the model a training run logged as a version of `rrec-<category>` (alias
    `challenger`) and make it `champion` only if its test NDCG@10 beats the champion's.
    Returns {model, version, champion}: whether that version is the champion now."""
    name = model_name(category)
    version = register_run_model(run_id, MODEL_NAME, category, root, tags=tags)
    promoted = promote_if_better(name, version, root=root)
    return {"model": name, "version": version, "champion": promoted or champion_version(name, root) == version}
