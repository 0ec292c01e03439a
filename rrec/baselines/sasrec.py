"""SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rrec.baselines.base import SequentialRecommender


class _Block(nn.Module):
    """Pre-norm transformer block: masked multi-head attention, then a point-wise FFN."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm_attn = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm_ffn = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, w, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, w, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, w, d)))
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class SASRec(SequentialRecommender):
    """Learned positional embeddings, causal self-attention, layer norm; the last
    position's output is dotted with the (shared) item embeddings.

    Positions are counted back from the most recent item (as in the original, whose
    sequences are always left-padded to the maximum length), so the width a batch is
    padded to does not matter."""

    def __init__(
        self, n_items: int, max_len: int, hidden: int, layers: int, heads: int, dropout: float
    ) -> None:
        super().__init__(n_items)
        if hidden % heads:
            raise ValueError(
                f"baselines.sasrec.hidden ({hidden}) must be divisible by baselines.sasrec.heads ({heads})"
            )
        self.max_len = max_len
        self.hidden = hidden
        self.items = self.item_embedding(hidden)
        self.positions = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """Per-position outputs [B, W, hidden]; position t sees only positions <= t."""
        seqs = seqs[:, -self.max_len :]
        w = seqs.shape[1]
        real = seqs != self.pad_id
        from_end = torch.arange(w - 1, -1, -1, device=seqs.device)
        x = self.items(seqs) * math.sqrt(self.hidden) + self.positions(from_end)
        x = self.drop(x) * real.unsqueeze(-1)
        causal = torch.ones(w, w, dtype=torch.bool, device=seqs.device).tril()
        # a padding query may see itself, so that no softmax row is all -inf (NaN);
        # its output is zeroed and no real position attends to it
        eye = torch.eye(w, dtype=torch.bool, device=seqs.device)
        allowed = ((causal & real.unsqueeze(1)) | eye).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.norm(x)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        last = self.encode(seqs)[:, -1]
        return last @ self.items.weight[: self.n_items].T
