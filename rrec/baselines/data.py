"""The window stage's examples as tensors for the sequential baselines.

Item ids are the contiguous 0..n-1 of `items.parquet`; sequences are left-padded
with the padding id `n_items` (the extra row of every item embedding table), so the
most recent item is always in the last column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from rrec.paths import Paths


@dataclass(frozen=True)
class SequenceData:
    """One split: per example the user, the history (oldest first) and the target."""

    user_ids: list[str]
    histories: list[list[int]]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)


def load_n_items(paths: Paths) -> int:
    """Number of items in `items.parquet`, checking that ids are exactly 0..n-1."""
    path = paths.items_file
    if not path.exists():
        raise FileNotFoundError(f"{path}: item table not found; run the window stage first")
    ids = pq.read_table(path, columns=["item_id"]).column("item_id").to_numpy()
    if ids.size == 0:
        raise ValueError(f"{path}: no items; the window stage kept nothing")
    if not np.array_equal(np.sort(ids), np.arange(ids.size)):
        raise ValueError(
            f"{path}: column item_id must hold each of 0..{ids.size - 1} exactly once "
            "(ids are contiguous per rrec/data/schema.py ITEMS); rerun the window stage"
        )
    return int(ids.size)


def load_split(paths: Paths, split: str, n_items: int) -> SequenceData:
    """Read `data/processed/{split}.parquet`, checking every id against `n_items`."""
    path = paths.split_file(split)
    if not path.exists():
        raise FileNotFoundError(f"{path}: split {split!r} not found; run the window stage first")
    return read_examples(path, n_items)


def read_examples(path: Path, n_items: int) -> SequenceData:
    table = pq.read_table(path, columns=["user_id", "history_item_ids", "target_item_id"])
    if table.num_rows == 0:
        raise ValueError(f"{path}: no examples")
    targets = table.column("target_item_id").to_numpy()
    if targets.dtype.kind not in "iu":
        raise ValueError(f"{path}: field target_item_id has nulls or is not an integer column")
    histories = table.column("history_item_ids").to_pylist()
    for field, values, rows in (
        ("target_item_id", targets, np.arange(targets.size)),
        *_flat_history(histories, path),
    ):
        bad = (values < 0) | (values >= n_items)
        if bad.any():
            row = int(rows[np.argmax(bad)])
            raise ValueError(
                f"{path}: row {row}, field {field}: item id {int(values[np.argmax(bad)])} is "
                f"outside 0..{n_items - 1} of items.parquet; the splits and the item table "
                "come from different window runs, rerun the window stage"
            )
    return SequenceData(
        user_ids=[str(u) for u in table.column("user_id").to_pylist()],
        histories=[list(h) if h is not None else [] for h in histories],
        targets=[int(t) for t in targets],
    )


def _flat_history(
    histories: list[list[int] | None], path: Path
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    lengths = np.array([len(h) if h is not None else 0 for h in histories])
    if not lengths.sum():
        return []
    flat_list = [i for h in histories if h for i in h]
    if any(i is None for i in flat_list):
        raise ValueError(f"{path}: field history_item_ids holds a null item id; rerun the window stage")
    flat = np.asarray(flat_list, dtype=np.int64)
    rows = np.repeat(np.arange(len(histories)), lengths)
    return [("history_item_ids", flat, rows)]


def left_pad(histories: list[list[int]], max_len: int, pad_id: int) -> torch.Tensor:
    """LongTensor [N, max_len]: the last `max_len` items of each history, left-padded."""
    out = torch.full((len(histories), max_len), pad_id, dtype=torch.long)
    for row, h in enumerate(histories):
        tail = h[-max_len:]
        if tail:
            out[row, max_len - len(tail) :] = torch.as_tensor(tail, dtype=torch.long)
    return out
