"""The catalogue a `Recommender` serves (`rrec.serve.catalogue_updates` changes it
without retraining).

`Catalogue` is the items table of the window stage (`rrec.data.schema.ITEMS`, row i =
item_id i) plus a `removed` flag. Item ids are stable for the life of a model:

- a new `parent_asin` gets the next id, its row is appended to the item table;
- a known `parent_asin` keeps its id, its catalogue row and table row are replaced (a
  removed item that comes back this way is available again, and the update lists it
  under `restored`);
- a removed item keeps its id and its row; it is only masked, so it is not recommended
  unless it is added again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rrec.atomic import atomic_path
from rrec.data.schema import ITEMS

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
