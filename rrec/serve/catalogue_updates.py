"""Updating a `Recommender`'s catalogue without retraining (docs/method.md: adding,
deleting or replacing items is adding, deleting or replacing rows of `H`).

New metadata goes through the window stage's own cleaning (the DuckDB rules of
`rrec.data.clean`, applied by the same functions `rrec.data.window` uses), then through
`rrec.prompts.item_messages`, and is encoded by the model exactly as the items stage
encodes an item: the item prompt with the assistant turn pre-filled with `<answer>`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rrec.data.window import check_malformed, clean_meta_file
from rrec.prompts import item_messages
from rrec.serve.recommend import Recommender


@dataclass
class CatalogueUpdate:
    """What an update did: ids added (new parent_asin), replaced, removed, and restored
    (replaced items that had been removed: they can be recommended again); metadata lines
    read and dropped (per reason, the window stage's reasons); kept items whose typed
    field had the wrong type and was read as missing (per field); kept items with a NUL
    character in their title or text, read as a space."""

    lines: int = 0
    added: list[int] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    restored: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    wrong_type: dict[str, int] = field(default_factory=dict)
    nul_characters: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = {"lines": self.lines, "added": self.added, "replaced": self.replaced, "removed": self.removed,
               "restored": self.restored,
               "dropped": {k: v for k, v in self.dropped.items() if v},
               "wrong_type": {k: v for k, v in self.wrong_type.items() if v},
               "nul_characters": self.nul_characters}
        if self.restored:
            out["warning"] = (
                f"items {self.restored} had been removed; adding them again made them "
                "recommendable again (remove them again with `rrec catalogue remove --asin`)"
            )
        return out


@torch.no_grad()
def encode_item_rows(recommender: Recommender, rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Item-table rows [n, d] (float32, cpu) of catalogue rows, as the items stage encodes them."""
    p = recommender.params
    messages = [
        item_messages(r, p.data.category, p.prompts.max_description_words) for r in rows
    ]
    rec = recommender.model
    prompts = rec.item_prompt_ids(messages)
    bs = p.items.batch_size
    was_training = rec.training
    rec.eval()
    try:
        parts = [
            rec.encode(prompts[i : i + bs]).float().cpu()
            for i in tqdm(range(0, len(prompts), bs), desc="encode new items", unit="batch",
                          disable=len(prompts) <= bs, leave=False)
        ]
    finally:
        rec.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, rec.hidden_size)


def add_items_from_file(recommender: Recommender, path: Path) -> CatalogueUpdate:
    """`add_or_replace_items` for a metadata file (`.jsonl` or `.jsonl.gz`). A file whose
    malformed share exceeds `data.window.max_malformed_share` changes nothing (ValueError),
    as in the window stage."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: metadata file not found")
    window = recommender.params.data.window
    rows, dropped, lines, wrong_type, nul = clean_meta_file(path, window.max_title_words)
    if lines == 0:
        raise ValueError(f"{path}: holds no metadata lines")
    # The window stage's rule: a file with too many malformed lines changes nothing.
    check_malformed(path, lines, dropped.get("malformed", 0), window.max_malformed_share,
                    fix="fix the file (one Amazon 2023 metadata JSON object a line)")
    update = CatalogueUpdate(lines=lines, dropped=dropped, wrong_type=wrong_type,
                             nul_characters=nul)
    if not rows:
        return update
    table_rows = encode_item_rows(recommender, rows)
    removed_before = recommender.catalogue.removed_mask()
    ids, new = recommender.catalogue.upsert(rows)
    new_set = set(new)
    recommender.set_rows(ids, table_rows)
    update.added = [i for i in ids if i in new_set]
    update.replaced = [i for i in ids if i not in new_set]
    update.restored = sorted({i for i in update.replaced if removed_before[i]})
    return update


def add_or_replace_items(recommender: Recommender, meta_lines: Iterable[str]) -> CatalogueUpdate:
    """Add (new parent_asin) or replace (known parent_asin) items given as Amazon 2023
    metadata lines (JSON strings); they can be recommended at once. Lines the window stage
    would drop are dropped here too and counted in `CatalogueUpdate.dropped`."""
    with tempfile.TemporaryDirectory(prefix="rrec-meta-") as tmp:
        path = Path(tmp) / "meta.jsonl"
        n = 0
        with path.open("w", encoding="utf-8") as f:
            for line in meta_lines:
                line = line.strip()
                if line:
                    f.write(line.replace("\n", " ") + "\n")
                    n += 1
        if n == 0:
            raise ValueError("no metadata lines given (one JSON object per line)")
        try:
            return add_items_from_file(recommender, path)
        except ValueError as err:  # name what the caller gave, not the temporary file
            raise ValueError(str(err).replace(str(path), "the metadata lines given")) from None


def remove_items(recommender: Recommender, parent_asins: Iterable[str]) -> CatalogueUpdate:
    """Items that can no longer be recommended; ids and table rows stay (masked)."""
    ids = recommender.catalogue.remove(parent_asins)
    return CatalogueUpdate(removed=ids)
