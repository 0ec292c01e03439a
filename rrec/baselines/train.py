"""Train and evaluate the sequential baselines on the window stage's splits.

Cross-entropy of the next item over all items, AdamW, early stopping on valid
NDCG@10, a wall-clock budget per model; metrics by the shared full-ranking code
(`rrec.metrics.evaluate_scorer`, the history masked).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rrec.atomic import atomic_path
from rrec.baselines.base import SequentialRecommender
from rrec.baselines.data import SequenceData, left_pad, load_n_items, load_split
from rrec.baselines.models import MODEL_NAMES, build_model, model_config
from rrec.config import Params
from rrec.metrics import evaluate_scorer
from rrec.paths import Paths

MONITOR = "ndcg@10"


class Tracker(Protocol):
    """What `train_baseline` reports to (the integrator wires it to MLflow)."""

    def start(self, name: str, params: dict[str, Any]) -> None: ...

    def log_epoch(self, epoch: int, loss: float, valid: dict[str, float]) -> None: ...

    def finish(
        self, test: dict[str, float], checkpoint: Path, best_valid: dict[str, float], model: torch.nn.Module,
    ) -> None: ...


@dataclass
class EpochRecord:
    epoch: int
    loss: float  # mean training cross-entropy over the epoch's batches
    valid: dict[str, float]
    seconds: float  # training time of this epoch, evaluation excluded


@dataclass
class BaselineResult:
    name: str
    test: dict[str, float]
    best_valid: dict[str, float]
    best_epoch: int
    epochs: list[EpochRecord]
    train_seconds: float  # training and validation, test evaluation excluded
    stopped_early: str | None  # why training ended before `baselines.epochs`, or None
    checkpoint: Path
    n_parameters: int
    device: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint"] = str(self.checkpoint)
        return out


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_scorer(
    model: SequentialRecommender, seqs: torch.Tensor, device: torch.device
) -> Callable[[list[int]], torch.Tensor]:
    """`score_fn` for `evaluate_scorer`: the model's scores for rows `idx` of `seqs`."""

    def score(idx: list[int]) -> torch.Tensor:
        return model(seqs[idx].to(device))

    return score


