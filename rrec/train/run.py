"""The `train` stage: set up the policy, data, optimiser and tracking, run the loop,
and write `models/trained/<method>/` (see `rrec.model.loading`).

Runs in one process or under `accelerate launch` (DDP over CPU/gloo or GPUs; a
DeepSpeed ZeRO-2 config is in `configs/`). Only the main process writes files and
talks to MLflow.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_constant_schedule_with_warmup

from rrec.config import Params
from rrec.items import encode_items, read_item_prompts
from rrec.model.generation import make_engine
from rrec.model.item_table import load_item_table, save_item_table
from rrec.model.loading import (
    ADAPTER_DIR,
    TABLE_DIR,
    TOKENIZER_DIR,
    TRAIN_SUMMARY,
    new_policy,
    start_from_trained,
)
from rrec.model.lora import save_adapter
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.ranking import evaluate_policy, item_titles, reasoning_samples
from rrec.train.loop import Checkpoints, LoopConfig, Progress, fingerprint, run_loop
from rrec.train.steps import ContrastiveStep, RecPOStep, StepContext

STEPS_LOG = "steps.jsonl"


def make_optimizer(model: torch.nn.Module, params: Params) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; bitsandbytes' paged 8-bit AdamW on a GPU
    when it is installed (the paper's memory setting)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if torch.cuda.is_available():
        with contextlib.suppress(ImportError):
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(trainable, lr=params.train.lr, weight_decay=params.train.weight_decay)
    return torch.optim.AdamW(trainable, lr=params.train.lr, weight_decay=params.train.weight_decay)


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


def run_train(params: Params, paths: Paths, method: str, should_stop: Any = None) -> dict[str, Any]:
    """Train `method` ("contrastive" or "recpo"); resumes from its newest checkpoint."""
    from rrec import tracking

    if method not in ("contrastive", "recpo"):
        raise ValueError(f"unknown training method {method!r}; expected contrastive or recpo")
    tracking.require_reachable(paths.root)
    started = time.monotonic()
    tp = params.train
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    main = accelerator.is_main_process
    set_seed(tp.seed)

    rec = new_policy(params, paths, device=accelerator.device)
    start = paths.trained("contrastive") if method == "recpo" and tp.recpo.init == "contrastive" else None
    if start is not None:
        start_from_trained(rec, start)
    train_users = load_user_prompts(paths, "train")
    # the same seeded users for every method and every evaluation (all by default)
    valid_users = load_user_prompts(paths, "valid").sample_users(tp.eval_max_users, params.seed)
    titles = item_titles(paths)
    item_ids = rec.item_prompt_ids(read_item_prompts(paths.item_prompts_file))
    reasoning = method == "recpo"
    user_ids = rec.user_prompt_ids(train_users.conversations, answer=not reasoning)

    optimizer = make_optimizer(rec, params)
    scheduler = get_constant_schedule_with_warmup(optimizer, tp.warmup_steps)
    model, optimizer = accelerator.prepare(rec, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    table_ref: dict[str, torch.Tensor] = {}
    if reasoning:
        table_ref["train"] = load_item_table(start / TABLE_DIR if start is not None else paths.item_table)
        # the training table changes every step (refreshed rows): it is part of the checkpoint
        accelerator.register_for_checkpointing(_TensorState(table_ref["train"]))

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

    ctx = StepContext(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, params=params,
        user_prompt_ids=user_ids, histories=train_users.histories, targets=train_users.targets,
        item_prompt_ids=item_ids,
    )
    if reasoning:
        engine = make_engine(
            tp.rollout.engine, temperature=tp.rollout.temperature, top_k=tp.rollout.top_k,
            max_new_tokens=tp.rollout.max_new_tokens, model_ref=params.model.backbone,
            batch_size=max(tp.micro_batch_size, 1) * tp.rollout.group_size,
        )
        step_fn: Any = RecPOStep(ctx, engine, table_ref["train"])
    else:
        step_fn = ContrastiveStep(ctx)

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

        def log_fn(scalars: dict[str, float], step: int) -> None:
            if main:
                tracking.log_metrics(scalars, step=step)
                if not any(k.startswith("valid_") for k in scalars):
                    steps_log.append({"step": step, **scalars})

        def eval_fn(step: int) -> dict[str, float]:
            policy = ctx.policy
            table = encode_items(
                policy, item_ids, ckpt_dir / "eval_table", batch_size=params.items.batch_size,
                chunk_size=params.items.chunk_size, meta={"backbone": params.model.backbone, "adapter": f"{method}@{step}"},
            )
            table_ref["eval"] = table
            if reasoning:  # SPEC: the whole table is re-encoded before every evaluation
                table_ref["train"].copy_(table)
            metrics, details = evaluate_policy(
                policy, table, valid_users, reasoning=reasoning, ks=params.evaluate.ks,
                max_new_tokens=params.evaluate.max_new_tokens, batch_size=params.evaluate.batch_size,
                progress=main,
            )
            policy.train()
            if main and tp.eval_samples:
                import mlflow

                rows = reasoning_samples(policy, table, valid_users, details, titles, n=tp.eval_samples)
                mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, f"reasoning/step_{step:06d}.json")
            return metrics

        def on_best(step: int) -> None:
            if not main:
                return
            best, tmp = ckpt_dir / "best", ckpt_dir / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(ctx.policy.lm, tmp / ADAPTER_DIR)
            save_item_table(table_ref["eval"], tmp / TABLE_DIR, backbone=params.model.backbone, adapter=f"{method}@{step}")
            (tmp / "best.json").write_text(json.dumps({"step": step}) + "\n")
            old = ckpt_dir / ".best.old"
            if best.exists():
                best.rename(old)
            tmp.rename(best)
            shutil.rmtree(old, ignore_errors=True)

        cfg = LoopConfig(
            n_examples=len(train_users), batch_size=tp.batch_size, epochs=tp.epochs, max_steps=tp.steps_for(method),
            eval_every=tp.eval_every, checkpoint_every=tp.checkpoint_every, patience=tp.patience, seed=tp.seed,
        )
        progress = run_loop(
            cfg, accelerator, checkpoints, step_fn, eval_fn, on_best, log_fn, progress=progress,
            should_stop=should_stop,
        )
        accelerator.wait_for_everyone()
        summary: dict[str, Any] = {}
        if main:
            summary = _finish(params, paths, method, ctx, ckpt_dir, ckpt_dir / "best", progress, steps_log, started)
    accelerator.wait_for_everyone()
    return summary


def _finish(
    params: Params, paths: Paths, method: str, ctx: StepContext, ckpt_dir: Path, best: Path,
    progress: Progress, steps_log: _StepLog, started: float,
) -> dict[str, Any]:
    out = paths.trained(method)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best / ADAPTER_DIR, tmp / ADAPTER_DIR)
    shutil.copytree(best / TABLE_DIR, tmp / TABLE_DIR)
    ctx.policy.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    best_eval = next((e for e in progress.evals if e["step"] == progress.best_step), {})
    summary = {
        "method": method,
        "backbone": params.model.backbone,
        "best_step": progress.best_step,
        "steps": progress.step,
        "stopped": progress.stopped,
        "best_valid": {k: v for k, v in best_eval.items() if k != "step"},
        "mlflow_run_id": progress.mlflow_run_id,
        "world_size": ctx.world,
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
