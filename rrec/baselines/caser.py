"""Caser (Tang & Wang, 2018): horizontal and vertical convolutions over the last L items.

The user embedding of the original is left out: every model here scores from the
history alone, so that the same scorer serves unseen users."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rrec.baselines.base import SequentialRecommender


class Caser(SequentialRecommender):
    def __init__(
        self,
        n_items: int,
        window: int,
        hidden: int,
        n_vertical: int,
        n_horizontal: int,
        dropout: float,
    ) -> None:
        super().__init__(n_items)
        self.window = window
        self.items = self.item_embedding(hidden)
        self.vertical = nn.Conv2d(1, n_vertical, (window, 1))
        self.horizontal = nn.ModuleList(
            nn.Conv2d(1, n_horizontal, (height, hidden)) for height in range(1, window + 1)
        )
        self.fc = nn.Linear(n_vertical * hidden + n_horizontal * window, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Embedding(n_items, hidden)
        nn.init.normal_(self.out.weight, std=hidden**-0.5)
        self.out_bias = nn.Parameter(torch.zeros(n_items))

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        if seqs.shape[1] < self.window:
            seqs = F.pad(seqs, (self.window - seqs.shape[1], 0), value=self.pad_id)
        e = self.items(seqs[:, -self.window :]).unsqueeze(1)  # [B, 1, L, d]
        vertical = self.vertical(e).flatten(1)  # [B, n_v * d]
        horizontal = [
            F.relu(conv(e).squeeze(3)).amax(dim=2) for conv in self.horizontal
        ]  # L x [B, n_h]
        z = F.relu(self.fc(self.drop(torch.cat([vertical, *horizontal], dim=1))))
        return z @ self.out.weight.T + self.out_bias
