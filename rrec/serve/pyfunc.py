"""The recommender as an MLflow `python_function` model.

Artifacts (copied into the model by MLflow): `backbone` (the tiny backbone's directory, or
for a Hub / local-path backbone the directory holding its `backbone.json` reference, whose
weights then load from the HF cache or that path), `adapter`, `tokenizer`, `item_table`,
`catalogue` (items Parquet, with the removed flags of catalogue updates), `params` (the
validated params as YAML) and `summary` (train_summary.json). `load_context` builds a
`Recommender` from them.

Input: a DataFrame (REST `{"dataframe_records": [...]}` or `"dataframe_split"`), a list
of objects (`{"inputs": [...]}`) or one object, each with a `history` (item ids, or
objects with item_id | parent_asin | title, rating, timestamp in ms), optional `k`
(default 10) and optional `now` (ms). Output: one object per input,
`{"reasoning": str, "items": [{"item_id", "parent_asin", "title", "score"}, ...]}`.

A request that cannot be served (unknown item, empty history, malformed body) raises an
`MlflowException` with `INVALID_PARAMETER_VALUE`, which `mlflow models serve` answers
with HTTP 400 and the message.

Serve a registered version with
`mlflow models serve -m models:/rrec-<category>@champion --env-manager local -h 127.0.0.1 -p PORT`
from an environment where `rrec` is installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from rrec import tracking
from rrec.config import Params, load_params
from rrec.model.loading import ADAPTER_DIR, TOKENIZER_DIR, TRAIN_SUMMARY
from rrec.paths import Paths
from rrec.registry import MODEL_NAME
from rrec.serve.recommend import DEFAULT_K, Recommender, RequestError, serving_files

MODEL_CODE = Path(__file__).with_name("model_code.py")
REQUEST_KEYS = ("history", "k", "now")
_REQUIREMENTS = (
    "mlflow", "torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors",
    "pandas", "pyarrow", "duckdb", "pydantic", "pyyaml", "tqdm",
)


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def request_rows(model_input: Any) -> list[dict[str, Any]]:
    """The requests in a pyfunc input (DataFrame, list of objects or one object)."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, Mapping):
        rows = [dict(model_input)]
    elif isinstance(model_input, list):
        rows = model_input
    else:
        raise _bad(
            f"the input must be a list of objects with a 'history' field, got "
            f"{type(model_input).__name__}; send {{\"dataframe_records\": [{{\"history\": [12, 40], \"k\": 10}}]}}"
        )
    if not rows:
        raise _bad("the input holds no requests; send at least one object with a 'history' field")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise _bad(f"request {i}: must be an object with a 'history' field, got {row!r}")
        unknown = sorted(set(map(str, row)) - set(REQUEST_KEYS))
        if unknown:
            raise _bad(f"request {i}: unknown field(s) {unknown}; the fields are {list(REQUEST_KEYS)}")
        if _missing(row.get("history")):
            raise _bad(f"request {i}: no 'history' field (a list of item ids or of objects)")
        out.append({key: row.get(key) for key in REQUEST_KEYS})
    return out


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """`python_function` wrapper around `Recommender` (see the module docstring)."""

    def __init__(self) -> None:
        self.recommender: Recommender | None = None

    def load_context(self, context: Any) -> None:
        a = context.artifacts
        params = load_params(a["params"])
        self.recommender = Recommender.from_parts(
            params,
            backbone_dir=Path(a["backbone"]),
            adapter_dir=Path(a["adapter"]),
            table_dir=Path(a["item_table"]),
            catalogue_file=Path(a["catalogue"]),
            summary_file=Path(a["summary"]),
            tokenizer_dir=Path(a["tokenizer"]),
        )
        if params.model.aot_single_requests and self.recommender.reasoning:
            # build it now rather than on the first request (seconds on a CPU)
            self.recommender.model.aot_decoder(params.evaluate.max_new_tokens)

    # The DataFrame hint is one MLflow does not turn into an enforced schema, so every body
    # format reaches `request_rows`, which validates it with messages about this model's fields.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        if self.recommender is None:
            raise RuntimeError("the model was not loaded (load it with mlflow.pyfunc.load_model)")
        rows = request_rows(model_input)
        try:
            recs = self.recommender.recommend(
                [r["history"] for r in rows],
                k=[DEFAULT_K if _missing(r["k"]) else r["k"] for r in rows],
                now_ms=[None if _missing(r["now"]) else r["now"] for r in rows],
            )
        except RequestError as err:
            raise _bad(str(err)) from err
        return [r.as_dict() for r in recs]


# ------------------------------------------------------------------- logging


def load_recommender(model_uri: str) -> Recommender:
    """The `Recommender` inside an MLflow model logged by `log_pyfunc`."""
    inner = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    if not isinstance(inner, RecommenderModel) or inner.recommender is None:
        raise TypeError(f"{model_uri}: not an rrec recommender model (log it with rrec.serve.pyfunc)")
    return inner.recommender


# Shown with the model in MLflow and used by `mlflow models serve`'s example request. No
# signature is declared: MLflow would enforce it and change what a request may be (one
# object, histories of objects, `k` on some rows only); the predict method checks input.
INPUT_EXAMPLE = [{"history": [0, 1, 2], "k": 5}]


