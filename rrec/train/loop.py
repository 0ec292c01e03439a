"""What every trainer here shares: data order, checkpoints that resume, early stopping.

A trainer (contrastive or RecPO) provides a step function and an evaluation
function; `run_loop` owns the rest. Resuming after a crash (even SIGKILL) gives the
same result as an uninterrupted run with the same seed, because
- the data order of epoch e is a permutation seeded by (seed, e), so the position
  (epoch, batch) is enough to continue;
- a checkpoint holds the trainable weights, optimizer, scheduler and every RNG
  (accelerate's `save_state`), plus the loop's own progress (`progress.json`);
- checkpoints are written to a temporary folder and renamed, so a kill mid-write
  leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from rrec.timing import Phases

PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped: str | None = None
    mlflow_run_id: str | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d["best_metric"] = None if math.isinf(self.best_metric) else self.best_metric
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        d = json.loads(text)
        d["best_metric"] = -math.inf if d["best_metric"] is None else d["best_metric"]
        return cls(**d)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Full batches of example indices for one epoch (the incomplete tail is dropped so
    that every step sees the same number of in-batch negatives)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class Checkpoints:
    """Atomic, resumable checkpoints in `root` (only the newest `keep` are kept)."""

    def __init__(self, root: Path, accelerator: Any, keep: int = 1) -> None:
        self.root = root
        self.acc = accelerator
        self.keep = keep
        # Only trainable weights go into a checkpoint: the frozen backbone is
        # re-loaded from its own files, so a LoRA checkpoint stays small.
        self.acc.register_save_state_pre_hook(self._only_trainable)

    @staticmethod
    def _only_trainable(models: list[torch.nn.Module], weights: list[dict], _dir: str) -> None:
        if not weights:  # DeepSpeed writes its engine's own checkpoint and hands no state dicts
            return
        for model, state in zip(models, weights, strict=True):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            for name in list(state):
                if name not in trainable:
                    del state[name]

    def latest(self) -> tuple[Path, Progress] | None:
        if not self.root.exists():
            return None
        found = sorted(
            (p for p in self.root.glob("step-*") if (p / PROGRESS_FILE).exists()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        if not found:
            return None
        return found[-1], Progress.from_json((found[-1] / PROGRESS_FILE).read_text())

    def save(self, progress: Progress) -> Path:
        final = self.root / f"step-{progress.step:07d}"
        tmp = self.root / f".tmp-step-{progress.step:07d}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / PROGRESS_FILE).write_text(progress.to_json())
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.root.glob("step-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> Progress:
        # a checkpoint holds only the trainable weights (see _only_trainable); DeepSpeed's
        # loader names the same switch differently
        loose = {"load_module_strict": False} if self.acc.distributed_type == DistributedType.DEEPSPEED else {"strict": False}
        self.acc.load_state(str(path), **loose)
        return Progress.from_json((path / PROGRESS_FILE).read_text())


@dataclass
class LoopConfig:
    n_examples: int
    batch_size: int
    epochs: int
    max_steps: int | None
    eval_every: int
    checkpoint_every: int
    patience: int
    seed: int
    metric: str = "ndcg@10"
    min_steps: int = 0  # early stopping waits until this step
    # evaluate the starting weights too: a point of the curves, never the kept model
    eval_at_start: bool = False


def run_loop(
    cfg: LoopConfig,
    accelerator: Any,
    checkpoints: Checkpoints,
    step_fn: Callable[[np.ndarray, int], dict[str, float]],
    eval_fn: Callable[[int], dict[str, float]],
    on_best: Callable[[int], None],
    log_fn: Callable[[dict[str, float], int], None],
    progress: Progress | None = None,
    should_stop: Callable[[int], bool] | None = None,
    phases: Phases | None = None,
) -> Progress:
    """Train until epochs / max_steps / early stopping; evaluate every `eval_every` steps.

    `step_fn(global_batch_indices, step)` does one optimiser step and returns scalars to
    log; `eval_fn(step)` returns validation metrics; `on_best(step)` saves the best model.
    `should_stop(step)` is a test hook to simulate a crash right after a step.
    `phases` sums the time of the steps, evaluations, best-model saves, checkpoints and
    logging (never deciding anything).
    """
    progress = progress or Progress()
    phase = phases or Phases("train")
    per_epoch = cfg.n_examples // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"train split has {cfg.n_examples} examples, fewer than one batch of {cfg.batch_size}"
        )
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    bar = tqdm(total=total, initial=progress.step, desc="train", disable=not accelerator.is_main_process)

    def record_eval() -> dict[str, float]:
        with phase("evaluations"):
            metrics = eval_fn(progress.step)
        # the probe's training reward keeps its name; the rest is validation
        with phase("logging"):
            log_fn({k if k.startswith("train_") else f"valid_{k}": v for k, v in metrics.items()}, progress.step)
        progress.evals.append({"step": progress.step, **metrics})
        return metrics

    def evaluate_now() -> bool:
        value = record_eval()[cfg.metric]
        if value > progress.best_metric:
            progress.best_metric, progress.best_step, progress.bad_evals = value, progress.step, 0
            with phase("best-model saves"):
                on_best(progress.step)
        else:
            progress.bad_evals += 1
        return progress.bad_evals >= cfg.patience and progress.step >= cfg.min_steps

    if cfg.eval_at_start and progress.step == 0 and not progress.evals:
        record_eval()
    while progress.stopped is None:
        if progress.epoch >= cfg.epochs:
            progress.stopped = "epochs"
            break
        batches = epoch_batches(cfg.n_examples, cfg.batch_size, cfg.seed, progress.epoch)
        while progress.batch_in_epoch < len(batches):
            with phase("training steps"):
                logs = step_fn(batches[progress.batch_in_epoch], progress.step)
            progress.step += 1
            progress.batch_in_epoch += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(logs.items())[:3]})
            with phase("logging"):
                log_fn(logs, progress.step)
            if progress.step % cfg.eval_every == 0 and evaluate_now():
                progress.stopped = "early_stopping"
            elif cfg.max_steps is not None and progress.step >= cfg.max_steps:
                progress.stopped = "max_steps"
            if progress.stopped or progress.step % cfg.checkpoint_every == 0:
                with phase("checkpoints"):
                    checkpoints.save(progress)
            if progress.stopped:
                break
            if should_stop is not None and should_stop(progress.step):
                raise KeyboardInterrupt(f"stopped by test hook after step {progress.step}")
        else:
            progress.epoch += 1
            progress.batch_in_epoch = 0
    if progress.best_step < 0 or (progress.evals and progress.evals[-1]["step"] != progress.step and progress.stopped != "early_stopping"):
        # make sure the last weights were evaluated at least once
        evaluate_now()
        with phase("checkpoints"):
            checkpoints.save(progress)
    bar.close()
    return progress
