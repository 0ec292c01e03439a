"""Full-ranking metrics with one relevant item per example (docs/method.md).

Conventions, used everywhere in the project (evaluation, rewards, baselines):
- the user's history items are masked (score -inf) before ranking; the window stage
  keeps one interaction per (user, item), so the target is never in its own history;
- rank is 1-based and *pessimistic on ties*: rank = 1 + #{items scoring >= the
  target, other than the target}. A model that scores everything equal is therefore
  ranked last, never first;
- Hit@K = [rank <= K], NDCG@K = 1/log2(rank + 1) if rank <= K else 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

PAD = -1


def pad_histories(histories: Sequence[Sequence[int]], device: torch.device | None = None) -> torch.Tensor:
    """Right-pad variable-length item-id lists with PAD (-1) into a LongTensor."""
    width = max((len(h) for h in histories), default=0)
    out = torch.full((len(histories), max(width, 1)), PAD, dtype=torch.long)
    for row, h in enumerate(histories):
        if len(h):
            out[row, : len(h)] = torch.as_tensor(list(h), dtype=torch.long)
    return out.to(device) if device is not None else out


def mask_history(scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Return a copy of `scores` [N, I] with each row's history items (padded [N, L]) at -inf."""
    masked = scores.clone()
    valid = history >= 0
    rows = torch.arange(history.shape[0], device=history.device).unsqueeze(1).expand_as(history)
    masked[rows[valid], history[valid]] = float("-inf")
    return masked


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    """1-based pessimistic rank of each row's target among all items.

    scores [N, I] float, targets [N] long, history [N, L] long padded with -1 (optional).
    """
    if history is not None:
        scores = mask_history(scores, history)
    target_scores = scores.gather(1, targets.view(-1, 1))
    at_least = (scores >= target_scores).sum(dim=1)  # includes the target itself
    return at_least.clamp(min=1)


def ndcg_from_ranks(ranks: torch.Tensor, k: int) -> torch.Tensor:
    ranks = ranks.to(torch.float64)
    gain = 1.0 / torch.log2(ranks + 1.0)
    return torch.where(ranks <= k, gain, torch.zeros_like(gain))


def hit_from_ranks(ranks: torch.Tensor, k: int) -> torch.Tensor:
    return (ranks <= k).to(torch.float64)


def ranking_metrics(ranks: torch.Tensor, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """Mean Hit@K and NDCG@K over examples, keyed 'hit@K' / 'ndcg@K'."""
    if ranks.numel() == 0:
        raise ValueError("no examples to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"] = float(hit_from_ranks(ranks, k).mean())
        out[f"ndcg@{k}"] = float(ndcg_from_ranks(ranks, k).mean())
    return out


def ranking_report(ranks: torch.Tensor, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """`ranking_metrics` plus "n", the number of examples ranked."""
    return {**ranking_metrics(ranks, ks), "n": float(len(ranks))}


def evaluate_scorer(
    score_fn: Callable[[list[int]], torch.Tensor],
    histories: Sequence[Sequence[int]],
    targets: Sequence[int],
    ks: Sequence[int] = (5, 10, 20),
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, float]:
    """Full-ranking metrics of any scorer over examples, the history masked:
    `ranking_report` of `scorer_ranks`."""
    return ranking_report(scorer_ranks(score_fn, histories, targets, batch_size, progress), ks)


def scorer_ranks(
    score_fn: Callable[[list[int]], torch.Tensor],
    histories: Sequence[Sequence[int]],
    targets: Sequence[int],
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """The target's rank [N] in every example, the history masked.

    `score_fn(batch_indices)` gets the positions (into `histories`/`targets`) of one
    batch and returns scores [len(batch_indices), n_items] on any device.
    """
    from tqdm.auto import tqdm

    if len(histories) != len(targets):
        raise ValueError(
            f"evaluate_scorer: {len(histories)} histories but {len(targets)} targets; "
            "pass one history per target"
        )
    if not len(targets):
        raise ValueError("evaluate_scorer: no examples to evaluate")
    if batch_size < 1:
        raise ValueError(f"evaluate_scorer: batch_size must be >= 1 (got {batch_size})")
    ranks: list[torch.Tensor] = []
    starts = range(0, len(targets), batch_size)
    for start in tqdm(starts, desc="ranking", unit="batch", disable=not progress, leave=False):
        idx = list(range(start, min(start + batch_size, len(targets))))
        with torch.no_grad():
            scores = score_fn(idx)
        if scores.dim() != 2 or scores.shape[0] != len(idx):
            raise ValueError(
                f"evaluate_scorer: score_fn returned shape {tuple(scores.shape)} for a batch of "
                f"{len(idx)}; expected [{len(idx)}, n_items]"
            )
        if torch.isnan(scores).any():
            # a NaN target would compare false against everything and rank first
            raise ValueError(
                f"evaluate_scorer: score_fn returned NaN scores for examples {idx[0]}..{idx[-1]}"
            )
        n_items = scores.shape[1]
        batch_targets = torch.as_tensor([targets[i] for i in idx], dtype=torch.long)
        bad = (batch_targets < 0) | (batch_targets >= n_items)
        if bad.any():
            row = idx[int(bad.nonzero()[0, 0])]
            raise ValueError(
                f"evaluate_scorer: example {row} has target {targets[row]} outside the "
                f"{n_items} scored items"
            )
        history = pad_histories([histories[i] for i in idx], device=scores.device)
        ranks.append(target_ranks(scores.float(), batch_targets.to(scores.device), history).cpu())
    return torch.cat(ranks)


def paired_difference(
    ranks_a: Sequence[dict[int, int]], ranks_b: Sequence[dict[int, int]], k: int = 10,
    resamples: int = 2000, seed: int = 0,
) -> tuple[float, tuple[float, float], int, int]:
    """NDCG@k of method b minus method a, scored on the same examples.

    `ranks_a[s]` and `ranks_b[s]` map example id -> the target's rank for training seed s.
    Returns the difference averaged over seeds and examples, its 95 % bootstrap interval
    over examples (the same resampled examples for every seed), the number of seeds whose
    mean difference is positive, and the number of examples.
    """
    if not ranks_a or len(ranks_a) != len(ranks_b):
        raise ValueError(f"need the same number of seeds (> 0) for both methods, got {len(ranks_a)} and {len(ranks_b)}")
    ids = sorted(ranks_a[0])
    if not ids or any(sorted(r) != ids for r in (*ranks_a, *ranks_b)):
        raise ValueError("the methods were not scored on the same examples; evaluate them on the same split")

    def ndcg(r: dict[int, int]) -> np.ndarray:
        return ndcg_from_ranks(torch.tensor([r[i] for i in ids]), k).double().numpy()

    diff = np.stack([ndcg(b) - ndcg(a) for a, b in zip(ranks_a, ranks_b, strict=True)])  # [seeds, n]
    per_example = diff.mean(axis=0)
    rng = np.random.default_rng(seed)
    boot = per_example[rng.integers(0, len(ids), size=(resamples, len(ids)))].mean(axis=1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return float(per_example.mean()), (float(low), float(high)), int((diff.mean(axis=1) > 0).sum()), len(ids)
