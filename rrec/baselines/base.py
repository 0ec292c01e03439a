"""What every sequential baseline is: left-padded item ids in, one score per item out."""

from __future__ import annotations

import torch
from torch import nn


class SequentialRecommender(nn.Module):
    """`forward(seqs)` maps [B, W] item ids, left-padded with `pad_id == n_items`, to
    scores [B, n_items] for the next item. Padding never changes a row's scores."""

    def __init__(self, n_items: int) -> None:
        super().__init__()
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1 (got {n_items})")
        self.n_items = n_items
        self.pad_id = n_items

    def item_embedding(self, dim: int) -> nn.Embedding:
        """An (n_items + 1) x dim table whose last row is the padding id, kept at zero."""
        emb = nn.Embedding(self.n_items + 1, dim, padding_idx=self.pad_id)
        nn.init.normal_(emb.weight, std=dim**-0.5)
        with torch.no_grad():
            emb.weight[self.pad_id].zero_()
        return emb

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