def _requirements() -> list[str]:
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            out.append(name)
    return out


def _artifacts(params: Params, paths: Paths, method: str, updates: Path | None, tmp: Path) -> dict[str, str]:
    trained = paths.trained(method)
    table_dir, catalogue_file = serving_files(paths, method, updates)
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    artifacts = {
        "backbone": paths.backbone,
        "adapter": trained / ADAPTER_DIR,
        "tokenizer": trained / TOKENIZER_DIR,
        "item_table": table_dir,
        "catalogue": catalogue_file,
        "params": params_file,
        "summary": trained / TRAIN_SUMMARY,
    }
    for name, path in artifacts.items():
        if not path.exists():
            raise FileNotFoundError(f"{path}: needed for the model's {name!r} artifact; run the train stage first")
    return {k: str(v) for k, v in artifacts.items()}


def save_pyfunc(params: Params, paths: Paths, method: str, out_dir: Path, *, updates: Path | None = None) -> Path:
    """Write the MLflow model to a local directory (no tracking server involved)."""
    with tempfile.TemporaryDirectory(prefix="rrec-pyfunc-") as tmp:
        mlflow.pyfunc.save_model(
            path=str(out_dir),
            python_model=str(MODEL_CODE),
            artifacts=_artifacts(params, paths, method, updates, Path(tmp)),
            pip_requirements=_requirements(),
            metadata={"rrec_method": method, "category": params.data.category},
            input_example=INPUT_EXAMPLE,
            signature=False,
        )
    return Path(out_dir)


def _run_exists(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


def log_pyfunc(
    params: Params,
    paths: Paths,
    method: str,
    registered_model_name: str | None = None,
    *,
    run_id: str | None = None,
    updates: Path | None = None,
) -> str:
    """Log the trained `method` (with its catalogue updates, if any) as an MLflow model and
    return its URI: `models:/<name>/<version>` when `registered_model_name` is given (use
    `rrec.registry.model_name(category)` for `rrec-<category>`), else `models:/<model id>`.

    It goes into `run_id`, else into the method's training run (so a registered version
    carries the run's test metrics, which `rrec.registry.promote_if_better` compares),
    else into a new run of the `serve` stage."""
    tracking.configure(paths.root)
    if run_id is None:
        summary = json.loads((paths.trained(method) / TRAIN_SUMMARY).read_text())
        run_id = summary.get("mlflow_run_id") if _run_exists(summary.get("mlflow_run_id")) else None
    with tempfile.TemporaryDirectory(prefix="rrec-pyfunc-") as tmp:
        artifacts = _artifacts(params, paths, method, updates, Path(tmp))
        active = mlflow.active_run()
        # a finished run keeps its end (its duration is its training's) when a model is added
        ended = None if run_id is None or (active is not None and active.info.run_id == run_id) \
            else mlflow.get_run(run_id).info
        run_cm = (
            contextlib.nullcontext()
            if active is not None and active.info.run_id == run_id
            else mlflow.start_run(run_id=run_id)
            if run_id is not None
            else tracking.start_run(params, "serve", run_name=f"serve-{method}",
                                    tags={"rrec.served_method": method}, root=paths.root)
        )
        with run_cm:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                pip_requirements=_requirements(),
                metadata={"rrec_method": method, "category": params.data.category},
                input_example=INPUT_EXAMPLE,
                signature=False,
                registered_model_name=registered_model_name,
            )
        if ended is not None and ended.end_time:
            mlflow.MlflowClient().set_terminated(run_id, ended.status, ended.end_time)
    if registered_model_name is not None and info.registered_model_version is not None:
        return f"models:/{registered_model_name}/{info.registered_model_version}"
    return info.model_uri


CATALOGUE_OF_TAG = "rrec.catalogue_update_of"


def publish_catalogue(params: Params, paths: Paths, method: str, updates: Path, alias: str) -> str:
    """Make a catalogue change reach what is served: register the trained `method` with the
    updated table and catalogue in `updates` as a new version of `rrec-<category>` (in the
    same training run, so it keeps that run's test metrics) and move `alias` to it.
    Returns the new version's URI. A server started on `models:/rrec-<category>@<alias>`
    loads the new version when it is restarted.

    Refuses when `alias` serves a model trained in another run than the local one: moving
    it would replace that model, not update its catalogue."""
    from rrec import registry

    name = registry.model_name(params.data.category)
    summary = json.loads((paths.trained(method) / TRAIN_SUMMARY).read_text())
    current = registry.model_version_by_alias(name, alias, paths.root)
    if current is not None and current.run_id != summary.get("mlflow_run_id"):
        raise RuntimeError(
            f"{name}@{alias} is version {current.version}, trained in run {current.run_id}, not the local "
            f"{method} model (run {summary.get('mlflow_run_id')}); publish from the project that trained it, "
            f"or choose another --publish alias"
        )
    uri = log_pyfunc(params, paths, method, name, updates=updates)
    version = uri.rsplit("/", 1)[1]
    if current is not None:
        registry.tag_version(name, version, CATALOGUE_OF_TAG, str(current.version), paths.root)
    registry.set_alias(name, alias, version, root=paths.root)
    return uri
