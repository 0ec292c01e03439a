"""Training a method end to end: the setup of `rrec.train.build`, the `Trainer`
(evaluate, save the best, log) in the loop of `rrec.train.loop`, and the trained model
written to `models/trained/<method>/` (see `rrec.model.loading`).

Runs in one process or under `accelerate launch` (DDP over CPU/gloo or GPUs; a
DeepSpeed ZeRO-2 config is in `configs/`). Only the main process writes files and
talks to MLflow.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rrec.config import METHODS, Params
from rrec.items import encode_items
from rrec.metrics import pad_histories
from rrec.model.generation import policy_user_states
from rrec.model.item_table import ItemTable
from rrec.model.loading import ADAPTER_DIR, TABLE_DIR, TOKENIZER_DIR, TRAIN_SUMMARY
from rrec.model.lora import save_adapter
from rrec.paths import Paths
from rrec.prompts import UserPrompts, load_user_prompts
from rrec.ranking import evaluate_policy, item_titles, reasoning_samples
from rrec.timing import Phases
from rrec.train.build import Training, build_training
from rrec.train.loop import Checkpoints, LoopConfig, Progress, fingerprint, run_loop
from rrec.train.objectives import rewards

STEPS_LOG = "steps.jsonl"


class _StepLog:
    """Per-step scalars, appended to a JSONL file in the checkpoint folder so that a
    resumed run keeps the curve of the steps before the crash."""

    def __init__(self, path: Path, main: bool) -> None:
        self.path, self.main = path, main

    def truncate(self, last_step: int) -> None:
        if not self.main or not self.path.exists():
            return
        rows = [r for r in self.read() if r["step"] <= last_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def append(self, row: dict[str, Any]) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] if self.path.exists() else []


class _TensorState:
    """A tensor that accelerate's save_state/load_state can checkpoint in place."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"tensor": self.tensor}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensor.copy_(state["tensor"])


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys or ["step"])
        w.writeheader()
        w.writerows(rows)


class Trainer:
    """A training in the loop's terms: `step`, `evaluate` (every `train.eval_every` steps,
    on the seeded valid users, with a freshly encoded item table), `save_best` and `log`.
    Only the main process writes files and talks to MLflow."""

    def __init__(self, params: Params, paths: Paths, training: Training, ckpt_dir: Path, steps_log: _StepLog) -> None:
        tp = params.train
        self.params, self.paths, self.training, self.ckpt_dir, self.steps_log = params, paths, training, ckpt_dir, steps_log
        self.main = training.accelerator.is_main_process
        # the same seeded users for every method and every evaluation (all by default)
        self.valid_users = load_user_prompts(paths, "valid").sample_users(tp.eval_max_users, params.seed)
        # a fixed seeded sample of train users whose reward every evaluation scores again:
        # the training reward comparable across steps (the in-batch one changes batches)
        self.probe_users = (
            load_user_prompts(paths, "train").sample_users(tp.reward_probe_users, params.seed)
            if tp.reward_probe_users else None
        )
        self.titles = item_titles(paths)
        self.eval_table: ItemTable | None = None
        self.phase = Phases("train")

    def step(self, batch: Any, step: int) -> dict[str, float]:
        return self.training.step(batch, step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        from rrec import tracking

        if self.main:
            tracking.log_metrics(scalars, step=step)
            if not any(k.startswith("valid_") for k in scalars):
                self.steps_log.append({"step": step, **scalars})

    def evaluate(self, step: int) -> dict[str, float]:
        params, training, phase = self.params, self.training, self.phase
        policy = training.policy
        with phase("evaluations: item table"):
            self.eval_table = encode_items(
                policy, training.ctx.item_prompt_ids, self.ckpt_dir / "eval_table",
                batch_size=params.items.batch_size, chunk_size=params.items.chunk_size,
                meta={"backbone": params.model.backbone, "adapter": f"{training.method}@{step}"},
            )
            if training.step.table is not None:  # the whole table is re-encoded before every evaluation
                training.step.table.copy_from(self.eval_table)
        with phase("evaluations: valid users" + (" (reasoning)" if training.reasoning else "")):
            metrics, details = evaluate_policy(
                policy, self.eval_table, self.valid_users, reasoning=training.reasoning, ks=params.evaluate.ks,
                max_new_tokens=params.evaluate.max_new_tokens, batch_size=params.evaluate.batch_size,
                progress=self.main,
            )
            metrics["reward"] = self._mean_reward(details["states"], self.valid_users)
        if self.probe_users is not None:
            with phase("evaluations: train reward probe"):
                probe_states, _ = policy_user_states(
                    policy, self.probe_users.conversations, reasoning=training.reasoning,
                    max_new_tokens=params.evaluate.max_new_tokens, batch_size=params.evaluate.batch_size,
                    progress=False,
                )
                metrics["train_reward"] = self._mean_reward(probe_states, self.probe_users)
        policy.train()
        if self.main and params.train.eval_samples:
            import mlflow

            with phase("evaluations: reasoning samples"):
                rows = reasoning_samples(policy, self.eval_table, self.valid_users, details, self.titles,
                                         n=params.train.eval_samples)
                mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, f"reasoning/step_{step:06d}.json")
        return metrics

    def _mean_reward(self, states: torch.Tensor, users: UserPrompts) -> float:
        """The mean fused reward (the one RecPO optimises) of `users`' states against
        the evaluation table, encoded by the same weights."""
        assert self.eval_table is not None, "scored after the evaluation table is encoded"
        p = self.params
        r, _, _ = rewards(
            states, self.eval_table.embeddings, torch.tensor(users.targets), pad_histories(users.histories),
            p.model.tau, p.train.recpo.beta, p.train.recpo.ndcg_cutoff,
        )
        return float(r.mean())

    def save_best(self, step: int) -> None:
        if not self.main:
            return
        assert self.eval_table is not None, "save_best follows an evaluation"
        best, tmp = self.ckpt_dir / "best", self.ckpt_dir / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(self.training.policy.lm, tmp / ADAPTER_DIR)
        replace(self.eval_table, fingerprint=None).save(tmp / TABLE_DIR)
        (tmp / "best.json").write_text(json.dumps({"step": step}) + "\n")
        old = self.ckpt_dir / ".best.old"
        if best.exists():
            best.rename(old)
        tmp.rename(best)
        shutil.rmtree(old, ignore_errors=True)


