"""User and item prompts as chat messages (docs/method.md), and control-token safety.

The prompts are model-independent: each is a list of chat messages
``[{"role": "user", "content": ...}]`` with no chat template applied and no system
turn (Gemma's template has none). Whoever tokenises applies the backbone's chat
template and, for item prompts, pre-fills the assistant turn with ``<answer>``.

User prompt (one per example)::

    <instruction naming <answer> and </answer>>

    History, oldest first (...):
    3d 4.0h ago: [Some Title] (4.0)
    0d 2.5h ago: [Another Title] (5.0)

Item prompt (one per item)::

    <instruction naming <answer> and </answer>>

    Title: ...
    User Rating: 4.3          (average_rating, one decimal)
    Number of Buyers: 1234    (rating_number)
    Description: ...          (description, else features; at most N words)

A missing value is written ``unknown``.

Time before the target (``format_elapsed``): the gap is rounded to the nearest tenth
of an hour (halves up), then written ``{days}d {hours:.1f}h ago`` with
``0 <= hours < 24``: 0 ms -> ``0d 0.0h ago``, 90 min -> ``0d 1.5h ago``,
3 days 4 hours -> ``3d 4.0h ago``. Rounding happens before the split into days, so
23.97 h reads ``1d 0.0h ago``, never ``0d 24.0h ago``.

Control-token safety (``neutralise``): every string that comes from data is

1. decomposed with Unicode NFKD (fullwidth ``＜``, small ``﹤`` and the canonical
   composite ``≮`` = ``<`` + U+0338 all expose a plain ``<``; likewise for ``>``,
   ``[`` and ``]``),
2. stripped of the four brackets by a character translation
   ``<`` -> ``(``, ``>`` -> ``)``, ``[`` -> ``(``, ``]`` -> ``)``,
3. recomposed with NFC (accented letters come back; composition never creates a
   bracket, since none of ``<>[]`` is a composite character).

Proof sketch: the result contains none of ``<>[]``, and neither does its NFC, NFD,
NFKC or NFKD form (a bracket could only come from decomposing a character, and every
character of the result is the composition of bracket-free decomposed characters).
Every protected token (``<answer>``, ``</answer>``, ``<|im_start|>``, ``<bos>``,
``<s>``, ``[INST]``, any ``<|...|>``, ...) contains at least one of these brackets, so
no such token can occur in the result, in any letter case, whatever nesting
(``<ans<answer>wer>``) or interleaving the input used: nothing is deleted, so no
deletion can splice a token together. Square brackets are translated too, which also
keeps a title from closing the ``[title]`` bracket of its history line early.
Data fields are additionally collapsed to one line (all whitespace runs, newlines
included, become one space) so a title cannot forge a history line.

Category words (``category_words``): Video_Games, CDs_and_Vinyl and
Musical_Instruments use fixed words. Any other name is split on ``_``, ``-`` and
spaces; a word with two or more capitals (``CDs``, ``TV``) keeps its case, others are
lower-cased; the joined words are the plural form. The singular form singularises
the last word when the name has no ``and`` and that word is a plural whose singular is
known to be a word: first a list of plurals the regular rules get wrong (``movies`` ->
``movie``, not ``movy``; ``knives`` -> ``knife``; ``lenses`` -> ``lens``; ``caches`` ->
``cache``; ``tomatoes`` -> ``tomato``; ...), else the regular rules (``-ies`` -> ``-y``;
``-sses``/``-ches``/``-shes``/``-xes``/``-zzes`` drop ``es``; other ``-s`` drop ``s``,
except ``-ss``, ``-us``, ``-is``, ``-ics``). Otherwise (no ``s`` plural, or an ``and``)
it falls back to the plural form followed by ``item``. Gift_Cards -> ("gift cards",
"gift card"); Movies -> ("movies", "movie"); Toys_and_Games -> ("toys and games",
"toys and games item"); Software -> ("software", "software item").
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from rrec.atomic import atomic_path
from rrec.config import Params
from rrec.data.schema import ITEM_PROMPTS, USER_PROMPTS
from rrec.paths import SPLITS, Paths

UNKNOWN = "unknown"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

USER_INSTRUCTION = (
    "Analyse this user's purchase history of {plural} in depth: what the items have in "
    "common, how the user's taste has changed over time, and what the ratings say about "
    "what the user likes and dislikes. Reason step by step, then finally recommend the "
    "next {singular} the user is most likely to buy inside " + ANSWER_OPEN + " and "
    + ANSWER_CLOSE + "."
)
HISTORY_HEADER = (
    "History, oldest first (each line: time before now: [title] (the user's rating out of 5)):"
)
EMPTY_HISTORY = "(no purchases yet)"
ITEM_INSTRUCTION = (
    "Summarise the key attributes of this {singular} (what it is, who it is for and what "
    "sets it apart) inside " + ANSWER_OPEN + " and " + ANSWER_CLOSE + "."
)

_NAMED_CATEGORIES: dict[str, tuple[str, str]] = {
    "video_games": ("video games", "video game"),
    "cds_and_vinyl": ("CDs and vinyl", "CD or vinyl"),
    "musical_instruments": ("musical instruments", "musical instrument"),
}

_BRACKETS = str.maketrans({"<": "(", ">": ")", "[": "(", "]": ")"})
_MS_PER_TENTH_HOUR = 360_000
_TENTHS_PER_DAY = 240


# ------------------------------------------------------------------- safety


def neutralise(text: str) -> str:
    """Make data text unable to produce any control or chat-template token.

    NFKD, then ``<>[]`` -> ``()()``, then NFC; see the module docstring for why this
    is sufficient. Idempotent; ASCII text without brackets is returned unchanged.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", decomposed.translate(_BRACKETS))


