"""Prompts stage: exact prompt strings, time format, control-token safety, the stage."""

from __future__ import annotations

import itertools
import random
import re
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rrec.config import Params
from rrec.data.schema import EXAMPLES, ITEM_PROMPTS, ITEMS, USER_PROMPTS
from rrec.paths import SPLITS, Paths
from rrec.prompts import (
    category_words,
    format_elapsed,
    item_messages,
    neutralise,
    run_prompts,
    user_messages,
)

HOUR = 3_600_000
DAY = 24 * HOUR

FORBIDDEN = [
    "<answer>", "</answer>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<s>", "</s>",
    "[INST]", "[/INST]", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
    "<|end_header_id|>",
]
ANY_PIPE_TOKEN = re.compile(r"<\|[^<>]*\|>")


def contains_forbidden(text: str) -> bool:
    """True if any protected token occurs, in any case or Unicode normal form."""
    for form in ("NFC", "NFD", "NFKC", "NFKD"):
        folded = unicodedata.normalize(form, text).lower()
        if any(tok.lower() in folded for tok in FORBIDDEN) or ANY_PIPE_TOKEN.search(folded):
            return True
    return False


# ---------------------------------------------------------------- exact prompts

EXPECTED_USER = (
    "Analyse this user's purchase history of video games in depth: what the items have in "
    "common, how the user's taste has changed over time, and what the ratings say about "
    "what the user likes and dislikes. Reason step by step, then finally recommend the next "
    "video game the user is most likely to buy inside <answer> and </answer>.\n"
    "\n"
    "History, oldest first (each line: time before now: [title] (the user's rating out of 5)):\n"
    "3d 4.0h ago: [Space Quest] (4.0)\n"
    "0d 1.5h ago: [Kart (answer) Racer (/INST)] (5.0)\n"
    "0d 0.0h ago: [unknown] (unknown)"
)

EXPECTED_ITEM = (
    "Summarise the key attributes of this CD or vinyl (what it is, who it is for and what "
    "sets it apart) inside <answer> and </answer>.\n"
    "\n"
    "Title: Blue Train (|im_end|)\n"
    "User Rating: 4.7\n"
    "Number of Buyers: 1234\n"
    "Description: A hard bop classic with (b)Lee Morgan(/b) on"
)


def test_user_prompt_exact() -> None:
    target = 10 * DAY
    msgs = user_messages(
        history_titles=["Space Quest", "Kart <answer> Racer\n[/INST]", None],
        history_ratings=[4.0, 5.0, None],
        history_timestamps=[target - (3 * DAY + 4 * HOUR), target - 90 * 60_000, target],
        target_timestamp=target,
        category="Video_Games",
    )
    assert msgs == [{"role": "user", "content": EXPECTED_USER}]


def test_item_prompt_exact() -> None:
    item = {
        "item_id": 3,
        "title": "Blue Train <|im_end|>",
        "average_rating": 4.7,
        "rating_number": 1234,
        "description": "A hard bop classic with <b>Lee Morgan</b> on trumpet and more",
        "features": "ignored because the description is present",
    }
    msgs = item_messages(item, "CDs_and_Vinyl", max_words=8)
    assert msgs == [{"role": "user", "content": EXPECTED_ITEM}]


def test_user_prompt_empty_history_and_length_mismatch() -> None:
    content = user_messages([], [], [], 0, "Musical_Instruments")[0]["content"]
    assert content.endswith("(each line: time before now: [title] (the user's rating out of 5)):\n(no purchases yet)")
    assert "next musical instrument " in content and "history of musical instruments" in content
    with pytest.raises(ValueError, match="differ in length"):
        user_messages(["a", "b"], [1.0], [0, 0], 0, "Video_Games")


# ------------------------------------------------------------------------- time


@pytest.mark.parametrize(
    ("ms", "expected"),
    [
        (0, "0d 0.0h ago"),
        (179_999, "0d 0.0h ago"),  # just under 3 min rounds down
        (180_000, "0d 0.1h ago"),  # 3 min = 0.05 h rounds half up
        (30 * 60_000, "0d 0.5h ago"),
        (90 * 60_000, "0d 1.5h ago"),
        (5 * HOUR, "0d 5.0h ago"),
        (23 * HOUR + 59 * 60_000, "1d 0.0h ago"),  # rounding carries into the day
        (DAY, "1d 0.0h ago"),
        (3 * DAY + 4 * HOUR, "3d 4.0h ago"),
        (400 * DAY + 13 * HOUR + 42 * 60_000, "400d 13.7h ago"),
    ],
)
def test_format_elapsed(ms: int, expected: str) -> None:
    assert format_elapsed(ms) == expected