def evaluate_model(
    model: SequentialRecommender,
    data: SequenceData,
    max_len: int,
    ks: list[int],
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        seqs = left_pad(data.histories, max_len, model.pad_id)
        return evaluate_scorer(
            model_scorer(model, seqs, device), data.histories, data.targets, ks, batch_size, progress
        )
    finally:
        model.train(was_training)


def train_epoch(
    model: SequentialRecommender,
    optimizer: torch.optim.Optimizer,
    seqs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    desc: str = "train",
    progress: bool = True,
) -> float:
    """One shuffled pass over every batch; returns the mean loss."""
    model.train()
    order = torch.randperm(len(targets), generator=generator)
    total, batches = 0.0, 0
    bar = tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False, disable=not progress)
    for start in bar:
        idx = order[start : start + batch_size]
        logits = model(seqs[idx].to(device))
        loss = F.cross_entropy(logits, targets[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        batches += 1
        bar.set_postfix(loss=f"{total / batches:.4f}", refresh=False)
    bar.close()
    return total / max(batches, 1)


def _save(obj: dict[str, Any], path: Path) -> None:
    """Write-then-rename, so an interrupted run never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train_baseline(
    name: str,
    params: Params,
    paths: Paths,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> BaselineResult:
    """Train baseline `name` on train, select on valid NDCG@10, report test metrics.

    The best model is saved to `paths.baselines / name / "model.pt"` (state_dict,
    config, best epoch and metrics) and its result beside it as `result.json`."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown baseline {name!r}; baselines.models may list {list(MODEL_NAMES)}")
    with cpu_threads(params.baselines.threads):
        return _train_baseline(name, params, paths, tracker, progress)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the body with `n` torch intra-op threads (0: leave them as they are)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_baseline(
    name: str, params: Params, paths: Paths, tracker: Tracker | None, progress: bool
) -> BaselineResult:
    bp = params.baselines
    torch.manual_seed(bp.seed)
    device = pick_device()
    n_items = load_n_items(paths)
    train, valid, test = (load_split(paths, s, n_items) for s in ("train", "valid", "test"))
    max_len = params.data.window.max_history
    ks = sorted(set(params.evaluate.ks) | {10})

    config = model_config(name, n_items, max_len, bp)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=bp.lr, weight_decay=bp.weight_decay)
    seqs = left_pad(train.histories, max_len, model.pad_id)
    targets = torch.as_tensor(train.targets, dtype=torch.long)
    generator = torch.Generator().manual_seed(bp.seed)
    checkpoint = paths.baselines / name / "model.pt"
    n_parameters = sum(p.numel() for p in model.parameters())

    if tracker is not None:
        tracker.start(
            name,
            {
                **{f"model.{k}": v for k, v in config.items() if k != "name"},
                "lr": bp.lr,
                "weight_decay": bp.weight_decay,
                "batch_size": bp.batch_size,
                "epochs": bp.epochs,
                "patience": bp.patience,
                "seed": bp.seed,
                "warn_after_s": bp.warn_after_s,
                "n_train": len(train),
                "n_valid": len(valid),
                "n_test": len(test),
                "n_parameters": n_parameters,
                "device": device.type,
            },
        )

    records: list[EpochRecord] = []
    best_score, best_epoch, best_valid = -math.inf, 0, {}
    best_state: dict[str, torch.Tensor] | None = None
    stale, stopped = 0, None
    began = time.perf_counter()
    warned = False
    epochs = tqdm(range(1, bp.epochs + 1), desc=name, unit="epoch", disable=not progress)
    for epoch in epochs:
        t0 = time.perf_counter()
        loss = train_epoch(
            model, optimizer, seqs, targets, bp.batch_size, generator, device,
            desc=f"{name} epoch {epoch}", progress=progress,
        )
        seconds = time.perf_counter() - t0
        metrics = evaluate_model(model, valid, max_len, ks, bp.batch_size, device, progress)
        records.append(EpochRecord(epoch, loss, metrics, seconds))
        if tracker is not None:
            tracker.log_epoch(epoch, loss, metrics)
        epochs.set_postfix(loss=f"{loss:.4f}", **{MONITOR: f"{metrics[MONITOR]:.4f}"})
        if metrics[MONITOR] > best_score:
            best_score, best_epoch, best_valid, stale = metrics[MONITOR], epoch, metrics, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _save(_checkpoint(config, best_state, best_epoch, best_valid, None), checkpoint)
        else:
            stale += 1
        if not warned and time.perf_counter() - began > bp.warn_after_s:
            warned = True
            warnings.warn(
                f"{name}: {bp.warn_after_s:g} s (baselines.warn_after_s) passed after epoch {epoch}; "
                "training goes on to its epochs and patience (time never changes the result)",
                stacklevel=2,
            )
        if stale >= bp.patience:
            stopped = (
                f"no valid {MONITOR} improvement for {bp.patience} epochs "
                f"(baselines.patience); best epoch {best_epoch}"
            )
            break
    epochs.close()
    train_seconds = time.perf_counter() - began

    if best_state is None:
        raise RuntimeError(f"{name}: no epoch produced a valid {MONITOR}; check baselines.epochs")
    model.load_state_dict(best_state)
    test_metrics = evaluate_model(model, test, max_len, ks, bp.batch_size, device, progress)
    _save(_checkpoint(config, best_state, best_epoch, best_valid, test_metrics), checkpoint)
    result = BaselineResult(
        name=name,
        test=test_metrics,
        best_valid=best_valid,
        best_epoch=best_epoch,
        epochs=records,
        train_seconds=train_seconds,
        stopped_early=stopped,
        checkpoint=checkpoint,
        n_parameters=n_parameters,
        device=device.type,
        config=config,
    )
    (checkpoint.parent / "result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if tracker is not None:
        tracker.finish(test_metrics, checkpoint, best_valid, model)
    return result


def _checkpoint(
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    best_epoch: int,
    valid: dict[str, float],
    test: dict[str, float] | None,
) -> dict[str, Any]:
    return {
        "state_dict": {k: v.cpu() for k, v in state.items()},
        "config": config,
        "best_epoch": best_epoch,
        "valid": valid,
        "test": test,
    }


def run_baselines(
    params: Params, paths: Paths, tracker: Tracker | None = None, progress: bool = True
) -> dict[str, BaselineResult]:
    """Train every model of `params.baselines.models`, in order."""
    return {
        name: train_baseline(name, params, paths, tracker, progress)
        for name in params.baselines.models
    }