def _field(value: Any) -> str:
    """A data-derived text field: neutralised, on one line, ``unknown`` when empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNKNOWN
    text = " ".join(neutralise(str(value)).split())
    return text or UNKNOWN


def _number(value: Any, fmt: str) -> str:
    if value is None:
        return UNKNOWN
    try:
        number = float(value)
    except (TypeError, ValueError):
        return UNKNOWN
    if math.isnan(number) or math.isinf(number):
        return UNKNOWN
    return format(number, fmt)


# ---------------------------------------------------------------- category


# Plurals whose singular the regular rules below get wrong: -ie nouns (the -ies rule
# would make "movies" "movy"), f/fe -> ves, -o -> oes, -us/-as/-is/-ns -> es, -che -> ches,
# -z -> zzes and a few irregular ones.
_IRREGULAR_PLURALS: dict[str, str] = {
    **{w + "s": w for w in (
        "movie", "cookie", "hoodie", "zombie", "beanie", "brownie", "smoothie", "selfie",
        "onesie", "veggie", "goodie", "bootie", "rookie", "calorie", "tie", "pie", "die",
        "lie", "genie", "pixie", "freebie", "sweetie", "newbie", "birdie", "collie",
        "auntie", "nightie", "walkie-talkie", "headache", "cache", "niche", "avalanche",
        "quiche", "cliche", "moustache", "mustache", "psyche", "pastiche",
    )},
    **{w + "es": w for w in (
        "tomato", "potato", "hero", "echo", "mango", "volcano", "domino", "torpedo",
        "tornado", "mosquito", "veto", "cargo", "buffalo", "lens", "bus", "gas", "bonus",
        "virus", "canvas", "atlas", "alias", "bias", "campus", "circus", "chorus", "cactus",
        "octopus", "status", "census", "genius", "walrus", "iris",
    )},
    "knives": "knife", "wives": "wife", "lives": "life", "shelves": "shelf",
    "leaves": "leaf", "halves": "half", "scarves": "scarf", "wolves": "wolf",
    "loaves": "loaf", "calves": "calf", "thieves": "thief", "quizzes": "quiz",
    "analyses": "analysis", "crises": "crisis", "theses": "thesis", "diagnoses": "diagnosis",
    "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
    "mice": "mouse", "geese": "goose", "people": "person", "dice": "die",
}


def _with_case_of(word: str, singular: str) -> str:
    """`singular` in the letter case of `word` (lower, Title or UPPER)."""
    if word.isupper() and len(word) > 1:
        return singular.upper()
    if word[:1].isupper():
        return singular[:1].upper() + singular[1:]
    return singular


def _singular_word(word: str) -> str | None:
    """The singular of an English plural, or None if `word` does not look like one."""
    lower = word.lower()
    known = _IRREGULAR_PLURALS.get(lower)
    if known is not None:
        return _with_case_of(word, known)
    if len(word) > 3 and lower.endswith("ies"):
        return word[:-3] + ("Y" if word[-3:].isupper() else "y")
    if lower.endswith(("sses", "ches", "shes", "xes", "zzes")):
        return word[:-2]
    if lower.endswith("s") and not lower.endswith(("ss", "us", "is", "ics")) and len(word) > 1:
        return word[:-1]
    return None


def category_words(category: str) -> tuple[str, str]:
    """(plural, singular) readable words for a category name, e.g. Video_Games."""
    named = _NAMED_CATEGORIES.get(category.strip().lower())
    if named is not None:
        return named
    words = [
        w if sum(c.isupper() for c in w) >= 2 else w.lower()
        for w in re.split(r"[_\-\s]+", neutralise(category))
        if w
    ]
    if not words:
        raise ValueError(
            f"category {category!r} has no letters or digits to name it by; "
            "set data.category to an Amazon Reviews 2023 name such as 'Video_Games'"
        )
    plural = " ".join(words)
    last = _singular_word(words[-1]) if "and" not in words else None
    singular = " ".join([*words[:-1], last]) if last else f"{plural} item"
    return plural, singular


# -------------------------------------------------------------------- time


def format_elapsed(ms: int) -> str:
    """Time before the target, ``{d}d {h:.1f}h ago`` (rounded to 0.1 h, halves up)."""
    ms = int(ms)
    if ms < 0:
        raise ValueError(
            f"elapsed time is negative ({ms} ms): a history interaction is later than the "
            "target it precedes; history timestamps must be <= the target timestamp"
        )
    tenths = (ms + _MS_PER_TENTH_HOUR // 2) // _MS_PER_TENTH_HOUR
    days, rest = divmod(tenths, _TENTHS_PER_DAY)
    return f"{days}d {rest // 10}.{rest % 10}h ago"


# ----------------------------------------------------------------- prompts


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def user_messages(
    history_titles: Sequence[str | None],
    history_ratings: Sequence[float | None],
    history_timestamps: Sequence[int],
    target_timestamp: int,
    category: str,
    max_items: int | None = None,
) -> list[dict[str, str]]:
    """The user prompt for a history given oldest first; timestamps in ms. With
    `max_items` (`prompts.max_history_items`) it lists only the last `max_items`."""
    n = len(history_titles)
    if len(history_ratings) != n or len(history_timestamps) != n:
        raise ValueError(
            f"history lists differ in length: {n} titles, {len(history_ratings)} ratings, "
            f"{len(history_timestamps)} timestamps; pass one rating and one timestamp per title"
        )
    if max_items is not None:
        history_titles, history_ratings, history_timestamps = (
            history_titles[-max_items:], history_ratings[-max_items:], history_timestamps[-max_items:]
        )
    plural, singular = category_words(category)
    lines = [
        f"{format_elapsed(target_timestamp - ts)}: [{_field(title)}] ({_number(rating, '.1f')})"
        for title, rating, ts in zip(history_titles, history_ratings, history_timestamps, strict=True)
    ]
    body = "\n".join(lines) if lines else EMPTY_HISTORY
    instruction = USER_INSTRUCTION.format(plural=plural, singular=singular)
    return _user(f"{instruction}\n\n{HISTORY_HEADER}\n{body}")


def truncate_words(text: str, max_words: int) -> str:
    """The first `max_words` whitespace-separated words of `text`, joined by single spaces."""
    return " ".join(text.split()[:max_words])


def item_messages(item: Mapping[str, Any], category: str, max_words: int) -> list[dict[str, str]]:
    """The item prompt for one ITEMS row (title, average_rating, rating_number,
    description, features; absent keys read as missing)."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1 (got {max_words}); see prompts.max_description_words")
    _, singular = category_words(category)
    description = _field(item.get("description"))
    if description == UNKNOWN:
        description = _field(item.get("features"))
    if description != UNKNOWN:
        description = truncate_words(description, max_words)
    rating_number = item.get("rating_number")
    content = "\n".join(
        [
            ITEM_INSTRUCTION.format(singular=singular),
            "",
            f"Title: {_field(item.get('title'))}",
            f"User Rating: {_number(item.get('average_rating'), '.1f')}",
            f"Number of Buyers: {_number(rating_number, '.0f')}",
            f"Description: {description}",
        ]
    )
    return _user(content)


