"""GRU4Rec (Hidasi et al., 2016) as a session encoder: embedding, GRU, last hidden state."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from rrec.baselines.base import SequentialRecommender


class GRU4Rec(SequentialRecommender):
    def __init__(self, n_items: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__(n_items)
        self.items = self.item_embedding(hidden)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(
            hidden, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0
        )
        self.out = nn.Linear(hidden, n_items)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        w = seqs.shape[1]
        lengths = (seqs != self.pad_id).sum(dim=1)
        # left-padded -> right-padded, so that packing skips the padding entirely
        shift = (torch.arange(w, device=seqs.device) + (w - lengths).unsqueeze(1)) % w
        right = seqs.gather(1, shift)
        packed = pack_padded_sequence(
            self.drop(self.items(right)),
            lengths.clamp(min=1).cpu(),
            batch_first=True,
            enforce_sorted=False,
        )
        _, h_n = self.gru(packed)
        return self.out(self.drop(h_n[-1]))
