"""Titles as users and the model read them: HTML entities unescaped and accents folded
("Xbox One Édition Spéciale" -> "Xbox One Edition Speciale", "Hero&#39;s" -> "Hero's"),
while the items the window keeps are decided by the authors' cleaning, as before."""

from __future__ import annotations

from pathlib import Path

from rrec.data.window import run_window
from rrec.paths import Paths
from rrec.prompts import item_messages
from tests.test_window import items_by_asin, make_params, meta, ms, setup

WORDS19 = " ".join(f"w{i}" for i in range(19))


def test_titles_keep_their_letters_and_the_window_keeps_the_same_items(tmp_path: Path) -> None:
    lines = [
        meta("B1", "Xbox One \u00c9dition Sp\u00e9ciale"),
        meta("B2", "&quot;A Hero&#39;s Tale&quot; 'Deluxe'"),
        meta("B3", "\u00c9a"),  # the authors' form is "a": short_title, though folding gives "Ea"
        meta("B4", WORDS19 + " \u00e9 x"),  # 21 words as written: long_title
        meta("B5", "\u9f8d\u306e\u4f1d\u8aac Deluxe \u2122"),  # CJK has no ASCII form
    ]
    rows = [("u1", f"B{i}", 4.0, ms(2023, 1, i)) for i in range(1, 6)]
    stats = run_window(make_params(), setup(tmp_path, rows, lines))
    assert stats["drops"]["short_title"] == 1 and stats["drops"]["long_title"] == 1
    items = items_by_asin(Paths(tmp_path))
    assert set(items) == {"B1", "B2", "B5"}
    assert items["B1"]["title"] == "Xbox One Edition Speciale"
    assert items["B2"]["title"] == "A Hero's Tale Deluxe"  # quotes gone, the apostrophe kept
    assert items["B5"]["title"] == "Deluxe TM"
    prompt = item_messages(items["B1"], "Video_Games", 100)[-1]["content"]
    assert "Title: Xbox One Edition Speciale" in prompt
