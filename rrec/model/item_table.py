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
from pathlib import Path
from typing import Any

import torch
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


def save_item_table(
    table: torch.Tensor,
    directory: Path,
    *,
    backbone: str | None,
    adapter: str | None,
    fingerprint: str | None = None,
) -> Path:
    """Write `table` [n_items, d] and its index to `directory`; returns the table path."""
    if table.dim() != 2:
        raise ValueError(f"an item table is 2-D [n_items, dim], got shape {tuple(table.shape)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TABLE_FILE
    save_tensors({TENSOR: table.detach().float().cpu()}, path)
    index = {
        "n_items": int(table.shape[0]),
        "dim": int(table.shape[1]),
        "backbone": backbone,
        "adapter": adapter,
        "fingerprint": fingerprint,
    }
    write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return path


def read_index(directory: Path) -> dict[str, Any]:
    path = Path(directory) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no item table index; run the items stage first (`dvc repro items`)"
        )
    return json.loads(path.read_text())


def load_item_table(directory: Path, device: torch.device | str | None = None) -> torch.Tensor:
    """The table [n_items, d] float32 saved in `directory`, checked against its index."""
    directory = Path(directory)
    index = read_index(directory)
    path = directory / TABLE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: missing although {INDEX_FILE} exists; rerun the items stage"
        )
    table = load_file(str(path))[TENSOR]
    if tuple(table.shape) != (index["n_items"], index["dim"]):
        raise ValueError(
            f"{path}: shape {tuple(table.shape)} disagrees with {INDEX_FILE} "
            f"({index['n_items']} x {index['dim']}); rerun the items stage"
        )
    return table.to(device) if device is not None else table


def update_rows(
    table: torch.Tensor, item_ids: Sequence[int] | torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Replace rows `item_ids` of `table` in place with `rows` (detached); returns `table`.

    Adding an item is appending a row (`torch.cat`), deleting one is dropping it; this
    is the in-place refresh after each RecPO step (docs/method.md). With repeated ids the last write
    wins, which is harmless when they come from the same prompt.
    """
    ids = torch.as_tensor(item_ids, dtype=torch.long, device=table.device).flatten()
    if rows.dim() != 2 or rows.shape[0] != ids.numel() or rows.shape[1] != table.shape[1]:
        raise ValueError(
            f"rows must be [{ids.numel()}, {table.shape[1]}] (one per item id), got {tuple(rows.shape)}"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        raise ValueError(
            f"item ids must lie in [0, {table.shape[0]}), got {ids.min()}..{ids.max()}"
        )
    with torch.no_grad():
        table[ids] = rows.detach().to(device=table.device, dtype=table.dtype)
    return table
