"""The window stage on tiny hand-made gzip fixtures with known answers."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import random
import warnings
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from rrec.config import Params, parse_params
from rrec.data import clean
from rrec.data.schema import EXAMPLES, ITEMS
from rrec.data.window import (
    CSV_HEADER,
    DROP_REASONS,
    WindowError,
    _ReadProgress,
    months_before,
    run_window,
    split_sizes,
)
from rrec.paths import SPLITS, Paths

CAT = "Toy_Things"
DAY = 86_400_000
_ABSENT = object()


def ms(y: int, m: int, d: int, hh: int = 12) -> int:
    return int(dt.datetime(y, m, d, hh, tzinfo=dt.UTC).timestamp() * 1000)


def write_gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def meta(asin: str, title: Any = _ABSENT, price: Any = 9.99, **extra: Any) -> str:
    rec: dict[str, Any] = {"main_category": "Toys", "parent_asin": asin}
    if title is _ABSENT:
        title = f"Item {asin}"
    if title is not None or "keep_null_title" in extra:
        rec["title"] = title
    extra.pop("keep_null_title", None)
    if price is not _ABSENT:
        rec["price"] = price
    rec.update(extra)
    return json.dumps(rec)


def csv_lines(rows: list[tuple[str, str, float, int]]) -> list[str]:
    return ["user_id,parent_asin,rating,timestamp"] + [f"{u},{a},{r},{t}" for u, a, r, t in rows]


def review_lines(rows: list[tuple[str, str, float, int]]) -> list[str]:
    return [
        json.dumps(
            {"rating": r, "title": "great", "text": "Loved it, <br />really.", "images": [],
             "asin": a + "X", "parent_asin": a, "user_id": u, "timestamp": t,
             "helpful_vote": 0, "verified_purchase": True}
        )
        for u, a, r, t in rows
    ]


def make_params(interactions: str = "rating_only", **window: Any) -> Params:
    base: dict[str, Any] = {"end": "2023-06-30", "months": 12, "min_items": 1}
    base.update(window)
    return parse_params(
        {"data": {"source": "amazon2023", "category": CAT, "interactions": interactions,
                  "window": base}}
    )


def setup(
    root: Path,
    rows: list[tuple[str, str, float, int]],
    meta_lines: list[str] | None = None,
    *,
    extra_csv: list[str] = (),  # type: ignore[assignment]
) -> Paths:
    paths = Paths(root)
    if meta_lines is None:
        meta_lines = [meta(a) for a in sorted({r[1] for r in rows})]
    write_gz(paths.meta_file(CAT), meta_lines)
    write_gz(paths.rating_only_file(CAT), csv_lines(rows) + list(extra_csv))
    return paths


def read(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def all_examples(paths: Paths) -> list[dict[str, Any]]:
    return [e for s in SPLITS for e in read(paths.split_file(s))]


def items_by_asin(paths: Paths) -> dict[str, dict[str, Any]]:
    return {r["parent_asin"]: r for r in read(paths.items_file)}


# ------------------------------------------------------------------ unit helpers


def test_months_before_clips_to_month_end() -> None:
    assert months_before(dt.date(2023, 6, 30), 12) == dt.date(2022, 6, 30)
    assert months_before(dt.date(2023, 3, 31), 1) == dt.date(2023, 2, 28)
    assert months_before(dt.date(2024, 3, 31), 1) == dt.date(2024, 2, 29)
    assert months_before(dt.date(2023, 1, 15), 1) == dt.date(2022, 12, 15)
    assert months_before(dt.date(2023, 1, 15), 25) == dt.date(2020, 12, 15)


def test_split_sizes_reproduce_table3() -> None:
    f = (0.8, 0.1, 0.1)
    assert split_sizes(63_502, f) == (50_801, 6_350, 6_351)
    assert split_sizes(13_435, f) == (10_748, 1_343, 1_344)
    assert split_sizes(34_373, f) == (27_498, 3_437, 3_438)
    assert split_sizes(10, f) == (8, 1, 1)
    assert sum(split_sizes(7, (0.5, 0.3, 0.2))) == 7


@pytest.mark.parametrize(("n", "expected"), [
    # train = floor(0.8 n), valid = floor(0.9 n) - floor(0.8 n), test = the rest
    (19, (15, 2, 2)),  # 15.2 -> 15, 17.1 -> 17
    (9, (7, 1, 1)),  # 7.2 -> 7, 8.1 -> 8
    (4, (3, 0, 1)),  # 3.2 -> 3, 3.6 -> 3
    (29, (23, 3, 3)),  # 23.2 -> 23, 26.1 -> 26
    (8792, (7033, 879, 880)),  # the embedded default
])
def test_split_sizes_use_the_authors_cut_points(n: int, expected: tuple[int, int, int]) -> None:
    assert split_sizes(n, (0.8, 0.1, 0.1)) == expected


# ---------------------------------------------------------------------- cleaning


def test_item_cleaning_rules_and_counts(tmp_path: Path) -> None:
    words20 = " ".join(f"w{i}" for i in range(20))
    meta_lines = [
        meta("A01", "Good &amp; Fun <b>Game</b>", 10, store="Store &#39;s",
             description=["Line one\nwith\ttab", "caf\u00e9 &lt;br&gt;ok", ""],
             features=["<p>feat</p>", "  spaced   out "],
             categories=["Toys", "", "PC &amp; Mac"], average_rating=4.5, rating_number=12),
        meta("A02", None),  # no title key at all
        meta("A03", None, keep_null_title=True),  # "title": null
        meta("A04", "<span id='x'>Foo</span> Bar"),
        meta("A05", "X"),
        meta("A06", '""'),  # nothing left once the quotes are gone
        meta("A07", words20 + " w20"),  # 21 words
        meta("A08", words20),  # exactly 20 words: kept
        meta("A09", "Price none", "None"),
        meta("A10", "Price from", "from $12.99"),
        meta("A11", "Price dash", "\u2014"),
        meta("A12", "Price null", None),
        meta("A13", "Price absent", _ABSENT),
        meta("A14", "Price string", "12.99"),
        meta("A15", "Price int", 12),
        meta("A16", "First valid", 1.5),
        meta("A16", "Second valid", 2.5),  # duplicate_meta
        meta("A17", "Invalid first", "None"),  # bad_price, then a valid line for A17
        meta("A17", "Valid second", 3),
        meta("A18", '"Caf\u00e9" Racer\'s Edition'),
        meta("A19", "Zelda&#8482;&nbsp;&#x41;BC &#39;Quoted&apos; &quot;x&quot; &gt;"),
        meta("A20", "Tom &amp;amp; Jerry"),
        meta("A21", "5 &lt; 6 Edition\r\nTwo"),
        meta("A22", 12345),  # not a string
        meta("A23", "Price nan", "NaN"),
    ]
    asins = [f"A{i:02d}" for i in range(1, 24)]
    rows = [(f"u{i}", a, 4.0, ms(2023, 1, 1) + i * DAY) for i, a in enumerate(asins)]
    rows += [(f"u{i}", "A01", 5.0, ms(2023, 2, 1)) for i in range(len(asins)) if i != 0]
    paths = setup(tmp_path, rows, meta_lines)
    stats = run_window(make_params(), paths)

    drops = stats["drops"]
    assert set(drops) == set(DROP_REASONS)
    assert drops["missing_title"] == 3  # A02, A03, A22
    assert drops["span_title"] == 1
    assert drops["short_title"] == 2  # A05, A06
    assert drops["long_title"] == 1
    assert drops["bad_price"] == 7  # A09-A13, the first A17, A23
    assert drops["duplicate_meta"] == 1
    bad = {"A02", "A03", "A04", "A05", "A06", "A07", "A09", "A10", "A11", "A12", "A13",
           "A22", "A23"}
    assert drops["no_metadata"] == len(bad)  # one interaction each

    items = items_by_asin(paths)
    assert set(items) == set(asins) - bad
    a01 = items["A01"]
    assert a01["title"] == "Good & Fun Game"
    assert a01["description"] == "Line one with tab cafe ok"
    assert a01["features"] == "feat spaced out"
    assert a01["store"] == "Store 's"
    assert a01["categories"] == "Toys > PC & Mac"
    assert a01["main_category"] == "Toys"
    assert (a01["price"], a01["average_rating"], a01["rating_number"]) == (10.0, 4.5, 12)
    assert items["A08"]["title"] == words20
    assert items["A14"]["price"] == 12.99 and items["A15"]["price"] == 12.0
    assert items["A16"]["title"] == "First valid" and items["A16"]["price"] == 1.5
    assert items["A17"]["title"] == "Valid second"
    assert items["A18"]["title"] == "Cafe Racer's Edition"  # accents folded, the apostrophe kept
    assert items["A19"]["title"] == "ZeldaTM ABC Quoted x >"
    assert items["A20"]["title"] == "Tom &amp; Jerry"  # one level of escaping only
    assert items["A21"]["title"] == "5 < 6 Edition Two"  # not a tag: kept
    a15 = items["A15"]
    assert (a15["description"], a15["features"], a15["store"], a15["categories"]) == ("",) * 4
    assert a15["average_rating"] is None and a15["rating_number"] is None
    assert items["A01"]["n_interactions"] == len(asins)


def test_title_words_are_counted_before_non_ascii_becomes_spaces(tmp_path: Path) -> None:
    # the protocol's order: unescape, strip quotes, count words; non-ASCII to spaces is prompt text
    # cleaning. 20 words as written, 21 once "b\u00f4ru" is squashed to "b ru".
    title20 = ("Dragon Ball GT: Final Bout (Doragon b\u00f4ru GT: Fainaru Bauto) for "
               "PlayStation One Game Disc Import Version Complete Box Set")
    assert len(title20.split()) == 20
    dash21 = " ".join(f"w{i}" for i in range(10)) + " \u2014 " + " ".join(f"v{i}" for i in range(10))
    nbsp20 = "&quot;" + "&nbsp;".join(f"n{i}" for i in range(20)) + "&quot;"
    meta_lines = [meta("G1", title20), meta("G2", dash21), meta("G3", nbsp20)]
    rows = [("u1", "G1", 4.0, ms(2023, 1, 1)), ("u1", "G2", 4.0, ms(2023, 1, 2)),
            ("u1", "G3", 4.0, ms(2023, 1, 3))]
    stats = run_window(make_params(), setup(tmp_path, rows, meta_lines))
    assert stats["drops"]["long_title"] == 1  # G2: the dash is a word as written
    items = items_by_asin(Paths(tmp_path))
    assert set(items) == {"G1", "G3"}
    assert items["G1"]["title"] == title20.replace("\u00f4", "o")  # the prompt text: accents folded
    assert items["G3"]["title"] == " ".join(f"n{i}" for i in range(20))


def test_text_cleaning_spaces_every_control_and_non_ascii_character() -> None:
    con = duckdb.connect()
    clean.register(con)

    def cleaned(text: str) -> str:
        return con.execute("SELECT rrec_clean_text(?)", [text]).fetchone()[0]

    for code in [*range(1, 0x20), 0x7F, 0xA0, 0x2014, 0x1F600]:
        assert cleaned(f"a{chr(code)}b") == "a b", hex(code)
    assert cleaned("a\u00e9b") == "aeb"  # accents are folded, not spaced
    assert cleaned("a\x00b") == "a b"  # NUL (JSON's \u0000) is a control character too
    assert cleaned('  say "hi"   \\ ok ') == 'say "hi" \\ ok'
    assert cleaned('say "hi" \\ ok') == 'say "hi" \\ ok'


def test_wrongly_typed_metadata_fields_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta_lines = [
        meta("T1", "Features string", features="not a list", rating_number="1,234"),
        meta("T2", "Mixed list", features=["ok", 7, {"k": 1}], categories=["Toys", None],
             average_rating="4.5", rating_number=12.5),
        meta("T3", "Store list", store=["s"], main_category=5, description={"a": 1}),
        meta("T4", "All fine", features=["f"], description=[], categories=None, store="S",
             average_rating=4, rating_number=12.0),
    ]
    rows = [("u1", f"T{i}", 4.0, ms(2023, 1, i)) for i in range(1, 5)]
    stats = run_window(make_params(), setup(tmp_path, rows, meta_lines))
    assert stats["wrong_type"] == {
        "description": 1, "features": 2, "categories": 0, "store": 1, "main_category": 1,
        "average_rating": 1, "rating_number": 2,
    }
    printed = capsys.readouterr()
    assert ("items kept with a field of the wrong type, read as missing: description 1, features 2, store 1, "
            "main_category 1, average_rating 1, rating_number 2") in printed.out + printed.err
    items = items_by_asin(Paths(tmp_path))
    assert len(items) == 4  # a wrong field is missing, not a reason to drop the item
    assert (items["T1"]["features"], items["T1"]["rating_number"]) == ("", None)
    assert items["T2"]["features"] == "ok" and items["T2"]["categories"] == "Toys"
    assert (items["T2"]["average_rating"], items["T2"]["rating_number"]) == (None, None)
    assert (items["T3"]["store"], items["T3"]["main_category"]) == ("", "")
    t4 = items["T4"]
    assert (t4["features"], t4["store"], t4["average_rating"], t4["rating_number"]) == ("f", "S", 4.0, 12)


@pytest.mark.parametrize("fmt", ["rating_only", "reviews"])
def test_json_nul_escape_is_valid_and_counted(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # "\u0000" is a valid JSON escape: the line is read, the character removed from ids and
    # read as a space in text, so that it does not glue two words together.
    meta_lines = [
        meta("N1\u0000", "Widget\u0000model", description=["de\u0000sc"]),
        meta("N2", "Plain"),
    ]
    rows = [("u\u00001", "N1", 4.0, ms(2023, 1, 1)), ("u1", "N2", 5.0, ms(2023, 1, 2))]
    paths = Paths(tmp_path)
    write_gz(paths.meta_file(CAT), meta_lines)
    if fmt == "rating_only":
        write_gz(paths.rating_only_file(CAT), csv_lines([(u.replace("\u0000", ""), *r)
                                                         for u, *r in rows]))
    else:
        write_gz(paths.reviews_file(CAT), review_lines(rows))
    stats = run_window(make_params(fmt), paths)
    assert sum(stats["malformed"].values()) == 0
    assert stats["drops"]["no_metadata"] == 0
    assert (stats["users"], stats["items"], stats["examples"]) == (1, 2, 1)
    n1 = items_by_asin(paths)["N1"]
    assert (n1["title"], n1["description"]) == ("Widget model", "de sc")
    assert [e["user_id"] for e in all_examples(paths)] == ["u1"]
    assert stats["nul_characters"] == 1
    assert ("items kept with a NUL character (\\u0000) in their title or text, read as a space: 1"
            in capsys.readouterr().out)


# -------------------------------------------------------------------- malformed


def _dirty_inputs(tmp_path: Path, n_bad_meta: int) -> Paths:
    rows = [(f"u{i % 7}", f"B{i % 11:02d}", 3.0, ms(2023, 1, 1) + i * 3_600_000)
            for i in range(60)]
    good_meta = [meta(f"B{i:02d}") for i in range(11)]
    junk = ['{"parent_asin": "B99", "title": "cut', "not json", "[1, 2]", '{"title": "no asin"}',
            '{"parent_asin": "", "title": "empty asin"}', "42"]
    meta_lines = good_meta[:5] + junk[:n_bad_meta] + good_meta[5:] + [""]
    extra_csv = ["u1,B01,abc,1672574400000", "u2,B02,4.0", "u3,B03,4.0,1672574400000,9",
                 "u4,,4.0,1672574400000", "u5,B05,4.0,later", ""]
    return setup(tmp_path, rows, meta_lines, extra_csv=extra_csv)


def test_malformed_lines_are_counted(tmp_path: Path) -> None:
    paths = _dirty_inputs(tmp_path, n_bad_meta=6)
    stats = run_window(make_params(max_malformed_share=0.4), paths)
    csv_name, meta_name = f"{CAT}.csv.gz", f"meta_{CAT}.jsonl.gz"
    assert stats["lines"] == {csv_name: 65, meta_name: 17}  # blank lines are not lines
    assert stats["malformed"] == {csv_name: 5, meta_name: 6}
    assert stats["interactions"] + stats["drops"]["duplicate_interactions"] == 60
    assert len(read(paths.items_file)) == 11


@pytest.mark.parametrize("fmt", ["rating_only", "reviews"])
def test_ratings_outside_1_to_5_are_counted_and_dropped(tmp_path: Path, fmt: str) -> None:
    t = ms(2023, 1, 1)
    good = [("u1", "R1", 1.0, t), ("u1", "R2", 5.0, t + DAY), ("u2", "R1", 3.5, t + DAY),
            ("u2", "R3", 4.0, t + 2 * DAY)]
    bad = [("u1", "R3", 0.0, t + 2 * DAY), ("u2", "R2", 6.0, t + 3 * DAY),
           ("u1", "R4", -1.0, t + 3 * DAY), ("u2", "R4", 5.5, t + 4 * DAY)]
    rows = good + bad
    paths = Paths(tmp_path)
    write_gz(paths.meta_file(CAT), [meta(a) for a in ("R1", "R2", "R3", "R4")])
    if fmt == "rating_only":
        write_gz(paths.rating_only_file(CAT), csv_lines(rows))
    else:
        write_gz(paths.reviews_file(CAT), review_lines(rows))
    stats = run_window(make_params(fmt), paths)
    assert stats["drops"]["bad_rating"] == 4
    assert sum(stats["malformed"].values()) == 0
    assert stats["interactions"] == 4 and stats["items"] == 3  # R4 only had bad ratings
    ex = all_examples(paths)
    ratings = [r for e in ex for r in [*e["history_ratings"], e["target_rating"]]]
    assert ratings and all(1.0 <= r <= 5.0 for r in ratings)


def test_malformed_share_over_threshold_fails_and_leaves_no_outputs(tmp_path: Path) -> None:
    paths = _dirty_inputs(tmp_path, n_bad_meta=1)
    run_window(make_params(max_malformed_share=0.1), paths)  # 1/12 meta, 5/65 csv: fine
    assert paths.window_stats.exists() and paths.items_file.exists()

    paths = _dirty_inputs(tmp_path, n_bad_meta=6)  # 6/17 > 0.1
    with pytest.raises(WindowError, match=rf"meta_{CAT}\.jsonl\.gz.*6 of 17.*0\.35"):
        run_window(make_params(max_malformed_share=0.1), paths)
    assert not paths.window_stats.exists()
    assert not paths.processed.exists() or not any(paths.processed.iterdir())
    leftovers = [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _half_without_metadata(tmp_path: Path) -> Paths:
    """51 of 100 interaction lines name items without valid metadata."""
    t = ms(2023, 1, 1)
    rows = [(f"u{i % 10}", f"K{i:03d}", 4.0, t + i * DAY) for i in range(100)]
    meta_lines = [meta(f"K{i:03d}") for i in range(51, 100)] + [meta("K000", "X")]  # short
    return setup(tmp_path, rows, meta_lines)


def test_large_drops_stop_the_stage_with_the_table_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _half_without_metadata(tmp_path)
    with pytest.raises(WindowError) as info:
        run_window(make_params(), paths)  # default data.window.max_dropped_share: 0.5
    msg = str(info.value)
    assert f"{CAT}.csv.gz: 51 of 100 interaction lines (51.0%)" in msg
    assert "no_metadata 51" in msg
    assert "data.window.max_dropped_share=0.5" in msg and "raise data.window.max_dropped_share" in msg
    out = capsys.readouterr().out
    assert "[window] dropped" in out and "no_metadata" in out and "51.0%" in out
    assert not paths.window_stats.exists() and not paths.items_file.exists()


def test_drop_table_is_printed_and_a_large_share_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _half_without_metadata(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"51\.0% of the interaction lines .* bad data"):
        stats = run_window(make_params(max_dropped_share=0.6), paths)
    assert stats["dropped_share"] == 0.51 and stats["max_dropped_share"] == 0.6
    out = capsys.readouterr().out
    table = out[out.index("[window] dropped"):]
    row = next(line for line in table.splitlines() if line.strip().startswith(f"{CAT}.csv.gz: no_metadata"))
    assert row.split()[-2:] == ["51", "51.0%"]
    assert f"meta_{CAT}.jsonl.gz: short_title" in table

    # A clean run prints the table too, and does not warn.
    rows = [("u1", "A1", 4.0, ms(2023, 1, 1)), ("u1", "A2", 4.0, ms(2023, 1, 2))]
    clean_paths = setup(tmp_path / "clean", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_window(make_params(), clean_paths)["dropped_share"] == 0.0
    assert "[window] dropped" in capsys.readouterr().out


def test_metadata_line_longer_than_32_mib_is_read(tmp_path: Path) -> None:
    # Too long for the small JSON read buffers: the metadata is read again with large ones.
    rows = [("u1", "L1", 4.0, ms(2023, 1, 1)), ("u1", "L2", 5.0, ms(2023, 1, 2))]
    long_line = meta("L1", details={"Notes": "x" * (33 << 20)})
    paths = setup(tmp_path, rows, [long_line, meta("L2")])
    stats = run_window(make_params(), paths)
    name = f"meta_{CAT}.jsonl.gz"
    assert (stats["lines"][name], stats["malformed"][name]) == (2, 0)
    assert set(items_by_asin(paths)) == {"L1", "L2"}


def test_missing_file_and_wrong_header_are_explained(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    with pytest.raises(FileNotFoundError, match="download stage"):
        run_window(make_params(), paths)
    write_gz(paths.meta_file(CAT), [meta("A1")])
    write_gz(paths.rating_only_file(CAT), ["user,item,rating,time", "u,A1,1.0,1"])
    with pytest.raises(WindowError, match=r"line 1 .*expected the header"):
        run_window(make_params(), paths)


# ---------------------------------------------------------------------- window


def _rollback_rows() -> list[tuple[str, str, float, int]]:
    rows = [(f"u{i}", f"C{i}", 4.0, ms(2023, 3, 1) + i * DAY) for i in range(3)]  # inside
    rows += [("w", "C0", 2.0, ms(2023, 4, 1)), ("w", "C1", 2.0, ms(2023, 4, 2))]
    rows += [
        ("v1", "D1", 3.0, ms(2022, 6, 10)),  # needs one month back (start 2022-05-30)
        ("v2", "D2", 3.0, ms(2022, 5, 15)),  # needs two (start 2022-04-30)
        ("v3", "D3", 3.0, ms(2021, 3, 10)),  # the earliest interaction
        ("v1", "C0", 5.0, int(dt.datetime(2023, 6, 30, 23, 59, 59, 999_000, tzinfo=dt.UTC)
                              .timestamp() * 1000)),  # last millisecond: inside
        ("v2", "C1", 5.0, ms(2023, 7, 1, 0)),  # first millisecond after the end: outside
    ]
    return rows


@pytest.mark.parametrize(("min_items", "months_back", "start"),
                         [(3, 0, "2022-06-30"), (4, 1, "2022-05-30"), (5, 2, "2022-04-30")])
def test_window_rolls_back_month_by_month(
    tmp_path: Path, min_items: int, months_back: int, start: str
) -> None:
    paths = setup(tmp_path, _rollback_rows())
    stats = run_window(make_params(min_items=min_items), paths)
    assert stats["months_rolled_back"] == months_back
    assert stats["window_start"] == start and stats["window_end"] == "2023-06-30"
    assert stats["items"] == min_items
    assert stats["min_items_reached"] is True
    # Outside: the post-end interaction, D3, and whichever of D1/D2 the start misses.
    assert stats["drops"]["outside_window"] == 2 + (2 - months_back)
    assert stats["interactions"] == 6 + months_back


def test_window_reaching_the_earliest_interaction_warns(tmp_path: Path) -> None:
    paths = setup(tmp_path, _rollback_rows())
    with pytest.warns(RuntimeWarning, match="min_items=100"):
        stats = run_window(make_params(min_items=100), paths)
    # 2023-06-30 minus 28 months is 2021-02-28, the first start before 2021-03-10.
    assert stats["months_rolled_back"] == 16
    assert stats["window_start"] == "2021-02-28"
    assert stats["min_items_reached"] is False
    assert stats["items"] == 6 and stats["drops"]["outside_window"] == 1


def test_empty_window_is_an_error(tmp_path: Path) -> None:
    paths = setup(tmp_path, [("u", "A1", 1.0, ms(2023, 9, 1)), ("u", "A2", 1.0, ms(2023, 9, 2))])
    with pytest.raises(WindowError, match="data.window.end"):
        run_window(make_params(), paths)


# -------------------------------------------------------------------- examples


def test_history_window_order_and_duplicates(tmp_path: Path) -> None:
    t = ms(2023, 1, 1)
    rows = [
        ("u1", "E1", 1.0, t),
        ("u1", "E3", 3.0, t + 10),
        ("u1", "E2", 2.0, t + 10),  # same time as E3: ordered by parent_asin, E2 first
        ("u1", "E4", 4.0, t + 20),
        ("u1", "E1", 5.0, t + 30),  # repeat of E1: dropped, the earliest is kept
        ("u1", "E5", 5.0, t + 40),
        ("u2", "E5", 2.0, t + 5),
    ]
    random.Random(3).shuffle(rows)
    paths = setup(tmp_path, rows)
    stats = run_window(make_params(max_history=2), paths)
    assert stats["drops"]["duplicate_interactions"] == 1
    ids = {r["parent_asin"]: r["item_id"] for r in read(paths.items_file)}
    assert ids == {"E1": 0, "E2": 1, "E3": 2, "E4": 3, "E5": 4}
    ex = [e for e in all_examples(paths) if e["user_id"] == "u1"]
    ex.sort(key=lambda e: e["example_id"])
    got = [(e["history_item_ids"], e["history_ratings"], e["history_timestamps"],
            e["target_item_id"], e["target_rating"], e["target_timestamp"]) for e in ex]
    assert got == [
        ([0], [1.0], [t], 1, 2.0, t + 10),
        ([0, 1], [1.0, 2.0], [t, t + 10], 2, 3.0, t + 10),
        ([1, 2], [2.0, 3.0], [t + 10, t + 10], 3, 4.0, t + 20),
        ([2, 3], [3.0, 4.0], [t + 10, t + 20], 4, 5.0, t + 40),
    ]
    assert all(e["target_item_id"] not in e["history_item_ids"] for e in all_examples(paths))
    assert stats["users"] == 2 and stats["interactions"] == 6 and stats["examples"] == 4


def _random_rows(n_users: int, seed: int) -> list[tuple[str, str, float, int]]:
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        for a in rng.sample(range(40), rng.randint(1, 9)):
            rows.append((f"user{u:03d}", f"P{a:03d}", float(rng.randint(1, 5)),
                         ms(2023, 1, 1) + rng.randrange(0, 150) * DAY))
    return rows


def test_split_boundaries_ids_and_schemas(tmp_path: Path) -> None:
    rows = _random_rows(60, seed=1)
    paths = setup(tmp_path, rows)
    stats = run_window(make_params(max_history=3), paths)
    splits = {s: read(paths.split_file(s)) for s in SPLITS}
    n = sum(len(v) for v in splits.values())
    assert n == stats["examples"] == stats["interactions"] - stats["users"]
    assert (len(splits["train"]), len(splits["valid"]), len(splits["test"])) == split_sizes(
        n, (0.8, 0.1, 0.1)) == (stats["train"], stats["valid"], stats["test"])
    ts = {s: [e["target_timestamp"] for e in v] for s, v in splits.items()}
    assert max(ts["train"]) <= min(ts["valid"]) and max(ts["valid"]) <= min(ts["test"])
    ordered = [e for s in SPLITS for e in splits[s]]
    assert [e["example_id"] for e in ordered] == list(range(n))
    keys = [(e["target_timestamp"], e["user_id"], e["target_item_id"]) for e in ordered]
    assert keys == sorted(keys)
    assert all(1 <= len(e["history_item_ids"]) <= 3 for e in ordered)
    assert all(len(e["history_item_ids"]) == len(e["history_ratings"])
               == len(e["history_timestamps"]) for e in ordered)

    items = read(paths.items_file)
    assert [r["item_id"] for r in items] == list(range(len(items)))
    assert [r["parent_asin"] for r in items] == sorted({r[1] for r in rows})
    assert sum(r["n_interactions"] for r in items) == stats["interactions"]
    for s in SPLITS:
        assert pq.read_schema(paths.split_file(s)).equals(EXAMPLES)
    assert pq.read_schema(paths.items_file).equals(ITEMS)
    assert json.loads(paths.window_stats.read_text()) == stats
    assert set(stats) >= {"category", "users", "items", "interactions", "train", "valid", "test"}
    assert not (tmp_path / "data" / ".duckdb_tmp").exists()


def test_a_run_removes_what_killed_runs_left(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getppid()
    t = ms(2023, 1, 1)
    paths = setup(tmp_path, [("u", "A1", 4.0, t), ("u", "A2", 4.0, t + DAY)])
    data = tmp_path / "data"
    left = [data / f".processed.tmp-{dead.pid}" / "train.parquet",
            data / ".duckdb_tmp" / f"window-{dead.pid}-0123abcd" / "spill.tmp"]
    running = [data / f".processed.tmp-{alive}" / "train.parquet",
               data / ".duckdb_tmp" / f"window-{alive}-4567cdef" / "spill.tmp"]
    for f in left + running:
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x" * 100)
    run_window(make_params(), paths)
    assert not any(f.parent.exists() for f in left)
    assert all(f.exists() for f in running)
    assert f"removed what killed runs left: {left[0].parent}, {left[1].parent}" in capsys.readouterr().out


def test_reviews_jsonl_gives_the_same_examples_as_the_csv(tmp_path: Path) -> None:
    rows = _random_rows(30, seed=2)
    csv_paths = setup(tmp_path / "csv", rows)
    csv_stats = run_window(make_params(), csv_paths)

    json_paths = Paths(tmp_path / "json")
    write_gz(json_paths.meta_file(CAT), [meta(a) for a in sorted({r[1] for r in rows})])
    write_gz(json_paths.reviews_file(CAT), review_lines(rows) + ['{"user_id": "broken'])
    json_stats = run_window(make_params("reviews", max_malformed_share=0.05), json_paths)

    assert all_examples(json_paths) == all_examples(csv_paths)
    assert read(json_paths.items_file) == read(csv_paths.items_file)
    n_items = len({r[1] for r in rows})
    assert json_stats["malformed"] == {f"{CAT}.jsonl.gz": 1, f"meta_{CAT}.jsonl.gz": 0}
    assert json_stats["lines"] == {f"{CAT}.jsonl.gz": len(rows) + 1, f"meta_{CAT}.jsonl.gz": n_items}
    for key in ("users", "items", "interactions", "train", "valid", "test", "drops"):
        assert json_stats[key] == csv_stats[key]


def test_kcore_removes_users_and_items_iteratively(tmp_path: Path) -> None:
    t = ms(2023, 2, 1)
    pairs = [("u1", "A"), ("u1", "B"), ("u1", "C"), ("u2", "A"), ("u2", "B"),
             ("u3", "C"), ("u3", "D"), ("u4", "D")]
    rows = [(u, a, 4.0, t + i * DAY) for i, (u, a) in enumerate(pairs)]
    paths = setup(tmp_path, rows)
    # u4 goes, then D, then u3, then C: u1 and u2 keep A and B.
    stats = run_window(make_params(kcore=2), paths)
    assert stats["drops"]["kcore"] == 4
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 2, 4)
    assert [r["parent_asin"] for r in read(paths.items_file)] == ["A", "B"]
    assert {e["user_id"] for e in all_examples(paths)} == {"u1", "u2"}

    off = run_window(make_params(kcore=0), paths)
    assert off["drops"]["kcore"] == 0 and off["items"] == 4


def test_timestamps_in_seconds_are_refused(tmp_path: Path) -> None:
    rows = [("u", "A1", 1.0, ms(2023, 1, 1) // 1000), ("u", "A2", 1.0, ms(2023, 1, 2) // 1000)]
    paths = setup(tmp_path, rows)
    with pytest.raises(WindowError, match=r"look like seconds"):
        run_window(make_params(), paths)


@pytest.mark.parametrize("fmt", ["rating_only", "reviews"])
def test_timestamps_partly_in_seconds_are_counted_as_bad_data(tmp_path: Path, fmt: str) -> None:
    t = ms(2023, 1, 1)
    in_ms = [(f"u{i % 3}", f"A{i}", 4.0, t + i * DAY) for i in range(7)]
    in_s = [(f"u{i % 3}", f"A{i}", 4.0, (t + i * DAY) // 1000) for i in range(7, 10)]
    paths = Paths(tmp_path)
    write_gz(paths.meta_file(CAT), [meta(f"A{i}") for i in range(10)])
    if fmt == "rating_only":
        write_gz(paths.rating_only_file(CAT), csv_lines(in_ms + in_s))
    else:
        write_gz(paths.reviews_file(CAT), review_lines(in_ms + in_s))
    with pytest.warns(RuntimeWarning, match=r"30.0% .* bad_timestamp 3"):
        stats = run_window(make_params(fmt), paths)
    assert stats["drops"]["bad_timestamp"] == 3 and stats["drops"]["outside_window"] == 0
    assert stats["dropped_share"] == pytest.approx(0.3)
    assert stats["interactions"] == 7


def test_a_share_of_seconds_above_the_limit_says_to_convert(tmp_path: Path) -> None:
    t = ms(2023, 1, 1)
    rows = [("u", "A1", 1.0, t), *((f"u{i}", "A1", 1.0, t // 1000) for i in range(3))]
    paths = setup(tmp_path, rows)
    with pytest.raises(WindowError) as info:
        run_window(make_params(), paths)
    msg = str(info.value)
    assert "3 of 4 interaction lines (75.0%)" in msg and "bad_timestamp 3" in msg
    assert "convert those lines (timestamp * 1000)" in msg and "no_metadata:" not in msg


def test_boolean_ratings_are_bad_ratings(tmp_path: Path) -> None:
    t = ms(2023, 1, 1)
    good = [("u1", "R1", 4.0, t), ("u1", "R2", 5.0, t + DAY), ("u2", "R1", 3.0, t + DAY),
            ("u2", "R2", 2.0, t + 2 * DAY)]
    lines = review_lines(good)
    rec = json.loads(lines[0])
    for i, flag in enumerate((True, False)):
        lines.append(json.dumps({**rec, "rating": flag, "user_id": "u3", "parent_asin": f"R{i + 1}",
                                 "timestamp": t + 3 * DAY}))
    lines.append(json.dumps({**rec, "rating": "4.0", "user_id": "u3", "parent_asin": "R2",
                             "timestamp": t + 4 * DAY}))  # a number in a string still counts
    paths = Paths(tmp_path)
    write_gz(paths.meta_file(CAT), [meta("R1"), meta("R2")])
    write_gz(paths.reviews_file(CAT), lines)
    stats = run_window(make_params("reviews"), paths)
    assert stats["drops"]["bad_rating"] == 2
    assert stats["interactions"] == 5 and sum(stats["malformed"].values()) == 0


@pytest.mark.parametrize("which", ["meta", "interactions"])
def test_an_empty_file_names_the_file(tmp_path: Path, which: str) -> None:
    paths = setup(tmp_path, [("u", "A1", 1.0, ms(2023, 1, 1)), ("u", "A2", 1.0, ms(2023, 1, 2))])
    empty = paths.meta_file(CAT) if which == "meta" else paths.rating_only_file(CAT)
    write_gz(empty, [] if which == "meta" else [CSV_HEADER])
    with pytest.raises(WindowError, match=rf"{empty.name}: holds no data lines") as info:
        run_window(make_params(), paths)
    assert "download it again" not in str(info.value)
    assert "downloading it again gives the same file" in str(info.value)


def test_many_items_without_metadata_warn_even_when_their_lines_are_few(tmp_path: Path) -> None:
    t = ms(2023, 1, 1)
    rows = [(f"u{i}", "A0", 4.0, t + i * DAY) for i in range(8)]
    rows += [(f"u{i}", "A3", 4.0, t + (10 + i) * DAY) for i in range(5)]
    rows += [("u0", "A1", 4.0, t + 20 * DAY), ("u1", "A2", 4.0, t + 21 * DAY), ("u2", "A2", 4.0, t + 22 * DAY)]
    paths = setup(tmp_path, rows, [meta("A0"), meta("A3")])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats = run_window(make_params(), paths)
    assert stats["drops"]["no_metadata"] == 3 and stats["dropped_share"] == pytest.approx(3 / 16)
    assert [str(w.message) for w in seen] == [
        f"window: 2 of the 4 items rated in {CAT}.csv.gz (50.0%) have no valid metadata line (their "
        "interactions are no_metadata, 18.8% of the usable lines): check that both files are of the "
        "same data.category and complete"
    ]


def test_a_latin1_metadata_file_is_named_as_not_utf8(tmp_path: Path) -> None:
    paths = setup(tmp_path, [("u", "A1", 1.0, ms(2023, 1, 1)), ("u", "A2", 1.0, ms(2023, 1, 2))])
    text = "\n".join(meta(a, title=f"Caf\u00e9 Game {a}") for a in ("A1", "A2")) + "\n"
    with gzip.open(paths.meta_file(CAT), "wb") as fh:
        fh.write(text.replace("\\u00e9", "\u00e9").encode("latin-1"))
    with pytest.raises(WindowError) as info:
        run_window(make_params(), paths)
    msg = str(info.value)
    assert msg.startswith(f"{paths.meta_file(CAT)}: 2 of 2 lines are malformed")
    assert "it is not UTF-8 text (byte 0xe9 on line 1; Latin-1 or another encoding?)" in msg
    assert "convert its text to UTF-8" in msg and "download it again" not in msg


@pytest.mark.parametrize("which", ["meta", "interactions"])
@pytest.mark.parametrize("lines", [2, 3000])
def test_damaged_gzip_names_the_file(tmp_path: Path, which: str, lines: int) -> None:
    rows = [(f"u{i % 50}", f"A{i % 2 + 1}", 1.0, ms(2023, 1, 1) + i) for i in range(lines)]
    paths = setup(tmp_path, rows)
    damaged = paths.meta_file(CAT) if which == "meta" else paths.rating_only_file(CAT)
    blob = damaged.read_bytes()
    damaged.write_bytes(blob[: len(blob) // 2])  # truncated download
    with pytest.raises(WindowError, match=rf"{damaged.name}: could not be read .*download it again"):
        run_window(make_params(), paths)
    assert not paths.window_stats.exists()


def test_reading_shows_one_progress_bar_that_ends_at_100(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    paths = setup(tmp_path, [("u", "A1", 1.0, ms(2023, 1, 1)), ("u", "A2", 1.0, ms(2023, 1, 2))])
    run_window(make_params(), paths)
    err = capfd.readouterr().err
    bar = f"[window] read {paths.rating_only_file(CAT).name} and {paths.meta_file(CAT).name}: 100%"
    assert bar in err


def test_read_progress_is_the_mean_of_the_files_and_never_goes_back() -> None:
    class Cursor:
        def __init__(self) -> None:
            self.settings: list[str] = []

        def execute(self, sql: str) -> None:
            self.settings.append(sql)

        def query_progress(self) -> float:
            return -1.0  # between queries

    a, b = Path("a.csv.gz"), Path("b.jsonl.gz")
    cursors = {a: Cursor(), b: Cursor()}
    with _ReadProgress(cursors, every=60) as progress:  # type: ignore[arg-type]
        bar = progress._bar
        progress.advance(a, 40.0)
        assert bar.n == pytest.approx(20.0)
        progress.advance(a, 10.0)  # a later query of the same cursor starts at 0
        progress.advance(b, -1.0)
        assert bar.n == pytest.approx(20.0)
        progress.advance(b, 250.0)
        assert bar.n == pytest.approx(70.0)
        progress.advance(a, 100.0)
        assert bar.n == pytest.approx(100.0)
    for c in cursors.values():
        assert "SET enable_progress_bar = true" in c.settings
        assert "SET enable_progress_bar_print = false" in c.settings
