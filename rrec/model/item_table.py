"""The item-embedding table `H` (the recommendation head) on disk and in memory.

Row `i` is the final-layer hidden state at the `<answer>` that pre-fills the assistant
turn of item `i`'s prompt (`rrec.items` encodes it). A directory holds

- `table.safetensors`: tensor `embeddings`, [n_items, d] float32, row i = item_id i;
- `index.json`: {n_items, dim, backbone, adapter, fingerprint}.

Adding, deleting or replacing items is adding, deleting or replacing rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rrec.atomic import atomic_path, write_text

TABLE_FILE = "table.safetensors"
INDEX_FILE = "index.json"
TENSOR = "embeddings"


# ------------------------------------------------------------------ storage


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file, written atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def score(user_states: torch.Tensor, item_states: torch.Tensor, tau: float) -> torch.Tensor:
    """Cosine similarity over a temperature, the one scoring rule of the project:
    normalize(u) @ normalize(h).T / tau, in float32 [N, M]. Differentiable in both."""
    u = F.normalize(user_states.float(), dim=-1)
    h = F.normalize(item_states.float().to(u.device), dim=-1)
    return u @ h.T / tau


def read_index(directory: Path) -> dict[str, Any]:
    path = Path(directory) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no item table index; run the items stage first (`dvc repro items`)"
        )
    return json.loads(path.read_text())


@dataclass
class ItemTable:
    """The item-embedding table `H` [n_items, d] float32; row i is item id i.

    `backbone`, `adapter` and `fingerprint` say what encoded it (`index.json`); the
    fingerprint identifies the items stage's inputs and is dropped once a row changes.
    """

    embeddings: torch.Tensor
    backbone: str | None = None
    adapter: str | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 2:
            raise ValueError(f"an item table is 2-D [n_items, dim], got shape {tuple(self.embeddings.shape)}")
        self.embeddings = self.embeddings.detach().float()

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    # -------------------------------------------------------------- storage

    @classmethod
    def load(cls, directory: Path, device: torch.device | str | None = None) -> ItemTable:
        """The table saved in `directory`, checked against its index."""
        directory = Path(directory)
        index = read_index(directory)
        path = directory / TABLE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing although {INDEX_FILE} exists; rerun the items stage")
        embeddings = load_file(str(path))[TENSOR]
        if tuple(embeddings.shape) != (index["n_items"], index["dim"]):
            raise ValueError(
                f"{path}: shape {tuple(embeddings.shape)} disagrees with {INDEX_FILE} "
                f"({index['n_items']} x {index['dim']}); rerun the items stage"
            )
        if device is not None:
            embeddings = embeddings.to(device)
        return cls(embeddings, index.get("backbone"), index.get("adapter"), index.get("fingerprint"))

    def save(self, directory: Path) -> Path:
        """Write the table and its index to `directory`, atomically; returns the table path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TABLE_FILE
        save_tensors({TENSOR: self.embeddings.cpu()}, path)
        index = {
            "n_items": len(self), "dim": self.dim,
            "backbone": self.backbone, "adapter": self.adapter, "fingerprint": self.fingerprint,
        }  # fmt: skip
        write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        return path

    # -------------------------------------------------------------- changes

    def update_rows(self, item_ids: Sequence[int] | torch.Tensor, rows: torch.Tensor) -> None:
        """Replace rows `item_ids` in place with `rows` (detached): the refresh after each
        RecPO step (docs/method.md). With repeated ids the last write wins, which is
        harmless when they come from the same prompt."""
        ids = torch.as_tensor(item_ids, dtype=torch.long, device=self.embeddings.device).flatten()
        if rows.dim() != 2 or rows.shape[0] != ids.numel() or rows.shape[1] != self.dim:
            raise ValueError(f"rows must be [{ids.numel()}, {self.dim}] (one per item id), got {tuple(rows.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise ValueError(f"item ids must lie in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        with torch.no_grad():
            self.embeddings[ids] = rows.detach().to(device=self.embeddings.device, dtype=self.embeddings.dtype)
        self.fingerprint = None

    def set_rows(self, item_ids: Sequence[int], rows: torch.Tensor) -> None:
        """`update_rows`, growing the table first when an id is past its end (new items
        take the next ids; the rows in between, if any, stay zero until written)."""
        if len(item_ids) == 0:
            return
        needed = max(item_ids) + 1
        if needed > len(self):
            grow = self.embeddings.new_zeros(needed - len(self), self.dim)
            self.embeddings = torch.cat([self.embeddings, grow])
        self.update_rows(item_ids, rows)

    def copy_from(self, other: ItemTable) -> None:
        """Overwrite every row in place with `other`'s (same shape), keeping this tensor:
        the training table, registered for checkpointing, after a full re-encode."""
        if other.embeddings.shape != self.embeddings.shape:
            raise ValueError(f"tables differ in shape: {tuple(other.embeddings.shape)} vs {tuple(self.embeddings.shape)}")
        self.embeddings.copy_(other.embeddings)
        self.fingerprint = other.fingerprint

    # -------------------------------------------------------------- scoring

    def score(self, user_states: torch.Tensor, tau: float) -> torch.Tensor:
        """[N, n_items] cos/tau scores of every item for `user_states` [N, d]."""
        return score(user_states, self.embeddings, tau)