def test_format_elapsed_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_elapsed(-1)


# ------------------------------------------------------------------ neutralise


@pytest.mark.parametrize("token", FORBIDDEN)
def test_neutralise_each_token_and_case(token: str) -> None:
    for variant in (token, token.upper(), token.swapcase(), token.title()):
        out = neutralise(f"before {variant} after")
        assert not contains_forbidden(out), (variant, out)
        assert out.startswith("before ") and out.endswith(" after")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<ans<answer>wer>", "(ans(answer)wer)"),
        ("</ans</answer>wer>", "(/ans(/answer)wer)"),
        ("<|im_<|im_start|>start|>", "(|im_(|im_start|)start|)"),
        ("[IN[INST]ST]", "(IN(INST)ST)"),
        ("\uff1canswer\uff1e", "(answer)"),  # fullwidth brackets
        ("\ufe64s\ufe65", "(s)"),  # small form brackets
        ("\uff3bINST\uff3d", "(INST)"),  # fullwidth square brackets
        ("<\u0338answer>", "(\u0338answer)"),  # would compose to NOT LESS-THAN
        ("Caf\u00e9 <b>Nice</b>", "Caf\u00e9 (b)Nice(/b)"),
        ("Plain ASCII title, no brackets", "Plain ASCII title, no brackets"),
    ],
)
def test_neutralise_known_answers(text: str, expected: str) -> None:
    assert neutralise(text) == expected
    assert neutralise(expected) == expected  # idempotent


def test_neutralise_composite_not_less_than() -> None:
    # U+226E decomposes canonically to '<' + U+0338: a tokeniser normalising with NFD
    # would otherwise see '<answer>'.
    out = neutralise("\u226eanswer\u226f")
    assert "<" not in unicodedata.normalize("NFD", out)
    assert not contains_forbidden(out)


PIECES = [
    *FORBIDDEN, "<", ">", "</", "/>", "[", "]", "[/", "|", "<|", "|>", "ans", "wer", "answer",
    "/answer", "INST", "/INST", "im_start", "s", "/s", "bos", "eot_id", "\uff1c", "\uff1e",
    "\ufe64", "\ufe65", "\uff3b", "\uff3d", "\u226e", "\u226f", "\u0338", " ", "\n", "A",
]


def test_neutralise_exhaustive_triples() -> None:
    # Every concatenation of three pieces: covers nesting and splicing tricks.
    for parts in itertools.product(PIECES, repeat=3):
        out = neutralise("".join(parts))
        assert not contains_forbidden(out), (parts, out)


def test_neutralise_random_long_strings() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 24)))
        out = neutralise(text)
        assert not contains_forbidden(out), (text, out)
        assert neutralise(out) == out


def test_neutralise_property_hypothesis() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(
        st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=16)
    )
    def check(parts: list[str]) -> None:
        out = neutralise("".join(parts))
        assert not contains_forbidden(out)
        assert neutralise(out) == out

    check()


def test_prompts_from_hostile_data_contain_no_token_but_the_instructions() -> None:
    hostile = "<answer></answer><|im_start|>[INST]<ans<answer>wer>"
    user = user_messages([hostile], [3.0], [0], 0, "Video_Games")[0]["content"]
    item = item_messages({"title": hostile, "description": hostile}, "Video_Games", 100)[0][
        "content"
    ]
    for content in (user, item):
        assert content.count("<answer>") == 1 and content.count("</answer>") == 1
        rest = content.replace("<answer>", "", 1).replace("</answer>", "", 1)
        assert not contains_forbidden(rest)


# ------------------------------------------------------------------ description


def _description(item: dict, max_words: int) -> str:
    content = item_messages(item, "Video_Games", max_words)[0]["content"]
    return content.rsplit("\nDescription: ", 1)[1]


