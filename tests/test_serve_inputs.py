"""Serving inputs checked before any model work (catalogue files with too many malformed
lines, request files that are not UTF-8) and the ranking's answer when the history covers
the catalogue; no trained model needed."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rrec.config import Params, parse_params
from rrec.data.schema import ITEMS
from rrec.model.item_table import ItemTable
from rrec.serve import recommend as recommend_module
from rrec.serve.catalogue import Catalogue
from rrec.serve.catalogue_updates import add_items_from_file, add_or_replace_items

GOOD = json.dumps({"parent_asin": "NEW0000001", "title": "A New Game", "price": 19.99})
MALFORMED = ['{"parent_asin": "NEW0000002", "title": "cut', "not json at all"]


def _params(**window: object) -> Params:
    return parse_params({"data": {"window": window}})


class _NoModel:
    """Stands in for a Recommender: anything past the input checks fails the test."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the update went on to use the model ({name})")


def test_catalogue_add_refuses_a_file_of_mostly_malformed_lines(tmp_path: Path) -> None:
    meta = tmp_path / "new_meta.jsonl"
    meta.write_text("\n".join([GOOD, *MALFORMED]) + "\n")
    rec = _NoModel(_params())  # max_malformed_share 0.01, as committed
    with pytest.raises(ValueError, match=r"new_meta\.jsonl: 2 of 3 lines are malformed .*"
                                         r"data\.window\.max_malformed_share=0\.01.*fix the file"):
        add_items_from_file(rec, meta)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^the metadata lines given: 2 of 3 lines are malformed"):
        add_or_replace_items(rec, [GOOD, *MALFORMED])  # type: ignore[arg-type]


def test_cli_catalogue_add_names_the_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rrec.cli import app

    (tmp_path / "params.yaml").write_text("seed: 0\n")
    meta = tmp_path / "new_meta.jsonl"
    meta.write_text("\n".join([GOOD, *MALFORMED]) + "\n")
    monkeypatch.setattr(recommend_module.Recommender, "from_dir",
                        classmethod(lambda cls, p, paths, method, **kw: _NoModel(p)))
    result = CliRunner().invoke(app, ["catalogue", "add", "--meta", str(meta), "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "2 of 3 lines are malformed" in result.output
    assert "data.window.max_malformed_share" in result.output
    assert not (tmp_path / "models").exists()  # nothing saved


def test_cli_recommend_input_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    from rrec.cli import app

    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b'[1, 2]\n{"history": [3], "note": "caf\xe9"}\n')  # Latin-1
    result = CliRunner().invoke(app, ["recommend", "--input", str(requests), "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{requests}:2: not UTF-8 text (byte b'\\xe9'" in result.output
    assert "save the requests as UTF-8" in result.output
    assert not isinstance(result.exception, UnicodeDecodeError)




def _ranker(n_items: int, removed: list[str] = ()) -> types.SimpleNamespace:  # type: ignore[assignment]
    """Just what `Recommender.rank` reads: a table, tau, the catalogue, the reasoning text."""
    rows = [{**dict.fromkeys(ITEMS.names), "item_id": i, "parent_asin": f"P{i}",
             "title": f"Item {i}", "n_interactions": 0} for i in range(n_items)]
    catalogue = Catalogue(rows)
    catalogue.remove(removed)
    return types.SimpleNamespace(
        table=ItemTable(torch.randn(n_items, 8, generator=torch.Generator().manual_seed(0))),
        model=types.SimpleNamespace(tau=0.05), catalogue=catalogue,
        _reasoning_text=lambda ids: ("", 0),
    )


def test_a_history_covering_the_catalogue_says_why_nothing_is_returned() -> None:
    ranker = _ranker(3)
    states = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    full, fine = recommend_module.Recommender.rank(ranker, states, [[], []], [[0, 1, 2, 1], [0]], [5, 2])
    assert full.items == []
    assert full.note == ("0 of the 5 items asked for: the history (3 distinct items) and the "
                         "removed items (0) leave 0 of the catalogue's 3 items to recommend")
    assert full.as_dict()["note"] == full.note
    assert len(fine.items) == 2 and fine.note == "" and "note" not in fine.as_dict()


def test_removed_items_are_named_in_the_note() -> None:
    ranker = _ranker(4, removed=["P1", "P2"])
    (rec,) = recommend_module.Recommender.rank(ranker, torch.randn(1, 8), [[]], [[0]], [3])
    assert [i.item_id for i in rec.items] == [3]
    assert "1 of the 3 items asked for" in rec.note and "removed items (2) leave 1" in rec.note


def test_adding_a_removed_item_again_says_it_is_recommendable_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rrec.serve import catalogue_updates

    ranker = _ranker(4, removed=["P1"])
    set_rows: list[list[int]] = []
    rec = types.SimpleNamespace(params=_params(), catalogue=ranker.catalogue,
                                set_rows=lambda ids, rows: set_rows.append(ids))
    monkeypatch.setattr(catalogue_updates, "encode_item_rows", lambda r, rows: torch.zeros(len(rows), 8))
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps({"parent_asin": a, "title": f"The Game {a}", "price": 9.5})
                              for a in ("P1", "P2")) + "\n")
    update = add_items_from_file(rec, meta)  # type: ignore[arg-type]
    assert update.replaced == [1, 2] and update.restored == [1]
    assert rec.catalogue.n_removed == 0
    out = update.as_dict()
    assert out["restored"] == [1]
    assert out["warning"] == ("items [1] had been removed; adding them again made them recommendable "
                              "again (remove them again with `rrec catalogue remove --asin`)")


def test_cli_catalogue_add_names_a_missing_file_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rrec.cli import app

    def no_model(cls, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        raise AssertionError("the model was loaded before the file was checked")

    monkeypatch.setattr(recommend_module.Recommender, "from_dir", classmethod(no_model))
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    missing = tmp_path / "nope.jsonl.gz"
    result = CliRunner().invoke(app, ["catalogue", "add", "--meta", str(missing), "--root", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {missing}: metadata file not found (--meta)"
