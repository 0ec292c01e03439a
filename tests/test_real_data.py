"""scripts/real_data.py: a MovieLens-100K-shaped folder, written here, is converted to the
Amazon Reviews 2023 files, served on 127.0.0.1 by the script's own server and read by
the project's download and window stages exactly as a real category would be."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rrec.data.download import run_download, source_urls
from rrec.data.window import run_window
from rrec.paths import Paths
from tests.conftest import write_params

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "real_data.py"


@pytest.fixture(scope="module")
def rd():
    spec = importlib.util.spec_from_file_location("real_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["real_data"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("real_data", None)


DAY = 86_400
T0 = 891_000_000  # 1998-03-27, inside ML-100K's span

# (user, film, rating, seconds): users 1-3 with 3, 2 and 4 ratings; film 5 rated twice
# by user 3 (the later one is a duplicate interaction); one rating in 1997 that a
# two-month window leaves out; film 6 never rated.
RATINGS = [
    (1, 1, 5, T0), (1, 2, 3, T0 + DAY), (1, 3, 4, T0 + 2 * DAY),
    (2, 2, 4, T0 + 60), (2, 4, 1, T0 + 3 * DAY),
    (3, 1, 2, T0 - 200 * DAY),
    (3, 3, 5, T0 + 10), (3, 5, 3, T0 + 20), (3, 5, 4, T0 + 30), (3, 4, 2, T0 + 40),
]
GENRE_FLAGS = {1: (3, 4, 5), 2: (1, 2), 3: (8,), 4: (5, 14), 5: (0,), 6: (8, 16)}
TITLES = {
    1: "Toy Story (1995)", 2: "GoldenEye (1995)", 3: "Caf\xe9 au Lait (1994)",
    4: "Shawshank Redemption, The (1994)", 5: "unknown", 6: "Never Rated (1996)",
}


def write_ml100k(folder: Path, header: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id\titem_id\trating\ttimestamp"] if header else []
    lines += ["\t".join(map(str, r)) for r in RATINGS]
    (folder / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
    items = []
    for film, title in TITLES.items():
        flags = ["1" if g in GENRE_FLAGS[film] else "0" for g in range(19)]
        release = "" if film == 5 else "01-Jan-1995"
        items.append("|".join([str(film), title, release, "", "http://example.invalid", *flags]))
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    return folder


def test_convert_writes_the_amazon_files(rd, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = rd.convert(write_ml100k(tmp_path / "ml-100k", header=True), out, "Movies", 1.5)
    assert summary["interactions"] == len(RATINGS) and summary["items"] == 6
    with gzip.open(out / "benchmark/5core/rating_only/Movies.csv.gz", "rt") as fh:
        rows = fh.read().splitlines()
    assert rows[0] == "user_id,parent_asin,rating,timestamp"
    assert len(rows) == 1 + len(RATINGS)
    stamps = [int(r.split(",")[3]) for r in rows[1:]]
    assert stamps == sorted(r[3] * 1000 for r in RATINGS)  # milliseconds, time order
    assert "U0001,ML100K0001,5.0,891000000000" in rows

    with gzip.open(out / "raw/meta_categories/meta_Movies.jsonl.gz", "rt") as fh:
        meta = {m["parent_asin"]: m for m in map(json.loads, fh)}
    assert len(meta) == 6
    toy, cafe, unknown, never = (meta[f"ML100K000{i}"] for i in (1, 3, 5, 6))
    assert toy["title"] == "Toy Story (1995)" and toy["categories"] == [
        "Animation", "Children's", "Comedy"]
    assert toy["average_rating"] == 3.5 and toy["rating_number"] == 2
    assert toy["description"] == ["Animation / Children's / Comedy film, released 1 January 1995."]
    assert cafe["title"] == "Caf\u00e9 au Lait (1994)"  # latin-1 read correctly
    assert unknown["description"] == ["Film of unknown genre; release date unknown."]
    assert never["average_rating"] is None and never["rating_number"] == 0
    assert all(m["price"] == 1.5 and m["main_category"] == "Movies & TV" for m in meta.values())
    sums = (out / "SHA256SUMS").read_text().split()
    assert "benchmark/5core/rating_only/Movies.csv.gz" in sums

    # byte-identical when run again
    first = (out / "SHA256SUMS").read_bytes()
    rd.convert(tmp_path / "ml-100k", out, "Movies", 1.5)
    assert (out / "SHA256SUMS").read_bytes() == first


def test_convert_rejects_bad_input(rd, tmp_path: Path) -> None:
    ml = write_ml100k(tmp_path / "ml-100k")
    with (ml / "u.data").open("a") as fh:
        fh.write("4\t1\tfive\t891000000\n")
    with pytest.raises(rd.ConvertError, match=r"u.data:11"):
        rd.convert(ml, tmp_path / "out")
    write_ml100k(ml)
    with (ml / "u.data").open("a") as fh:
        fh.write("4\t99\t3\t891000000\n")
    with pytest.raises(rd.ConvertError, match=r"\[99\] are not in u.item"):
        rd.convert(ml, tmp_path / "out")
    assert rd.main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2


def test_served_files_go_through_download_and_window(rd, tmp_path: Path) -> None:
    out = tmp_path / "served"
    rd.convert(write_ml100k(tmp_path / "ml-100k"), out, "Movies")
    server = rd.start_server(out, port=0)
    try:
        assert server.base_url.startswith("http://127.0.0.1:")
        root = tmp_path / "project"
        root.mkdir()
        params = write_params(root, {
            "data.source": "amazon2023",
            "data.category": "Movies",
            "data.base_url": server.base_url,
            "data.retries": 0,
            "data.window.end": "1998-04-30",
            "data.window.months": 2,
            "data.window.min_items": 1,
        })
        for url in source_urls(params.data).values():  # the paths the real site uses
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200
        paths = Paths(root)
        got = run_download(params, paths)
        stats = run_window(params, paths)
    finally:
        server.stop()

    assert got["interactions"].read_bytes() == (
        out / "benchmark/5core/rating_only/Movies.csv.gz").read_bytes()
    assert stats["drops"]["outside_window"] == 1
    assert stats["drops"]["duplicate_interactions"] == 1
    assert sum(stats["drops"][r] for r in ("missing_title", "short_title", "bad_price")) == 0
    # films 1-5 are rated inside the window; film 6 never is
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 5, 8)
    assert stats["examples"] == 8 - 3
    items = pq.read_table(paths.items_file).to_pylist()
    assert [i["parent_asin"] for i in items] == [f"ML100K000{i}" for i in range(1, 6)]
    assert items[2]["title"] == "Cafe au Lait (1994)"  # the window's text: accents folded
    assert all(i["price"] == 0.0 for i in items)
    examples = [e for s in ("train", "valid", "test") for e in
                pq.read_table(paths.split_file(s)).to_pylist()]
    stamps = {e["target_timestamp"] for e in examples}
    assert stamps <= {r[3] * 1000 for r in RATINGS}
    user1 = sorted((e for e in examples if e["user_id"] == "U0001"),
                   key=lambda e: e["target_timestamp"])
    assert [e["target_timestamp"] for e in user1] == [(T0 + DAY) * 1000, (T0 + 2 * DAY) * 1000]
    assert user1[-1]["history_timestamps"] == [T0 * 1000, (T0 + DAY) * 1000]
