"""Reference rows: most-popular and random scorers, ranked by the shared metric code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from rrec.baselines.data import SequenceData, load_n_items, load_split
from rrec.config import Params
from rrec.metrics import evaluate_scorer
from rrec.paths import Paths

REFERENCES = ("popularity", "random")
Reference = Literal["popularity", "random"]


def popularity_counts(train: SequenceData, n_items: int) -> torch.Tensor:
    """Per item, how many train users interacted with it, from targets and histories.

    Consecutive examples of a user repeat most of the same history, so an item is
    counted once per user (the window stage keeps one interaction per user and item):
    the count is the item's number of interactions seen in the train split."""
    pairs = {(u, t) for u, t in zip(train.user_ids, train.targets, strict=True)}
    for u, h in zip(train.user_ids, train.histories, strict=True):
        pairs.update((u, i) for i in h)
    items = torch.as_tensor([i for _, i in pairs], dtype=torch.long)
    return torch.bincount(items, minlength=n_items).to(torch.float32)


def popularity_scorer(counts: torch.Tensor) -> Callable[[list[int]], torch.Tensor]:
    def score(idx: list[int]) -> torch.Tensor:
        return counts.unsqueeze(0).expand(len(idx), -1)

    return score


def random_scorer(n_items: int, seed: int) -> Callable[[list[int]], torch.Tensor]:
    """Uniform scores, drawn batch by batch from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)

    def score(idx: list[int]) -> torch.Tensor:
        return torch.rand(len(idx), n_items, generator=generator)

    return score


def reference_metrics(
    name: Reference, params: Params, paths: Paths, split: str = "test", progress: bool = True
) -> dict[str, float]:
    """Metrics of reference `name` on `split` (popularity is counted on train)."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; expected one of {list(REFERENCES)}")
    n_items = load_n_items(paths)
    data = load_split(paths, split, n_items)
    if name == "popularity":
        score_fn = popularity_scorer(popularity_counts(load_split(paths, "train", n_items), n_items))
    else:
        score_fn = random_scorer(n_items, params.baselines.seed)
    ks = sorted(set(params.evaluate.ks) | {10})
    return evaluate_scorer(score_fn, data.histories, data.targets, ks, params.baselines.batch_size, progress)


def run_references(
    params: Params, paths: Paths, splits: tuple[str, ...] = ("valid", "test"), progress: bool = True
) -> dict[str, dict[str, dict[str, float]]]:
    """{reference: {split: metrics}} for every reference row."""
    return {
        name: {split: reference_metrics(name, params, paths, split, progress) for split in splits}
        for name in REFERENCES
    }
