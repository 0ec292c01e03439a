"""Where the tracking store is, and whether it answers: the check every stage makes before
it deletes or computes anything (`rrec.stages.stage_main`), so that a full `dvc repro`
with a tracking server that is down stops at its first stage, not after the data, the
backbone and the item table were computed. Kept apart from `rrec.tracking` (which every
stage would otherwise have to list as a DVC dependency) and free of MLflow imports.
"""

from __future__ import annotations

import os
from pathlib import Path


def store_dir(root: Path | None = None) -> Path:
    return (root or Path.cwd()) / "mlflow"


def tracking_uri(root: Path | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = store_dir(root).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; the message says which and what to do."""


_REACHED: set[str] = set()


def require_reachable(root: Path | None = None, timeout_s: float = 5.0) -> str:
    """Check, in seconds, that the tracking store answers; returns its URI.

    Stages call this before any work, so that a tracking server that is down stops a
    stage at once with a clear message instead of after minutes of computing and MLflow's
    own retries. A local store only needs its folder to be writable."""
    uri = tracking_uri(root)
    if uri in _REACHED:
        return uri
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as err:
            raise TrackingUnavailable(
                f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer "
                f"({type(err).__name__}); start it, point MLFLOW_TRACKING_URI at a running one, "
                "or unset it to track into the project's own store (mlflow/)"
            ) from None
        if answer.status_code >= 500:
            raise TrackingUnavailable(
                f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) answers HTTP "
                f"{answer.status_code}; check its log, or unset MLFLOW_TRACKING_URI to use mlflow/"
            )
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingUnavailable(f"{folder}: cannot create the MLflow store there ({err.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise TrackingUnavailable(f"{folder}: the MLflow store is not writable")
    _REACHED.add(uri)
    return uri
