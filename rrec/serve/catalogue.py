"""The catalogue a `Recommender` serves, and updating it without retraining (docs/method.md:
adding, deleting or replacing items is adding, deleting or replacing rows of `H`).

`Catalogue` is the items table of the window stage (`rrec.data.schema.ITEMS`, row i =
item_id i) plus a `removed` flag. Item ids are stable for the life of a model:

- a new `parent_asin` gets the next id, its row is appended to the item table;
- a known `parent_asin` keeps its id, its catalogue row and table row are replaced (a
  removed item that comes back this way is available again);
- a removed item keeps its id and its row; it is only masked, so it is never recommended.

New metadata goes through the window stage's own cleaning (the DuckDB rules of
`rrec.data.clean`, applied by the same functions `rrec.data.window` uses), then through
`rrec.prompts.item_messages`, and is encoded by the model exactly as the items stage
encodes an item: the item prompt with the assistant turn pre-filled with `<answer>`.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from rrec.atomic import atomic_path
from rrec.data.schema import ITEMS
from rrec.data.window import check_malformed, clean_meta_file
from rrec.prompts import item_messages

if TYPE_CHECKING:
    from rrec.serve.recommend import Recommender

REMOVED = "removed"
CATALOGUE_SCHEMA = ITEMS.append(pa.field(REMOVED, pa.bool_()))


def _title_key(title: str) -> str:
    return " ".join(str(title).split()).casefold()


class Catalogue:
    """The items table (schema `ITEMS` + `removed`) as rows, row i = item_id i."""

    def __init__(self, rows: Sequence[dict[str, Any]], source: str = "catalogue") -> None:
        rows = sorted((dict(r) for r in rows), key=lambda r: r.get("item_id", -1))
        if not rows:
            raise ValueError(f"{source}: the catalogue holds no items; rerun the window stage")
        missing = [c for c in ITEMS.names if c not in rows[0]]
        if missing:
            raise ValueError(
                f"{source}: missing column(s) {missing} of the items schema (rrec/data/schema.py); "
                "rerun the window stage"
            )
        if [r["item_id"] for r in rows] != list(range(len(rows))):
            raise ValueError(
                f"{source}: item_id must be exactly 0..n-1 (row i = item i); rerun the window stage"
            )
        for r in rows:
            r[REMOVED] = bool(r.get(REMOVED) or False)
        self.rows: list[dict[str, Any]] = [{c: r[c] for c in CATALOGUE_SCHEMA.names} for r in rows]
        self._reindex()

    def _reindex(self) -> None:
        self._by_asin = {r["parent_asin"]: i for i, r in enumerate(self.rows)}
        by_title: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(self.rows):
            by_title[_title_key(r["title"])].append(i)
        self._by_title = dict(by_title)

    # ------------------------------------------------------------ storage

    @classmethod
    def read(cls, path: Path) -> Catalogue:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no items catalogue; run the window stage first")
        return cls(pq.read_table(path).to_pylist(), source=str(path))

    def write(self, path: Path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            pq.write_table(pa.Table.from_pylist(self.rows, schema=CATALOGUE_SCHEMA), tmp)
        return path

    # ------------------------------------------------------------- lookup

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_removed(self) -> int:
        return sum(r[REMOVED] for r in self.rows)

    def removed_mask(self) -> torch.Tensor:
        """[n_items] bool, True for removed items."""
        return torch.tensor([r[REMOVED] for r in self.rows], dtype=torch.bool)

    def title(self, item_id: int) -> str:
        return str(self.rows[item_id]["title"])

    def parent_asin(self, item_id: int) -> str:
        return str(self.rows[item_id]["parent_asin"])

    def id_of_asin(self, parent_asin: str) -> int | None:
        return self._by_asin.get(parent_asin)

    def ids_of_title(self, title: str) -> list[int]:
        """Items whose title equals `title` up to letter case and runs of spaces."""
        return list(self._by_title.get(_title_key(title), []))

    def row(self, item_id: int) -> dict[str, Any]:
        return dict(self.rows[item_id])

    # ------------------------------------------------------------ updates

    def upsert(self, rows: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Insert or replace cleaned rows by parent_asin; returns (their item ids, the new ids).
        A replaced item keeps its id and interaction count and is available again."""
        ids, new = [], []
        for row in rows:
            values = {c: row.get(c) for c in CATALOGUE_SCHEMA.names}
            known = self._by_asin.get(row["parent_asin"])
            if known is None:
                item_id = len(self.rows)
                self.rows.append({**values, "item_id": item_id, "n_interactions": 0, REMOVED: False})
                self._by_asin[row["parent_asin"]] = item_id
                new.append(item_id)
            else:
                item_id = known
                old = self.rows[item_id]
                self.rows[item_id] = {
                    **values, "item_id": item_id, "n_interactions": old["n_interactions"], REMOVED: False
                }
            ids.append(item_id)
        self._reindex()
        return ids, new

    def remove(self, parent_asins: Iterable[str]) -> list[int]:
        """Flag items as removed; every asin must be in the catalogue (else nothing changes)."""
        asins = list(parent_asins)
        unknown = [a for a in asins if a not in self._by_asin]
        if unknown:
            raise KeyError(
                f"parent_asin {unknown} not in the catalogue ({len(self)} items); nothing was removed"
            )
        ids = [self._by_asin[a] for a in asins]
        for i in ids:
            self.rows[i][REMOVED] = True
        return ids


# ------------------------------------------------------------------ cleaning


# -------------------------------------------------------------------- updates


@dataclass
class CatalogueUpdate:
    """What an update did: ids added (new parent_asin), replaced, removed; metadata lines
    read and dropped (per reason, the window stage's reasons); kept items whose typed
    field had the wrong type and was read as missing (per field)."""

    lines: int = 0
    added: list[int] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    wrong_type: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "added": self.added, "replaced": self.replaced, "removed": self.removed,
                "dropped": {k: v for k, v in self.dropped.items() if v},
                "wrong_type": {k: v for k, v in self.wrong_type.items() if v}}


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
    rows, dropped, lines, wrong_type = clean_meta_file(path, window.max_title_words)
    if lines == 0:
        raise ValueError(f"{path}: holds no metadata lines")
    # The window stage's rule: a file with too many malformed lines changes nothing.
    check_malformed(path, lines, dropped.get("malformed", 0), window.max_malformed_share,
                    fix="fix the file (one Amazon 2023 metadata JSON object a line)")
    update = CatalogueUpdate(lines=lines, dropped=dropped, wrong_type=wrong_type)
    if not rows:
        return update
    table_rows = encode_item_rows(recommender, rows)
    ids, new = recommender.catalogue.upsert(rows)
    new_set = set(new)
    recommender.set_rows(ids, table_rows)
    update.added = [i for i in ids if i in new_set]
    update.replaced = [i for i in ids if i not in new_set]
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