# ------------------------------------------------------------------- stage


def _require(path: Path, needed: Sequence[str]) -> pq.ParquetFile:
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found; run the window stage first (`dvc repro window`)"
        )
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err}); rerun the window stage") from err
    missing = [c for c in needed if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing} of the schema in rrec/data/schema.py; "
            "rerun the window stage"
        )
    return pf


_ITEM_COLUMNS = ("item_id", "title", "description", "features", "average_rating", "rating_number")
_EXAMPLE_COLUMNS = (
    "example_id", "user_id", "history_item_ids", "history_ratings",
    "history_timestamps", "target_item_id", "target_timestamp",
)


def _item_prompts(items: pa.Table, path: Path, category: str, max_words: int) -> pa.Table:
    rows = items.to_pylist()
    ids: list[int] = []
    messages: list[list[dict[str, str]]] = []
    for row in tqdm(rows, desc="item prompts", unit="item"):
        if row["item_id"] is None:
            raise ValueError(f"{path}: a row has a null item_id; rerun the window stage")
        ids.append(row["item_id"])
        messages.append(item_messages(row, category, max_words))
    return pa.Table.from_pydict({"item_id": ids, "messages": messages}, schema=ITEM_PROMPTS)


def _user_batch(
    batch: pa.RecordBatch,
    titles: Mapping[int, str | None],
    path: Path,
    category: str,
    max_history_items: int | None = None,
) -> pa.RecordBatch:
    cols = {name: batch.column(name).to_pylist() for name in _EXAMPLE_COLUMNS}
    messages: list[list[dict[str, str]]] = []
    for i, example_id in enumerate(cols["example_id"]):
        hist_ids = cols["history_item_ids"][i] or []
        ratings = cols["history_ratings"][i] or []
        stamps = cols["history_timestamps"][i] or []
        target_ts = cols["target_timestamp"][i]
        where = f"{path}: example_id {example_id}"
        if target_ts is None:
            raise ValueError(f"{where}: target_timestamp is null; rerun the window stage")
        if cols["target_item_id"][i] not in titles:
            raise ValueError(
                f"{where}: target_item_id {cols['target_item_id'][i]} is not in the items file; "
                "items and splits come from different window runs, rerun the window stage"
            )
        try:
            hist_titles = [titles[item_id] for item_id in hist_ids]
        except KeyError as err:
            raise ValueError(
                f"{where}: history item id {err.args[0]} is not in the items file; "
                "items and splits come from different window runs, rerun the window stage"
            ) from None
        try:
            messages.append(
                user_messages(hist_titles, ratings, stamps, target_ts, category, max_history_items)
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from err
    return pa.RecordBatch.from_pydict(
        {
            "example_id": cols["example_id"],
            "user_id": cols["user_id"],
            "history_item_ids": cols["history_item_ids"],
            "target_item_id": cols["target_item_id"],
            "messages": messages,
        },
        schema=USER_PROMPTS,
    )


def run_prompts(params: Params, paths: Paths, batch_size: int = 4096) -> dict[str, int]:
    """Write the item prompts and the user prompts of every split; return row counts.

    Reads ``paths.items_file`` and ``paths.split_file(split)`` (the window stage's
    outputs), writes ``paths.item_prompts_file`` and ``paths.user_prompts_file(split)``.
    Each file is written to a temporary sibling and moved into place when complete.
    `batch_size` only bounds memory (examples per Parquet record batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    category = params.data.category
    max_words = params.prompts.max_description_words

    items_path = paths.items_file
    items = _require(items_path, _ITEM_COLUMNS).read(columns=list(_ITEM_COLUMNS))
    item_ids = items.column("item_id").to_pylist()
    if len(set(item_ids)) != len(item_ids):
        raise ValueError(f"{items_path}: item_id values are not unique; rerun the window stage")
    titles: dict[int, str | None] = dict(zip(item_ids, items.column("title").to_pylist(), strict=True))

    counts: dict[str, int] = {}
    table = _item_prompts(items, items_path, category, max_words)
    with atomic_path(paths.item_prompts_file) as tmp:
        pq.write_table(table, tmp)
    counts["items"] = table.num_rows

    for split in SPLITS:
        split_path = paths.split_file(split)
        pf = _require(split_path, _EXAMPLE_COLUMNS)
        n_rows = pf.metadata.num_rows
        with (
            atomic_path(paths.user_prompts_file(split)) as tmp,
            pq.ParquetWriter(tmp, USER_PROMPTS) as writer,
            tqdm(total=n_rows, desc=f"user prompts ({split})", unit="example") as bar,
        ):
            for batch in pf.iter_batches(batch_size=batch_size, columns=list(_EXAMPLE_COLUMNS)):
                writer.write_batch(_user_batch(batch, titles, split_path, category, params.prompts.max_history_items))
                bar.update(batch.num_rows)
        counts[split] = n_rows
    return counts


# ------------------------------------------------------------------ reading


@dataclass
class UserPrompts:
    """One split's user prompts, in example order."""

    example_ids: list[int]
    user_ids: list[str]
    conversations: list[list[dict[str, str]]]
    histories: list[list[int]]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, idx: Sequence[int]) -> UserPrompts:
        return UserPrompts(*[[col[i] for i in idx] for col in (
            self.example_ids, self.user_ids, self.conversations, self.histories, self.targets)])

    def sample_users(self, n: int | None, seed: int) -> UserPrompts:
        """Every example of `n` users drawn uniformly at random (seeded), in example
        order; all of them when `n` is None or covers every user. The same seed gives
        every method the same users, and no user is over-represented by time order."""
        users = sorted(set(self.user_ids))
        if n is None or n >= len(users):
            return self
        chosen = {users[i] for i in np.random.default_rng(seed).choice(len(users), size=n, replace=False)}
        return self.take([i for i, u in enumerate(self.user_ids) if u in chosen])


def load_user_prompts(paths: Paths, split: str) -> UserPrompts:
    path = paths.user_prompts_file(split)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the prompts stage first (`dvc repro prompts`)")
    t = pq.read_table(path).to_pydict()
    return UserPrompts(
        example_ids=[int(x) for x in t["example_id"]],
        user_ids=list(t["user_id"]),
        conversations=t["messages"],
        histories=[list(h) for h in t["history_item_ids"]],
        targets=[int(x) for x in t["target_item_id"]],
    )
