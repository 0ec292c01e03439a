"""`python -m rrec.stages.train --method M` (DVC stage `train@M`): train the contrastive
model or RecPO (`models/trained/<method>/`, curves in `reports/eval/<method>/`), in one
MLflow run that also holds the trained policy as an MLflow model ("recommender": the
backbone or its reference, the LoRA adapter, tokenizer, item table and catalogue), so
that a registered version loads and serves without the working tree."""

from __future__ import annotations

from typing import Any

import mlflow

from rrec import tracking
from rrec.config import Params
from rrec.paths import Paths
from rrec.serve.pyfunc import log_pyfunc
from rrec.stages import run
from rrec.train.run import run_train


def log_trained_model(params: Params, paths: Paths, method: str, summary: dict[str, Any]) -> None:
    run_id = summary["mlflow_run_id"]
    tracking.configure(paths.root)
    with mlflow.start_run(run_id=run_id):
        # the model just trained, with its own table and the window's items: catalogue
        # updates in models/serving/ were made for an earlier training
        log_pyfunc(params, paths, method, run_id=run_id, updates=paths.trained(method))
        mlflow.set_tags({"rrec.best_step": str(summary["best_step"]), "rrec.stopped": str(summary["stopped"])})
        for name in ("train_curves.csv", "valid_curves.csv"):
            f = paths.eval_report(method) / name
            if f.exists():
                mlflow.log_artifact(str(f))


def train_stage(params: Params, paths: Paths, method: str) -> dict[str, Any]:
    summary = run_train(params, paths, method)
    if summary:  # the main process of a multi-process run
        log_trained_model(params, paths, method, summary)
    return summary


if __name__ == "__main__":
    run("train", train_stage, with_method=True, torch_threads=True)
