"""The embedded sample catalogue: determinism, formats, dirt, learnable structure, window fit."""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import io
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rrec.config import SampleParams, WindowParams
from rrec.data.sample import DAY_MS, add_months, sample_span_ms, write_sample

SMALL = SampleParams(n_items=300, n_users=400)
CATEGORY = "Video_Games"
REVIEW_KEYS = ["rating", "title", "text", "images", "asin", "parent_asin", "user_id",
               "timestamp", "helpful_vote", "verified_purchase"]
META_KEYS = ["main_category", "title", "average_rating", "rating_number", "features",
             "description", "price", "images", "videos", "store", "categories", "details",
             "parent_asin", "bought_together"]
CONTROL_TOKENS = ["<answer>", "</answer>", "<|im_start|>", "<|im_end|>", "<start_of_turn>",
                  "<end_of_turn>", "<|endoftext|>"]


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def _jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Parsed objects and the lines that are not JSON objects."""
    good, bad = [], []
    for line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        (good if isinstance(obj, dict) else bad).append(obj if isinstance(obj, dict) else line)
    return good, bad


def _csv_rows(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    reader = csv.reader(io.StringIO("\n".join(_lines(path))))
    header = next(reader, None)
    return header, list(reader)


def _item_valid(meta: dict[str, Any]) -> bool:
    """The item rules of rrec.data.clean, restated independently of the window stage."""
    title = meta.get("title")
    if not isinstance(title, str) or len(title.strip()) <= 1 or "<span id" in title:
        return False
    title = html.unescape(title).strip().strip("\"'").strip()
    if len(title) <= 1 or len(title.split()) > 20:
        return False
    price = meta.get("price")
    if isinstance(price, bool) or price is None:
        return False
    try:
        float(price)
    except (TypeError, ValueError):
        return False
    return True


class Sample:
    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.header, self.rows = _csv_rows(paths["rating_only"])
        self.reviews, self.bad_reviews = _jsonl(paths["reviews"])
        self.meta, self.bad_meta = _jsonl(paths["meta"])
        self.meta_by_asin = {m["parent_asin"]: m for m in self.meta}
        self.valid = {a for a, m in self.meta_by_asin.items() if _item_valid(m)}

    def sequences(self, valid_only: bool = False) -> dict[str, list[tuple[int, str, float]]]:
        """Per user, (timestamp, item, rating) sorted by time; repeated lines and repeated
        (user, item) pairs are kept once (the first)."""
        seen: set[tuple[str, str]] = set()
        out: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
        for user, asin, rating, ts in sorted(self.rows, key=lambda r: int(r[3])):
            if (user, asin) in seen or (valid_only and asin not in self.valid):
                continue
            seen.add((user, asin))
            out[user].append((int(ts), asin, float(rating)))
        return out


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    return Sample(write_sample(SMALL, CATEGORY, tmp_path_factory.mktemp("small") / "raw"))


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    return Sample(write_sample(SampleParams(), CATEGORY, tmp_path_factory.mktemp("default")))


# ------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_only_the_three_files(small: Sample, tmp_path: Path) -> None:
    again = write_sample(SMALL, CATEGORY, tmp_path / "again")
    assert set(again) == {"rating_only", "reviews", "meta"}
    assert {p.name for p in again.values()} == {
        "Video_Games.csv.gz", "Video_Games.jsonl.gz", "meta_Video_Games.jsonl.gz"}
    for key, path in again.items():
        assert _md5(path) == _md5(small.paths[key]), key
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(
        p.name for p in again.values())
    # gzip header: no file name flag, mtime 0
    head = again["meta"].read_bytes()[:10]
    assert head[3] & 0x08 == 0 and head[4:8] == b"\0\0\0\0"


def test_rewriting_replaces_the_files(tmp_path: Path) -> None:
    first = write_sample(SMALL, CATEGORY, tmp_path)
    digests = {k: _md5(p) for k, p in first.items()}
    second = write_sample(SMALL, CATEGORY, tmp_path)
    assert {k: _md5(p) for k, p in second.items()} == digests
    assert len(list(tmp_path.iterdir())) == 3


def test_different_seed_different_bytes(small: Sample, tmp_path: Path) -> None:
    other = write_sample(SMALL.model_copy(update={"seed": SMALL.seed + 1}), CATEGORY, tmp_path)
    for key, path in other.items():
        assert _md5(path) != _md5(small.paths[key]), key


# ------------------------------------------------------------------------ formats


def test_rating_only_csv_format(small: Sample) -> None:
    assert small.header == ["user_id", "parent_asin", "rating", "timestamp"]
    first, end = sample_span_ms(SMALL)
    assert len(small.rows) > 1000
    for row in small.rows:
        assert len(row) == 4
        user, asin, rating, ts = row
        assert re.fullmatch(r"A[0-9A-Z]{27}", user)
        assert re.fullmatch(r"B0[0-9A-Z]{8}", asin)
        assert float(rating) in {1.0, 2.0, 3.0, 4.0, 5.0} and "." in rating
        assert first <= int(ts) < end


def test_reviews_jsonl_format_and_same_interactions_as_csv(small: Sample) -> None:
    first, end = sample_span_ms(SMALL)
    for r in small.reviews:
        assert list(r) == REVIEW_KEYS
        assert isinstance(r["rating"], float) and 1.0 <= r["rating"] <= 5.0
        assert isinstance(r["timestamp"], int) and first <= r["timestamp"] < end
        assert isinstance(r["title"], str) and isinstance(r["text"], str) and r["text"]
        assert isinstance(r["images"], list) and isinstance(r["verified_purchase"], bool)
        assert isinstance(r["helpful_vote"], int) and r["helpful_vote"] >= 0
        assert r["asin"][:2] == "B0" and r["parent_asin"][:2] == "B0"
    from_reviews = Counter(
        (r["user_id"], r["parent_asin"], r["rating"], r["timestamp"]) for r in small.reviews)
    from_csv = Counter((u, a, float(r), int(t)) for u, a, r, t in small.rows)
    assert from_reviews == from_csv


def test_meta_jsonl_format(small: Sample) -> None:
    assert len(small.meta) > 250
    for m in small.meta:
        assert set(m) >= set(META_KEYS) - {"title"}
        assert [k for k in m if k != "title"] == [k for k in META_KEYS if k != "title"]
        assert m["main_category"] == "Video Games"
        for key in ("features", "description", "images", "videos", "categories"):
            assert isinstance(m[key], list), key
        assert isinstance(m["details"], dict) and "Release date" in m["details"]
        assert isinstance(m["average_rating"], float) and 1.0 <= m["average_rating"] <= 5.0
        assert isinstance(m["rating_number"], int)
        assert m["categories"][0] == "Video Games" and len(m["categories"]) == 3
        assert m["bought_together"] is None
    # the same parent_asin is never described twice
    assert len(small.meta_by_asin) == len(small.meta)


def test_other_category_is_named_and_worded_after_it(tmp_path: Path) -> None:
    params = SampleParams(n_items=60, n_users=60, n_genres=3)
    paths = write_sample(params, "CDs_and_Vinyl", tmp_path)
    assert {p.name for p in paths.values()} == {
        "CDs_and_Vinyl.csv.gz", "CDs_and_Vinyl.jsonl.gz", "meta_CDs_and_Vinyl.jsonl.gz"}
    meta, _ = _jsonl(paths["meta"])
    assert {m["main_category"] for m in meta} == {"CDs and Vinyl"}
    assert all(m["categories"][0] == "CDs and Vinyl" and len(m["categories"]) == 2 for m in meta)
    assert not any("PlayStation" in (m.get("title") or "") for m in meta)


def test_timestamps_strictly_increase_per_user(small: Sample) -> None:
    per_user: dict[str, list[int]] = defaultdict(list)
    for user, _, _, ts in dict.fromkeys(tuple(r) for r in small.rows):  # drop repeated lines
        per_user[user].append(int(ts))
    for times in per_user.values():
        assert len(set(times)) == len(times)
    # and the span is used: interactions in the first and the last month
    first, end = sample_span_ms(SMALL)
    all_ts = [t for times in per_user.values() for t in times]
    assert min(all_ts) < first + 31 * DAY_MS and max(all_ts) > end - 31 * DAY_MS


def test_no_dirt_when_dirt_share_is_zero(tmp_path: Path) -> None:
    clean = Sample(write_sample(SMALL.model_copy(update={"dirt_share": 0.0}), CATEGORY, tmp_path))
    assert clean.bad_meta == [] and clean.bad_reviews == []
    assert len(clean.meta) == SMALL.n_items == len(clean.valid)
    assert {r[1] for r in clean.rows} <= clean.valid
    assert len({tuple(r[:2]) for r in clean.rows}) == len(clean.rows)
    texts = [m["title"] for m in clean.meta] + [d for m in clean.meta for d in m["description"]]
    assert all(t.isascii() and "<" not in t and "&" not in t.replace(" & ", "") for t in texts)


def test_tiny_and_two_genre_catalogues(tmp_path: Path) -> None:
    for k, params in enumerate([SampleParams(n_items=50, n_users=50),
                                SampleParams(n_items=80, n_users=60, n_genres=2, months=3)]):
        sample = Sample(write_sample(params, CATEGORY, tmp_path / str(k)))
        assert len(sample.rows) > params.n_users
        first, end = sample_span_ms(params)
        assert all(first <= int(r[3]) < end for r in sample.rows)
        assert len(sample.bad_meta) >= 1 and len(sample.bad_reviews) >= 3


def test_too_many_genres_for_the_items_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_genres"):
        write_sample(SampleParams(n_items=50, n_users=50, n_genres=20), CATEGORY, tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# -------------------------------------------------------------------------- dirt


def test_malformed_lines_in_both_jsonl_files(small: Sample) -> None:
    for bad, good in ((small.bad_reviews, small.reviews), (small.bad_meta, small.meta)):
        assert len(bad) >= 3
        assert any(line.startswith("{") for line in bad)  # truncated objects
        assert any(not line.startswith("{") for line in bad)  # garbage
        assert len(bad) / (len(bad) + len(good)) < 0.02


def test_title_and_price_dirt(small: Sample) -> None:
    meta = small.meta
    titles = [m["title"] for m in meta if isinstance(m.get("title"), str)]
    assert sum("title" not in m for m in meta) >= 1
    assert sum("title" in m and m["title"] is None for m in meta) >= 1
    assert sum(m.get("title") == "" for m in meta) >= 1
    assert sum(len(t) == 1 for t in titles) >= 3
    for entity in ("&amp;", "&quot;", "&#39;"):
        assert any(entity in t for t in titles), entity
    assert sum('<span id="' in t for t in titles) >= 3
    assert sum(len(t.split()) > 20 for t in titles) >= 3
    assert sum(len(t) > 2 and t[0] == t[-1] and t[0] in "\"'" for t in titles) >= 3
    prices = [m["price"] for m in meta]
    for bad in ("None", "from $12.99", "—", None):
        assert bad in prices, bad
    assert sum(isinstance(p, float) for p in prices) > 0.8 * len(prices)


def test_text_dirt(small: Sample) -> None:
    texts = [m.get("title") or "" for m in small.meta] + [
        d for m in small.meta for d in m["description"]]
    for token in CONTROL_TOKENS:
        assert any(token in t for t in texts), token
    non_ascii = [t for t in texts if not t.isascii()]
    assert any(re.search(r"[\u00c0-\u017f]", t) for t in non_ascii)  # accents
    assert any(re.search(r"[\U0001F300-\U0001FAFF]", t) for t in non_ascii)  # emoji
    assert any(re.search(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]", t) for t in non_ascii)  # CJK
    descriptions = [d for m in small.meta for d in m["description"]]
    assert any(re.search(r"<(p|br|ul|li|b)\b", d) for d in descriptions)
    assert any("\n" in d for d in descriptions) and any("\t" in d for d in descriptions)
    assert any(not (r["title"] + r["text"]).isascii() for r in small.reviews)


def test_duplicate_and_repeated_reviews(small: Sample) -> None:
    csv_lines = Counter(tuple(r) for r in small.rows)
    assert sum(c > 1 for c in csv_lines.values()) >= 3
    review_lines = Counter(json.dumps(r) for r in small.reviews)
    assert sum(c > 1 for c in review_lines.values()) >= 3
    times: dict[tuple[str, str], set[int]] = defaultdict(set)
    for user, asin, _, ts in small.rows:
        times[(user, asin)].add(int(ts))
    assert sum(len(t) > 1 for t in times.values()) >= 3


def test_interactions_reference_items_absent_from_meta(small: Sample) -> None:
    missing = [r for r in small.rows if r[1] not in small.meta_by_asin]
    assert len({r[1] for r in missing}) >= 3
    assert len(missing) < 0.15 * len(small.rows)


def test_most_items_stay_valid(small: Sample) -> None:
    assert len(small.valid) >= 0.7 * SMALL.n_items
    interacted = {r[1] for r in small.rows}
    assert len(interacted & small.valid) >= 0.7 * len(interacted)


# ----------------------------------------------------------------------- structure


def _hit_at_10(
    sequences: dict[str, list[tuple[int, str, float]]], meta: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """Leave-last-out Hit@10 of popularity, item-to-item transitions and a metadata rule."""
    popularity: Counter[str] = Counter()
    transitions: dict[str, Counter[str]] = defaultdict(Counter)
    cases = []
    for seq in sequences.values():
        items = [a for _, a, _ in seq]
        history = items[:-1] if len(items) >= 3 else items
        popularity.update(history)
        for a, b in zip(history, history[1:], strict=False):
            transitions[a][b] += 1
        if len(items) >= 3:
            cases.append((history, items[-1]))
    ranked = [a for a, _ in popularity.most_common()]
    by_store: dict[str, list[str]] = defaultdict(list)
    by_genre: dict[str, list[str]] = defaultdict(list)
    for a in ranked:
        if a in meta:
            by_store[meta[a]["store"]].append(a)
            by_genre[meta[a]["categories"][-1]].append(a)

    def top10(candidates: list[str], history: list[str]) -> set[str]:
        seen, out = set(history), []
        for c in candidates:
            if c not in seen and c not in out:
                out.append(c)
                if len(out) == 10:
                    break
        return set(out)

    def by_meta(history: list[str]) -> list[str]:
        last = meta.get(history[-1])
        if last is None:
            return ranked
        return by_store[last["store"]] + by_genre[last["categories"][-1]] + ranked

    predictors = {
        "popularity": lambda h: ranked,
        "transitions": lambda h: [b for b, _ in transitions[h[-1]].most_common()] + ranked,
        "store_then_genre": by_meta,
    }
    return {
        name: float(np.mean([t in top10(f(h), h) for h, t in cases]))
        for name, f in predictors.items()
    }


def test_sequential_predictors_beat_popularity(small: Sample) -> None:
    hits = _hit_at_10(small.sequences(valid_only=True), small.meta_by_asin)
    assert hits["popularity"] > 0.0
    assert hits["transitions"] > 1.5 * hits["popularity"] + 0.03, hits
    assert hits["store_then_genre"] > 1.5 * hits["popularity"] + 0.03, hits


def test_sequels_follow_their_earlier_parts(small: Sample) -> None:
    """Titles "X II" are bought after "X" by the same user far more often than before it."""
    title_of = {a: m["title"] for a, m in small.meta_by_asin.items() if a in small.valid}
    base_of: dict[str, tuple[str, int]] = {}
    numerals = {"II": 2, "III": 3, "IV": 4, "V": 5}
    for asin, title in title_of.items():
        name = title.split(" - ")[0].split(":")[0]
        words = name.split()
        part = numerals.get(words[-1], 1)
        base_of[asin] = (" ".join(words[:-1]) if part > 1 else name, part)
    after = before = 0
    for seq in small.sequences(valid_only=True).values():
        order = [base_of[a] for _, a, _ in seq if a in base_of]
        for i, (name, part) in enumerate(order):
            if part == 1:
                continue
            earlier = [(n, p) for n, p in order[:i] if n == name and p == part - 1]
            later = [(n, p) for n, p in order[i + 1 :] if n == name and p == part - 1]
            after += bool(earlier)
            before += bool(later)
    assert after >= 20
    assert after > 5 * before


def test_ratings_are_higher_in_the_users_main_genre(small: Sample) -> None:
    """Items of the genre a user buys most are rated above items of a genre they try once."""
    genre = {a: m["categories"][-1] for a, m in small.meta_by_asin.items()}
    inside, once = [], []
    for seq in small.sequences().values():
        counts = Counter(genre[a] for _, a, _ in seq if a in genre)
        if counts.total() < 4:
            continue
        main = counts.most_common(1)[0][0]
        for _, a, rating in seq:
            if a in genre and genre[a] == main:
                inside.append(rating)
            elif a in genre and counts[genre[a]] == 1:
                once.append(rating)
    assert len(once) >= 100
    assert np.mean(inside) > np.mean(once) + 0.35


def test_sequence_lengths_are_long_tailed_and_mostly_two_or_more(small: Sample) -> None:
    lengths = np.array([len(s) for s in small.sequences().values()])
    assert len(lengths) >= 0.95 * SMALL.n_users
    assert np.mean(lengths >= 2) >= 0.85
    assert abs(lengths.mean() - SMALL.mean_interactions) < 0.25 * SMALL.mean_interactions
    assert lengths.max() >= 4 * SMALL.mean_interactions
    assert np.median(lengths) < lengths.mean()


# ------------------------------------------------------------- default and window


def _distinct_valid_items(sample: Sample, start_ms: int, end_ms: int) -> int:
    return len({a for _, a, _, ts in sample.rows
                if a in sample.valid and start_ms <= int(ts) <= end_ms})


def test_default_sample_fits_the_default_window(default: Sample) -> None:
    params, window = SampleParams(), WindowParams()
    assert params.months >= 24
    first, end = sample_span_ms(params)
    times = [int(r[3]) for r in default.rows]
    assert (max(times) - min(times)) >= (add_months(params.start, 24) - params.start).days * DAY_MS
    assert 25_000 <= len(default.rows) <= 35_000
    assert len({r[0] for r in default.rows}) >= 3000
    assert len(default.meta) >= 2000

    def ms(day: Any) -> int:
        return first + (day - params.start).days * DAY_MS

    end_ms = ms(window.end) + DAY_MS - 1  # the end day is inside the window
    last_year = _distinct_valid_items(default, ms(add_months(window.end, -window.months)), end_ms)
    whole = _distinct_valid_items(default, first, end_ms)
    assert last_year < window.min_items < whole
    # the roll-back rule reaches min_items after a few months, well before the data starts
    back = next(k for k in range(1, 13)
                if _distinct_valid_items(
                    default, ms(add_months(window.end, -window.months - k)), end_ms
                ) >= window.min_items)
    assert 1 <= back <= 6
