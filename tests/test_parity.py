"""Parity with the data protocol (rrec/data/window.py) on a fixture small enough to work out by hand.

Every expected value below was derived on paper from that protocol (item cleaning,
temporal window rolled back month by month, one interaction per (user, item), examples
with the previous items as history, a global temporal 80/10/10 split at floor(0.8 N) and
floor(0.9 N)), not by running the project. The derivation is in the comments.
"""

from __future__ import annotations

from pathlib import Path

from rrec.data.window import run_window
from rrec.paths import SPLITS
from tests.test_window import make_params, meta, ms, read, setup

# Metadata. I03 has no parseable price and I04 a one-character title: both are dropped,
# with their interactions.
META = [
    meta("I01", "Alpha", 10),
    meta("I02", "Beta", "12.50"),
    meta("I03", "Gamma", "None"),  # bad_price
    meta("I04", "X", 3),  # short_title
    meta("I05", "Delta", 7),
    meta("I06", "Epsilon", 8),
    meta("I07", "Zeta", 9),
    meta("I08", "Eta", 11),
]

# (user, item, rating, timestamp); 12:00 UTC unless said otherwise. 18 lines.
ROWS = [
    ("u1", "I01", 5.0, ms(2023, 1, 1)),
    ("u1", "I02", 4.0, ms(2023, 1, 5)),
    ("u1", "I03", 3.0, ms(2023, 1, 7)),  # no_metadata
    ("u1", "I05", 2.0, ms(2023, 2, 1)),
    ("u1", "I01", 1.0, ms(2023, 3, 1)),  # the second (u1, I01): duplicate
    ("u2", "I07", 4.0, ms(2022, 6, 10)),  # inside only after one month of roll-back
    ("u2", "I02", 5.0, ms(2023, 1, 3)),
    ("u2", "I06", 3.0, ms(2023, 2, 10)),
    ("u3", "I05", 4.0, ms(2023, 1, 2)),
    ("u3", "I08", 5.0, ms(2023, 7, 1, 0)),  # first millisecond after the end: outside
    ("u3", "I06", 4.0, ms(2023, 1, 20)),
    ("u3", "I04", 1.0, ms(2023, 1, 21)),  # no_metadata
    ("u4", "I08", 3.0, ms(2021, 1, 1)),  # long before the window: outside
    ("u4", "I01", 4.0, ms(2023, 4, 1)),  # u4's only interaction inside: no example
    ("u5", "I06", 5.0, ms(2023, 5, 1)),
    ("u5", "I08", 4.0, ms(2023, 5, 2)),
    ("u5", "I01", 3.0, ms(2023, 5, 3)),
    ("u5", "I02", 2.0, ms(2023, 5, 4)),
]


def test_window_examples_and_splits_match_the_spec_by_hand(tmp_path: Path) -> None:
    paths = setup(tmp_path, ROWS, META)
    # end 2023-06-30, 12 months: [2022-06-30, 2023-06-30] holds I01, I02, I05, I06, I08
    # (5 items); min_items 6 moves the start back one month, to 2022-05-30, which takes
    # in I07 (2022-06-10): 6 items, so it stops there.
    stats = run_window(make_params(end="2023-06-30", months=12, min_items=6), paths)

    assert (stats["window_start"], stats["window_end"]) == ("2022-05-30", "2023-06-30")
    assert stats["months_rolled_back"] == 1 and stats["min_items_reached"] is True
    assert stats["drops"] == {
        "missing_title": 0, "span_title": 0, "short_title": 1, "long_title": 0,
        "bad_price": 1, "duplicate_meta": 0, "bad_rating": 0, "bad_timestamp": 0,
        "no_metadata": 2,  # u1/I03, u3/I04
        "outside_window": 2,  # u3/I08 (after the end), u4/I08 (2021)
        "duplicate_interactions": 1,  # u1/I01 of 2023-03-01
        "kcore": 0,
    }
    # In the window: u1 3, u2 3, u3 2, u4 1, u5 4 = 13 interactions of 5 users on 6 items;
    # every interaction but each user's first is an example: 13 - 5 = 8.
    assert (stats["users"], stats["items"], stats["interactions"], stats["examples"]) == (5, 6, 13, 8)
    # floor(0.8 * 8) = 6, floor(0.9 * 8) = 7: train 6, valid 7 - 6 = 1, test 8 - 7 = 1.
    assert (stats["train"], stats["valid"], stats["test"]) == (6, 1, 1)

    # Item ids in parent_asin order.
    items = read(paths.items_file)
    assert [(r["item_id"], r["parent_asin"], r["n_interactions"]) for r in items] == [
        (0, "I01", 3), (1, "I02", 3), (2, "I05", 2), (3, "I06", 3), (4, "I07", 1), (5, "I08", 1),
    ]

    # Per user by time, each position t >= 1 with the previous items; all examples
    # ordered by the target's timestamp.
    expected = [
        # (user, history ids, history ratings, target id, target rating, target time)
        ("u2", [4], [4.0], 1, 5.0, ms(2023, 1, 3)),
        ("u1", [0], [5.0], 1, 4.0, ms(2023, 1, 5)),
        ("u3", [2], [4.0], 3, 4.0, ms(2023, 1, 20)),
        ("u1", [0, 1], [5.0, 4.0], 2, 2.0, ms(2023, 2, 1)),
        ("u2", [4, 1], [4.0, 5.0], 3, 3.0, ms(2023, 2, 10)),
        ("u5", [3], [5.0], 5, 4.0, ms(2023, 5, 2)),  # last train example
        ("u5", [3, 5], [5.0, 4.0], 0, 3.0, ms(2023, 5, 3)),  # valid
        ("u5", [3, 5, 0], [5.0, 4.0, 3.0], 1, 2.0, ms(2023, 5, 4)),  # test
    ]
    history_times = {
        ("u2", 1): [ms(2022, 6, 10)],
        ("u1", 1): [ms(2023, 1, 1)],
        ("u3", 3): [ms(2023, 1, 2)],
        ("u1", 2): [ms(2023, 1, 1), ms(2023, 1, 5)],
        ("u2", 3): [ms(2022, 6, 10), ms(2023, 1, 3)],
        ("u5", 5): [ms(2023, 5, 1)],
        ("u5", 0): [ms(2023, 5, 1), ms(2023, 5, 2)],
        ("u5", 1): [ms(2023, 5, 1), ms(2023, 5, 2), ms(2023, 5, 3)],
    }
    splits = {s: read(paths.split_file(s)) for s in SPLITS}
    got = {
        s: [(e["user_id"], e["history_item_ids"], e["history_ratings"], e["target_item_id"],
             e["target_rating"], e["target_timestamp"]) for e in rows]
        for s, rows in splits.items()
    }
    assert got == {"train": expected[:6], "valid": expected[6:7], "test": expected[7:]}
    for rows in splits.values():
        for e in rows:
            assert e["history_timestamps"] == history_times[(e["user_id"], e["target_item_id"])]
    assert [e["example_id"] for s in SPLITS for e in splits[s]] == list(range(8))