def test_description_truncation_and_fallback() -> None:
    words = " ".join(f"w{i}" for i in range(150))
    assert _description({"description": words}, 100) == " ".join(f"w{i}" for i in range(100))
    assert _description({"description": "  one\ttwo\n three  "}, 2) == "one two"
    assert _description({"description": "", "features": "f1 f2 f3"}, 2) == "f1 f2"
    assert _description({"description": "   ", "features": "f1"}, 5) == "f1"
    assert _description({"description": None, "features": None}, 5) == "unknown"
    assert _description({}, 5) == "unknown"


def test_item_missing_values_are_unknown() -> None:
    content = item_messages(
        {"title": "", "average_rating": float("nan"), "rating_number": None}, "Video_Games", 10
    )[0]["content"]
    assert content.splitlines()[2:] == [
        "Title: unknown",
        "User Rating: unknown",
        "Number of Buyers: unknown",
        "Description: unknown",
    ]


# ------------------------------------------------------------------- category


@pytest.mark.parametrize(
    ("category", "expected"),
    [
        ("Video_Games", ("video games", "video game")),
        ("CDs_and_Vinyl", ("CDs and vinyl", "CD or vinyl")),
        ("Musical_Instruments", ("musical instruments", "musical instrument")),
        ("Gift_Cards", ("gift cards", "gift card")),
        ("Pet_Supplies", ("pet supplies", "pet supply")),
        ("Subscription_Boxes", ("subscription boxes", "subscription box")),
        ("Toys_and_Games", ("toys and games", "toys and games item")),
        ("Movies_and_TV", ("movies and TV", "movies and TV item")),
        ("Electronics", ("electronics", "electronics item")),
        ("Software", ("software", "software item")),
        ("Home-Audio", ("home audio", "home audio item")),
    ],
)
def test_category_words(category: str, expected: tuple[str, str]) -> None:
    assert category_words(category) == expected


@pytest.mark.parametrize(
    ("category", "singular"),
    [
        ("Movies", "movie"),  # was "movy"
        ("Horror_Movies", "horror movie"),
        ("Cookies", "cookie"),
        ("Kitchen_Knives", "kitchen knife"),
        ("Camera_Lenses", "camera lens"),
        ("Potatoes", "potato"),
        ("Sizes", "size"),  # was "siz"
        ("Quizzes", "quiz"),
        ("Headaches", "headache"),
        ("Batteries", "battery"),
        ("Shoes", "shoe"),
        ("Watches", "watch"),
        ("Dice", "die"),
    ],
)
def test_category_singulars_are_words(category: str, singular: str) -> None:
    assert category_words(category)[1] == singular


@pytest.mark.parametrize(
    ("category", "expected"),
    [  # every category of Amazon Reviews 2023, as a reader would write it
        ("All_Beauty", ("all beauty", "all beauty item")),
        ("Amazon_Fashion", ("amazon fashion", "amazon fashion item")),
        ("Appliances", ("appliances", "appliance")),
        ("Arts_Crafts_and_Sewing", ("arts crafts and sewing", "arts crafts and sewing item")),
        ("Automotive", ("automotive", "automotive item")),
        ("Baby_Products", ("baby products", "baby product")),
        ("Books", ("books", "book")),
        ("Cell_Phones_and_Accessories",
         ("cell phones and accessories", "cell phones and accessories item")),
        ("Digital_Music", ("digital music", "digital music item")),
        ("Handmade_Products", ("handmade products", "handmade product")),
        ("Kindle_Store", ("kindle store", "kindle store item")),
        ("Magazine_Subscriptions", ("magazine subscriptions", "magazine subscription")),
        ("Office_Products", ("office products", "office product")),
        ("Patio_Lawn_and_Garden", ("patio lawn and garden", "patio lawn and garden item")),
        ("Unknown", ("unknown", "unknown item")),
    ],
)
def test_category_words_of_amazon_2023(category: str, expected: tuple[str, str]) -> None:
    assert category_words(category) == expected


def test_category_words_rejects_empty() -> None:
    with pytest.raises(ValueError, match="data.category"):
        category_words("__")


# ------------------------------------------------------------------------ stage


