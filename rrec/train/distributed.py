"""Splitting a global batch across processes, and gathering states with their gradient.

Every process computes the same global batch (the data order is seeded), so each can
work out its own share without communication. In-batch negatives span the whole
global batch: item states are encoded in shards and all-gathered *with* autograd, so
each process's loss reaches the item encodings computed by the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Contiguous share of `items` for `rank`, padded by repeating the last element so
    that every rank gets ceil(len/world) elements (all-gather needs equal shapes)."""
    if not items:
        raise ValueError("nothing to share across processes")
    per = -(-len(items) // world)
    part = list(items[rank * per : (rank + 1) * per])
    return part + [items[-1]] * (per - len(part))


def gather_with_grad(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate `t` [n, ...] from every process along dim 0, keeping autograd."""
    if world == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def gather_no_grad(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)