def run_train(params: Params, paths: Paths, method: str, should_stop: Any = None) -> dict[str, Any]:
    """Train `method` ("contrastive" or "recpo"); resumes from its newest checkpoint."""
    from rrec import tracking

    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; expected contrastive or recpo")
    tracking.require_reachable(paths.root)
    started = time.monotonic()
    tp = params.train
    training, train_users = build_training(params, paths, method)
    accelerator = training.accelerator
    main = accelerator.is_main_process
    accelerator.register_for_checkpointing(training.ctx.scheduler)
    if training.step.table is not None:
        # the training table changes every step (refreshed rows): it is part of the checkpoint
        accelerator.register_for_checkpointing(_TensorState(training.step.table.embeddings))

    ckpt_dir = paths.checkpoints(method) / fingerprint(
        method, params.model.model_dump(mode="json"), tp.model_dump(mode="json"),
        params.evaluate.model_dump(mode="json"), tracking.data_version(paths.root), len(train_users),
    )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(ckpt_dir, accelerator)
    progress = Progress()
    found = checkpoints.latest()
    if found is not None:
        progress = checkpoints.load(found[0])
        if main:
            print(f"resuming {method} from {found[0]} (step {progress.step})")
    steps_log = _StepLog(ckpt_dir / STEPS_LOG, main)
    steps_log.truncate(progress.step)
    trainer = Trainer(params, paths, training, ckpt_dir, steps_log)

    run_cm = (
        tracking.start_run(
            params, "train", run_name=method, tags={"rrec.method": method}, root=paths.root,
            run_id=progress.mlflow_run_id,
        )
        if main
        else contextlib.nullcontext()
    )
    with run_cm as run:
        if main:
            progress.mlflow_run_id = run.info.run_id
        cfg = LoopConfig(
            n_examples=len(train_users), batch_size=tp.batch_size, epochs=tp.epochs, max_steps=tp.steps_for(method),
            eval_every=tp.eval_every, checkpoint_every=tp.checkpoint_every, patience=tp.patience, seed=tp.seed,
            min_steps=tp.min_steps, eval_at_start=True,
        )
        progress = run_loop(
            cfg, accelerator, checkpoints, trainer.step, trainer.evaluate, trainer.save_best, trainer.log,
            progress=progress, should_stop=should_stop, phases=trainer.phase,
        )
        accelerator.wait_for_everyone()
        summary: dict[str, Any] = {}
        if main:
            summary = _finish(params, paths, method, training, ckpt_dir / "best", progress, steps_log, started)
            _report_time_split(trainer.phase)
    accelerator.wait_for_everyone()
    return summary


def _report_time_split(phases: Phases) -> None:
    """Where this process's time went (steps, evaluations and their parts, saves,
    checkpoints, logging), printed and logged to the MLflow run as `time_s/<phase>`."""
    from rrec import tracking

    print(phases.table(), flush=True)
    tracking.log_metrics({re.sub(r"[^a-z0-9]+", "_", n.lower()).strip("_"): round(v, 2)
                          for n, v in phases.seconds.items()}, prefix="time_s/")


def _finish(
    params: Params, paths: Paths, method: str, training: Training, best: Path,
    progress: Progress, steps_log: _StepLog, started: float,
) -> dict[str, Any]:
    out = paths.trained(method)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best / ADAPTER_DIR, tmp / ADAPTER_DIR)
    shutil.copytree(best / TABLE_DIR, tmp / TABLE_DIR)
    training.policy.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    best_eval = next((e for e in progress.evals if e["step"] == progress.best_step), {})
    summary = {
        "method": method,
        "backbone": params.model.backbone,
        "best_step": progress.best_step,
        "steps": progress.step,
        "stopped": progress.stopped,
        "best_valid": {k: v for k, v in best_eval.items() if k != "step"},
        "mlflow_run_id": progress.mlflow_run_id,
        "world_size": training.ctx.world,
        "seconds_this_process": round(time.monotonic() - started, 1),
    }
    (tmp / TRAIN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)

    report_dir = paths.eval_report(method)
    _write_csv(report_dir / "train_curves.csv", steps_log.read())
    _write_csv(report_dir / "valid_curves.csv", progress.evals)
    return summary