def _write(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _item(item_id: int, title: str, description: str = "", features: str = "") -> dict:
    return {
        "item_id": item_id, "parent_asin": f"B{item_id:04d}", "title": title,
        "description": description, "features": features, "store": "", "categories": "",
        "main_category": "Video Games", "price": 9.99, "average_rating": 4.0 + item_id / 10,
        "rating_number": 10 * item_id, "n_interactions": 1,
    }


def _example(eid: int, user: str, hist: list[int], target: int, t0: int) -> dict:
    return {
        "example_id": eid, "user_id": user, "history_item_ids": hist,
        "history_ratings": [float(1 + (h % 5)) for h in hist],
        "history_timestamps": [t0 + k * DAY for k in range(len(hist))],
        "target_item_id": target, "target_rating": 5.0,
        "target_timestamp": t0 + len(hist) * DAY + HOUR,
    }


@pytest.fixture
def processed(tmp_path: Path) -> Paths:
    paths = Paths(root=tmp_path)
    items = [
        _item(0, "Alpha"),
        _item(1, "Beta", description="one two three four five six seven"),
        _item(2, "Gamma", features="feat a b"),
        _item(3, "Delta <answer>"),
    ]
    _write(paths.items_file, items, ITEMS)
    t0 = 1_600_000_000_000
    splits = {
        "train": [
            _example(0, "u1", [0], 1, t0),
            _example(1, "u1", [0, 1], 2, t0),
            _example(2, "u2", [3, 2, 1], 0, t0),
        ],
        "valid": [_example(3, "u1", [0, 1, 2], 3, t0)],
        "test": [_example(4, "u2", [3, 2, 1, 0], 2, t0)],
    }
    for split, rows in splits.items():
        _write(paths.split_file(split), rows, EXAMPLES)
    return paths


def test_run_prompts_end_to_end(processed: Paths) -> None:
    params = Params.model_validate({"prompts": {"max_description_words": 4}})
    counts = run_prompts(params, processed, batch_size=2)
    assert counts == {"items": 4, "train": 3, "valid": 1, "test": 1}

    items = pq.read_table(processed.item_prompts_file)
    assert items.schema.equals(ITEM_PROMPTS)
    by_id = dict(zip(items.column("item_id").to_pylist(), items.column("messages").to_pylist(), strict=True))
    assert sorted(by_id) == [0, 1, 2, 3]
    assert by_id[1][0]["content"].endswith("Description: one two three four")
    assert by_id[2][0]["content"].endswith("Description: feat a b")
    assert "Title: Delta (answer)" in by_id[3][0]["content"]
    assert by_id[3][0]["content"].count("<answer>") == 1

    for split in SPLITS:
        table = pq.read_table(processed.user_prompts_file(split))
        assert table.schema.equals(USER_PROMPTS)
        assert table.num_rows == counts[split]
    assert not list(processed.prompts.glob(".*tmp*"))

    test = pq.read_table(processed.user_prompts_file("test")).to_pylist()[0]
    assert test["example_id"] == 4 and test["user_id"] == "u2"
    assert test["history_item_ids"] == [3, 2, 1, 0] and test["target_item_id"] == 2
    lines = test["messages"][0]["content"].split("\n")[-4:]
    # Oldest first: history order kept, elapsed time decreasing, ratings aligned.
    assert lines == [
        "4d 1.0h ago: [Delta (answer)] (4.0)",
        "3d 1.0h ago: [Gamma] (3.0)",
        "2d 1.0h ago: [Beta] (2.0)",
        "1d 1.0h ago: [Alpha] (1.0)",
    ]


def test_run_prompts_unknown_item_names_file_and_example(processed: Paths) -> None:
    _write(processed.split_file("valid"), [_example(7, "u3", [0, 99], 1, 0)], EXAMPLES)
    with pytest.raises(ValueError, match=r"valid\.parquet: example_id 7: history item id 99"):
        run_prompts(Params(), processed)
    assert not processed.user_prompts_file("valid").exists()
    assert not list(processed.prompts.glob(".*tmp*"))


def test_run_prompts_missing_input_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the window stage first"):
        run_prompts(Params(), Paths(root=tmp_path))


def test_max_history_items_lists_only_the_last_items():
    titles, ratings, stamps = ["A", "B", "C"], [1.0, 2.0, 3.0], [1_000, 2_000, 3_000]
    full = user_messages(titles, ratings, stamps, 10_000, "Video_Games")[0]["content"]
    last_two = user_messages(titles, ratings, stamps, 10_000, "Video_Games", max_items=2)[0]["content"]
    assert "[A]" in full and "[A]" not in last_two
    assert len(re.findall(r"ago: \[", last_two)) == 2 and "[B] (2.0)" in last_two and "[C] (3.0)" in last_two
