"""The `window` stage: clean items, cut the temporal window, build examples, split.

Everything runs in DuckDB over the gzip files; Python only sees the metadata strings
that contain an HTML entity (see `rrec.data.clean`) and, at the end, the output rows on
their way into Parquet. The steps, in order, with the counter each one feeds:

1. Read both files at once (two DuckDB connections on two threads).
   Interactions: the rating-only CSV (header `user_id,parent_asin,rating,timestamp`,
   timestamps in ms) or the reviews JSONL, by `data.interactions`. A line is
   `malformed` when it cannot be read as a record or lacks a non-empty user_id or
   parent_asin, a finite rating or an integer timestamp. A well-formed line whose
   rating is outside 1..5 or a JSON boolean is dropped (`bad_rating`), then one whose
   timestamp is before 1973 in milliseconds (seconds, not milliseconds) is dropped
   (`bad_timestamp`). Metadata JSONL: `malformed`
   when the line is not a JSON object with a non-empty parent_asin. Blank lines are
   neither counted nor malformed. A file whose malformed share exceeds
   `max_malformed_share` stops the stage with an error naming the file. `lines` counts
   the data lines (CSV header and blank lines excluded). Only the metadata connection
   preserves insertion order, so that its rowid is the line order.
2. Items: the rules of `rrec.data.clean` (missing_title, span_title, short_title,
   long_title, bad_price, duplicate_meta), one reason per metadata line; all but
   duplicate_meta are checked while the metadata is read.
3. Interactions whose item has no valid metadata are dropped (`no_metadata`).
4. The window: `end` = the end of `window.end` (UTC, inclusive); `start` = midnight UTC
   of `window.end` minus `months` calendar months (a day past the end of a shorter month
   becomes its last day). While fewer than `min_items` distinct items have an
   interaction in `[start, end]`, `start` moves back one more month; it stops early,
   with a warning, once it reaches the earliest interaction. Interactions outside are
   dropped (`outside_window`).
5. Duplicates: one interaction per (user, item) is kept, the earliest (on equal
   timestamps the lower rating), the others are dropped (`duplicate_interactions`); a
   target is therefore never in its own history.
6. k-core (`kcore` > 0): users and items with fewer than k interactions are removed,
   repeatedly, until none is left (`kcore`). The roll-back of step 4 counts items
   before this filter.
7. Items still present get `item_id` 0..n-1 in `parent_asin` order.
8. Examples: per user, interactions ordered by (timestamp, parent_asin); every position
   t >= 1 is one example whose history is the previous up to `max_history` items (oldest
   first) with their ratings and timestamps. All examples are ordered by (target
   timestamp, user_id, target item_id); `example_id` is the position in that order.
   With N examples, train = floor(N * split[0]), valid = floor(N * (split[0] +
   split[1])) - train, test = the rest: the authors' cut points (this reproduces the
   split sizes of the paper's Table 3).

Stats: Table 3's columns (`users`, `items`, `interactions` = interactions in the final
window, `train`, `valid`, `test`), `examples` (= train + valid + test = interactions -
users; the paper's "interactions" column equals this number), the window, the months
rolled back, `drops` {reason: count}, `malformed` and `lines` {file name: count},
`wrong_type` {metadata field: items written whose field had the wrong type and was read
as missing (`rrec.data.clean.TYPED_FIELDS`)}, `nul_characters` (items written whose title
or text held a NUL character, read as a space),
`dropped_share` (interaction lines lost to bad data: malformed, bad_rating, bad_timestamp,
no_metadata, over all interaction lines) and the `max_dropped_share` it was checked against.

The drop table (every reason, count and share of its file's lines) is printed at the end.
A `dropped_share` above 0.2 warns; above `data.window.max_dropped_share` the stage stops
(right after step 4, before the expensive steps) with an error that says how to fix it.

Outputs (`rrec.data.schema`): `data/processed/{items,train,valid,test}.parquet` and
`reports/window_stats.json`. A run first deletes the previous outputs (and the hidden
folders and DuckDB spill files that killed runs left), writes the new
ones into a hidden folder under `data/`, then renames the folder into place and writes
the stats last, so a failed run leaves nothing that looks finished.
"""

from __future__ import annotations

import bisect
import calendar
import datetime as dt
import gzip
import json
import math
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from rrec.atomic import atomic_path, process_alive, remove_dead_temporaries, write_text
from rrec.config import Params, WindowParams
from rrec.data import clean
from rrec.data.schema import EXAMPLES, ITEMS
from rrec.paths import SPLITS, Paths
from rrec.timing import Phases

CSV_HEADER = "user_id,parent_asin,rating,timestamp"
INTERACTION_REASONS: tuple[str, ...] = (
    "bad_rating",
    "bad_timestamp",
    "no_metadata",
    "outside_window",
    "duplicate_interactions",
    "kcore",
)
DROP_REASONS: tuple[str, ...] = clean.ITEM_REASONS + INTERACTION_REASONS

_INTERACTION_COLUMNS = (
    "{'user_id': 'VARCHAR', 'parent_asin': 'VARCHAR', 'rating': 'DOUBLE', 'timestamp': 'BIGINT'}"
)
# JSON reads the rating as JSON so that a boolean (which DOUBLE reads as 1 or 0) is seen.
_REVIEW_COLUMNS = _INTERACTION_COLUMNS.replace("'rating': 'DOUBLE'", "'rating': 'JSON'")
# Only the fields the later stages use; JSON but for the id, so that a field of the wrong
# type is seen (and counted) instead of being read as NULL (`rrec.data.clean`).
_META_COLUMNS = (
    "{'parent_asin': 'VARCHAR', 'title': 'JSON', 'price': 'JSON', "
    + ", ".join(f"'{f}': 'JSON'" for f in clean.TYPED_FIELDS)
    + "}"
)
_INTERACTION_WELL_FORMED = (
    "(user_id IS NOT NULL AND user_id <> '' AND parent_asin IS NOT NULL AND parent_asin <> '' "
    "AND rating IS NOT NULL AND isfinite(rating) AND ts IS NOT NULL)"
)
# Amazon ratings are 1 to 5 stars; a well-formed line with any other rating is dropped.
_RATING_IN_RANGE = "(rating >= 1 AND rating <= 5 AND NOT rating_bool)"


# Interaction lines lost to bad data, as opposed to the protocol's own cuts
# (outside_window, duplicate_interactions, kcore); their share of the interaction lines
# is checked against `data.window.max_dropped_share` and warned about above this.
BAD_DATA_REASONS: tuple[str, ...] = ("malformed", "bad_rating", "bad_timestamp", "no_metadata")
WARN_DROPPED_SHARE = 0.2

# Every Amazon review is later than this many milliseconds (1973-03-03); a timestamp
# below it is in seconds (`bad_timestamp`).
_SECONDS_NOT_MS = 100_000_000_000


class WindowError(ValueError):
    """Input the window stage cannot use; the message names the file and what to do."""


# ----------------------------------------------------------------------- helpers


def _q(path: Path) -> str:
    """`path` as a SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def months_before(day: dt.date, months: int) -> dt.date:
    """`day` moved back `months` calendar months, clipped to the end of a shorter month."""
    index = day.year * 12 + day.month - 1 - months
    year, month = divmod(index, 12)
    return dt.date(year, month + 1, min(day.day, calendar.monthrange(year, month + 1)[1]))


def _ms(day: dt.date) -> int:
    """Milliseconds since the epoch at midnight UTC of `day`."""
    return calendar.timegm(day.timetuple()) * 1000


def _utc_date(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).date().isoformat()


def split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, valid, test) sizes at the authors' cut points: train ends at
    floor(n * f0), valid at floor(n * (f0 + f1)), test gets the rest."""
    cut_train = math.floor(n * fractions[0] + 1e-9)
    cut_valid = max(math.floor(n * (fractions[0] + fractions[1]) + 1e-9), cut_train)
    return cut_train, cut_valid - cut_train, n - cut_valid


def drop_table(stats: dict[str, Any], inter_name: str, meta_name: str) -> str:
    """The drops of a window run as a table: each reason's count and its share of the lines
    of the file it comes from."""
    rows: list[tuple[str, int, int]] = []
    meta_lines, inter_lines = stats["lines"][meta_name], stats["lines"][inter_name]
    drops = stats["drops"]  # a run stopped early lacks the later reasons
    rows.append((f"{meta_name}: malformed lines", stats["malformed"][meta_name], meta_lines))
    rows += [(f"{meta_name}: {r}", drops[r], meta_lines) for r in clean.ITEM_REASONS if r in drops]
    rows.append((f"{inter_name}: malformed lines", stats["malformed"][inter_name], inter_lines))
    rows += [(f"{inter_name}: {r}", drops[r], inter_lines) for r in INTERACTION_REASONS
             if r in drops]
    width = max(len(r[0]) for r in rows)
    out = [f"[window] dropped (share of the file's lines; {meta_name}: {meta_lines:,} lines, "
           f"{inter_name}: {inter_lines:,} lines):"]
    out += [f"  {name:<{width}} {n:>12,} {n / max(total, 1):>7.1%}" for name, n, total in rows]
    wrong = {f: n for f, n in stats.get("wrong_type", {}).items() if n}
    if wrong:
        out.append("  items kept with a field of the wrong type, read as missing: "
                   + ", ".join(f"{f} {n:,}" for f, n in wrong.items()))
    if stats.get("nul_characters"):
        out.append(f"  items kept with a NUL character (\\u0000) in their title or text, read as "
                   f"a space: {stats['nul_characters']:,}")
    out.append(
        f"  interaction lines lost to bad data ({', '.join(BAD_DATA_REASONS)}): "
        f"{stats['dropped_share']:.1%} (data.window.max_dropped_share: "
        f"{stats['max_dropped_share']:g})"
    )
    return "\n".join(out)


def _drop_stats(
    drops: dict[str, int], counts: dict[Path, tuple[int, int]], inter_path: Path, limit: float
) -> dict[str, Any]:
    """The stats' drop counts, malformed and lines per file, and the share of the
    interaction lines lost to bad data."""
    lines, malformed = counts[inter_path]
    lost = malformed + sum(drops.get(r, 0) for r in BAD_DATA_REASONS if r != "malformed")
    return {
        "drops": {r: int(drops[r]) for r in DROP_REASONS if r in drops},
        "malformed": {p.name: m for p, (_, m) in counts.items()},
        "lines": {p.name: n for p, (n, _) in counts.items()},
        "dropped_share": round(lost / max(lines, 1), 6),
        "max_dropped_share": limit,
    }


_BAD_DATA_ADVICE = {
    "malformed": "malformed: lines that are not a record with a user_id, a parent_asin, a "
                 "number for the rating and an integer timestamp.",
    "bad_rating": "bad_rating: a rating outside 1..5, or true/false instead of a number.",
    "bad_timestamp": f"bad_timestamp: the timestamps look like seconds (before "
                     f"{_utc_date(_SECONDS_NOT_MS)} read as milliseconds), and the Amazon "
                     f"Reviews 2023 files use milliseconds: convert those lines (timestamp * 1000).",
    "no_metadata": "no_metadata: the item has no valid metadata line; check that both files are "
                   "of the same data.category and complete, and the drop table above for why "
                   "items were dropped.",
}


def _check_dropped(
    stats: dict[str, Any], inter_path: Path, meta_name: str, limit: float, *, final: bool
) -> None:
    """Stop when too much of the data was bad (printing the drop table first); at the end
    of the stage (`final`) print the table and warn when much of it was."""
    share = stats["dropped_share"]
    if share <= limit and not final:
        return
    print(drop_table(stats, inter_path.name, meta_name), flush=True)
    lost = {r: stats["malformed"][inter_path.name] if r == "malformed" else stats["drops"][r]
            for r in BAD_DATA_REASONS if r == "malformed" or r in stats["drops"]}
    what = ", ".join(f"{r} {n:,}" for r, n in lost.items())
    lines = stats["lines"][inter_path.name]
    if share > limit:
        why = " ".join(_BAD_DATA_ADVICE[r] for r, n in lost.items() if n)
        raise WindowError(
            f"{inter_path}: {sum(lost.values()):,} of {lines:,} interaction lines ({share:.1%}) "
            f"were dropped as bad data ({what}), above data.window.max_dropped_share={limit:g}. "
            f"{why} If the data really is like this, raise data.window.max_dropped_share in "
            f"params.yaml to accept it"
        )
    if share > WARN_DROPPED_SHARE:
        warnings.warn(
            f"window: {share:.1%} of the interaction lines of {inter_path.name} were dropped as "
            f"bad data ({what}); see the drop table (stops above "
            f"data.window.max_dropped_share={limit:g})",
            RuntimeWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------- reading


def _check_csv_header(path: Path) -> None:
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
    except (OSError, EOFError) as err:
        raise WindowError(f"{path}: could not be read as gzip ({err}); download it again") from None
    got = first.lstrip("\ufeff").strip().replace(" ", "")
    if got != CSV_HEADER:
        raise WindowError(
            f"{path}: line 1 is {first.strip()!r}, expected the header {CSV_HEADER!r} of the "
            f"Amazon Reviews 2023 rating-only files; for the review JSONL set "
            f"data.interactions: reviews"
        )


def _read_interactions(
    con: duckdb.DuckDBPyConnection, path: Path, fmt: str, end_excl: int
) -> tuple[int, int, int]:
    """Create `inter_raw(user_id, parent_asin, rating, ts, ok)` and the per-item summary
    `item_span(parent_asin, n, first_ts, last_ts)` (last_ts: the latest before `end_excl`);
    return (lines, malformed, well-formed lines with a bad rating, then with a timestamp in
    seconds)."""
    if fmt == "rating_only":
        _check_csv_header(path)
        source = (
            f"read_csv({_q(path)}, header=true, auto_detect=false, delim=',', quote='\"', "
            f"escape='\"', columns={_INTERACTION_COLUMNS}, ignore_errors=true, "
            f"store_rejects=true, rejects_table='rrec_rejects', rejects_scan='rrec_rejects_scan')"
        )
        rating = "rating, false AS rating_bool"
    else:
        source = (
            f"read_json({_q(path)}, format='newline_delimited', ignore_errors=true, "
            f"columns={_REVIEW_COLUMNS})"
        )
        rating = ("try_cast(rating AS DOUBLE) AS rating, "
                  "coalesce(json_type(rating) = 'BOOLEAN', false) AS rating_bool")
    in_ms = f"ts >= {_SECONDS_NOT_MS}"
    con.execute(
        "CREATE OR REPLACE TABLE inter_raw AS SELECT * EXCLUDE (well_formed, rating_bool), "
        f"well_formed AND {_RATING_IN_RANGE} AND {in_ms} AS ok, "
        f"well_formed AND NOT {_RATING_IN_RANGE} AS bad_rating, "
        f"well_formed AND {_RATING_IN_RANGE} AND NOT {in_ms} AS bad_timestamp "
        f"FROM (SELECT *, {_INTERACTION_WELL_FORMED} AS well_formed FROM ("
        f"SELECT rrec_strip_nul(user_id) AS user_id, rrec_strip_nul(parent_asin) AS "
        f"parent_asin, {rating}, \"timestamp\" AS ts FROM {source}))"
    )
    rows, bad, bad_rating, bad_timestamp = con.execute(
        "SELECT count(*), coalesce(count_if(NOT ok AND NOT bad_rating AND NOT bad_timestamp), 0), "
        "coalesce(count_if(bad_rating), 0), coalesce(count_if(bad_timestamp), 0) FROM inter_raw"
    ).fetchall()[0]
    rejected = 0
    if fmt == "rating_only":
        # A line can carry several errors (one row each); count lines.
        (rejected,) = con.execute("SELECT count(DISTINCT line) FROM rrec_rejects").fetchall()[0]
    # Needs no metadata, so it runs here, while the other thread still reads the metadata.
    con.execute(
        "CREATE OR REPLACE TABLE item_span AS SELECT parent_asin, count(*) AS n, "
        f"min(ts) AS first_ts, max(ts) AS max_ts, max(ts) FILTER (WHERE ts < {end_excl}) AS last_ts "
        "FROM inter_raw WHERE ok GROUP BY parent_asin"
    )
    return rows + rejected, bad + rejected, bad_rating, bad_timestamp


def _read_meta(con: duckdb.DuckDBPyConnection, path: Path, max_title_words: int) -> tuple[int, int]:
    """Create `meta_raw` in file order (rowid = line order), with the cleaned title, the
    price and the drop reason of every line (`rrec.data.clean`); return (lines, malformed)."""
    # Only this connection keeps the file order: it decides which duplicate comes first.
    con.execute("SET SESSION preserve_insertion_order = true")

    def create(max_object_size: int) -> None:
        source = (
            f"read_json({_q(path)}, format='newline_delimited', ignore_errors=true, "
            f"maximum_object_size={max_object_size}, columns={_META_COLUMNS})"
        )
        source = (
            "(SELECT * REPLACE (rrec_strip_nul(parent_asin) AS parent_asin) "
            f"FROM {source})"
        )
        # The title and price checks run in the reading pipeline, on the threads that parse.
        con.execute(
            "CREATE OR REPLACE TABLE meta_raw AS "
            + clean.item_validity_sql(source, max_title_words)
        )

    # DuckDB reads JSON in buffers of twice the maximum object size: small ones let both
    # threads decompress and parse; a line over 32 MiB needs the large ones (up to 512 MiB).
    try:
        create(16 << 20)
    except duckdb.InvalidInputException as err:
        if "maximum_object_size" not in str(err):
            raise
        create(256 << 20)
    rows, ok = con.execute(
        "SELECT count(*), coalesce(count_if(parent_asin IS NOT NULL AND parent_asin <> ''), 0) "
        "FROM meta_raw"
    ).fetchall()[0]
    return rows, rows - ok


def _not_utf8(path: Path, max_bytes: int = 64 << 20) -> str | None:
    """Where the first `max_bytes` of a (gzip) text file stop being UTF-8; None if they are."""
    read = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    return (f"it is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {n}; "
                            f"Latin-1 or another encoding?)")
                read += len(raw)
                if read >= max_bytes:
                    break
    except (OSError, EOFError):
        return None
    return None


def check_malformed(
    path: Path, lines: int, malformed: int, limit: float,
    fix: str = "the file is probably damaged: download it again",
) -> None:
    """Stop (WindowError) when `path` holds no lines or more than `limit` of them are
    malformed (`data.window.max_malformed_share`); `fix` says what to do about the file."""
    if lines == 0:
        raise WindowError(
            f"{path}: holds no data lines (a CSV header and blank lines do not count): the file "
            f"itself is empty, so downloading it again gives the same file; check that "
            f"data.category and data.interactions name the file you meant"
        )
    share = malformed / lines
    if share > limit:
        encoding = _not_utf8(path)
        if encoding:
            fix = f"{encoding}: convert its text to UTF-8 (e.g. gunzip, iconv -f latin1 -t utf-8, gzip)"
        raise WindowError(
            f"{path}: {malformed:,} of {lines:,} lines are malformed (share {share:.4f}, above "
            f"data.window.max_malformed_share={limit}); {fix}, or raise "
            f"data.window.max_malformed_share to accept it"
        )


class _ReadProgress:
    """One progress bar for reading the input files, from DuckDB's own estimate for the
    query each file's cursor runs (reading a real category takes minutes): the mean of
    the files' percentages."""

    _SETTINGS = ("enable_progress_bar = true", "enable_progress_bar_print = false",
                 "progress_bar_time = 0")

    def __init__(self, cursors: dict[Path, duckdb.DuckDBPyConnection], every: float = 0.5) -> None:
        for c in cursors.values():
            for setting in self._SETTINGS:
                c.execute(f"SET {setting}")
        self._cursors, self._every = cursors, every
        self._percent = dict.fromkeys(cursors, 0.0)
        names = " and ".join(p.name for p in cursors)
        self._bar = tqdm(total=100, desc=f"[window] read {names}", mininterval=every,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="window progress", daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self._every):
            for p, c in self._cursors.items():
                try:
                    percent = c.query_progress()  # -1 between queries: ignored
                except duckdb.Error:
                    continue  # only the bar would suffer; the read itself reports its errors
                self.advance(p, percent)

    def advance(self, path: Path, percent: float) -> None:
        """Move `path` up to `percent` (never back: a cursor runs several queries)."""
        with self._lock:
            self._percent[path] = max(self._percent[path], min(percent, 100.0))
            mean = sum(self._percent.values()) / len(self._percent)
            if mean > self._bar.n:
                self._bar.update(mean - self._bar.n)

    def __enter__(self) -> _ReadProgress:
        self._poller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._poller.join()
        self._bar.close()


def _read_both(
    con: duckdb.DuckDBPyConnection,
    inter_path: Path,
    fmt: str,
    meta_path: Path,
    end_excl: int,
    max_title_words: int,
) -> tuple[dict[Path, tuple[int, int]], dict[str, int]]:
    """Both files at once: DuckDB decompresses one gzip stream per thread. Returns
    {file: (lines, malformed)} and the interaction lines dropped as `bad_rating` and
    `bad_timestamp`."""
    jobs: dict[Path, Callable[[duckdb.DuckDBPyConnection], tuple[int, ...]]] = {
        inter_path: lambda c: _read_interactions(c, inter_path, fmt, end_excl),
        meta_path: lambda c: _read_meta(c, meta_path, max_title_words),
    }
    cursors = {p: con.cursor() for p in jobs}
    out: dict[Path, tuple[int, int]] = {}
    bad: dict[str, int] = {}
    try:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool, _ReadProgress(cursors) as bars:
            futures = {p: pool.submit(job, cursors[p]) for p, job in jobs.items()}
            for p, future in futures.items():
                try:
                    lines, malformed, *extra = future.result()
                    out[p] = (lines, malformed)
                    if extra:
                        bad = dict(zip(("bad_rating", "bad_timestamp"), map(int, extra), strict=True))
                except duckdb.Error as err:
                    raise WindowError(
                        f"{p}: could not be read ({err}); if the file is damaged, download it again"
                    ) from err
                bars.advance(p, 100.0)
    finally:
        for c in cursors.values():
            c.close()
    return out, bad


# ------------------------------------------------------------------------- steps


def _clean_items(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Create `meta_valid(parent_asin, line_no)`, the first valid line of each item;
    return drops per reason."""
    con.execute(
        "CREATE OR REPLACE TABLE meta_valid AS SELECT parent_asin, min(rowid) AS line_no "
        "FROM meta_raw WHERE reason IS NULL AND parent_asin <> '' GROUP BY parent_asin"
    )
    drops = {r: 0 for r in clean.ITEM_REASONS}
    n_ok = 0
    for reason, n in con.execute(
        "SELECT reason, count(*) FROM meta_raw WHERE parent_asin <> '' GROUP BY reason"
    ).fetchall():
        if reason is None:
            n_ok = n
        else:
            drops[reason] = n
    (n_kept,) = con.execute("SELECT count(*) FROM meta_valid").fetchall()[0]
    drops["duplicate_meta"] = n_ok - n_kept
    return drops


def _choose_window(
    con: duckdb.DuckDBPyConnection, w: WindowParams, inter_path: Path
) -> tuple[dt.date, int, int, int, bool]:
    """Return (start day, months rolled back, interactions with valid metadata,
    interactions without, whether min_items was reached)."""
    n_valid, n_invalid, earliest, t_min, t_max, n_items, n_items_bare = con.execute(
        "SELECT coalesce(sum(n) FILTER (WHERE v.parent_asin IS NOT NULL), 0), "
        "coalesce(sum(n) FILTER (WHERE v.parent_asin IS NULL), 0), "
        "min(first_ts) FILTER (WHERE v.parent_asin IS NOT NULL), min(first_ts), max(s.max_ts), "
        "count(*), count(*) FILTER (WHERE v.parent_asin IS NULL) "
        "FROM item_span s LEFT JOIN meta_valid v USING (parent_asin)"
    ).fetchall()[0]
    if n_items and n_items_bare / n_items > WARN_DROPPED_SHARE:
        lines = n_valid + n_invalid
        warnings.warn(
            f"window: {n_items_bare:,} of the {n_items:,} items rated in {inter_path.name} "
            f"({n_items_bare / n_items:.1%}) have no valid metadata line (their interactions are "
            f"no_metadata, {n_invalid / max(lines, 1):.1%} of the usable lines): check that "
            f"both files are of the same data.category and complete",
            RuntimeWarning,
            stacklevel=3,
        )
    (last,) = con.execute(
        "SELECT coalesce(list(s.last_ts ORDER BY s.last_ts), []) "
        "FROM item_span s JOIN meta_valid v USING (parent_asin) WHERE s.last_ts IS NOT NULL"
    ).fetchone()
    con.execute("DROP TABLE item_span")
    if not last:
        span = "no usable interactions at all" if t_min is None else (
            f"interactions from {_utc_date(t_min)}"
            + (f" to {_utc_date(t_max)}" if t_max is not None else "")
        )
        raise WindowError(
            f"{inter_path}: no interaction with valid item metadata falls on or before "
            f"data.window.end={w.end} ({span}); set data.window.end inside the data "
            f"(timestamps must be in milliseconds)"
        )
    k = 0
    while True:
        start = months_before(w.end, w.months + k)
        n_items = len(last) - bisect.bisect_left(last, _ms(start))
        if n_items >= w.min_items:
            return start, k, int(n_valid), int(n_invalid), True
        if _ms(start) <= earliest:
            warnings.warn(
                f"window: only {n_items} items have interactions between the earliest one "
                f"({_utc_date(earliest)}) and {w.end}, fewer than data.window.min_items="
                f"{w.min_items}; using all of them (start {start}, {k} months rolled back)",
                RuntimeWarning,
                stacklevel=3,
            )
            return start, k, int(n_valid), int(n_invalid), False
        k += 1


def _cut_window(con: duckdb.DuckDBPyConnection, start_ms: int, end_excl: int) -> tuple[int, int]:
    """Create `win(user_id, parent_asin, ts, rating)`, one row per (user, item);
    return (interactions inside the window, rows kept)."""
    con.execute(
        "CREATE OR REPLACE TABLE win AS SELECT user_id, parent_asin, first.ts AS ts, "
        "first.rating AS rating, n FROM ("
        "SELECT user_id, parent_asin, min({'ts': ts, 'rating': rating}) AS first, count(*) AS n "
        "FROM inter_raw WHERE ok AND parent_asin IN (SELECT parent_asin FROM meta_valid) "
        f"AND ts >= {start_ms} AND ts < {end_excl} GROUP BY user_id, parent_asin)"
    )
    n_in, n_kept = con.execute("SELECT coalesce(sum(n), 0), count(*) FROM win").fetchall()[0]
    con.execute("DROP TABLE inter_raw")  # the biggest table; not needed any more
    return int(n_in), int(n_kept)


def _kcore(con: duckdb.DuckDBPyConnection, k: int) -> int:
    """Repeatedly delete users and items with fewer than k rows in `win`; return rows deleted."""
    deleted = 0
    while k > 0:
        (n,) = con.execute(
            "DELETE FROM win WHERE "
            f"user_id IN (SELECT user_id FROM win GROUP BY user_id HAVING count(*) < {k}) OR "
            f"parent_asin IN (SELECT parent_asin FROM win GROUP BY parent_asin HAVING count(*) < {k})"
        ).fetchall()[0]
        if n == 0:
            break
        deleted += n
    return deleted


def _item_ids(con: duckdb.DuckDBPyConnection) -> None:
    """Create `item_ids(parent_asin, item_id, n_interactions)`, ids in parent_asin order."""
    con.execute(
        "CREATE OR REPLACE TABLE item_ids AS SELECT parent_asin, "
        "(row_number() OVER (ORDER BY parent_asin) - 1)::INTEGER AS item_id, "
        "count(*) AS n_interactions FROM win GROUP BY parent_asin"
    )


def _examples_query(max_history: int) -> str:
    """All examples, in example_id order."""
    history = (
        f"OVER (PARTITION BY user_id ORDER BY ts, item_id "
        f"ROWS BETWEEN {int(max_history)} PRECEDING AND 1 PRECEDING)"
    )
    return f"""
        WITH seq AS (
            SELECT w.user_id, i.item_id, w.rating::FLOAT AS rating, w.ts,
                row_number() OVER (PARTITION BY w.user_id ORDER BY w.ts, i.item_id) AS pos,
                list(i.item_id ORDER BY w.ts, i.item_id) {history} AS h_items,
                list(w.rating::FLOAT ORDER BY w.ts, i.item_id) {history} AS h_ratings,
                list(w.ts ORDER BY w.ts, i.item_id) {history} AS h_ts
            FROM win w JOIN item_ids i USING (parent_asin)
        )
        SELECT (row_number() OVER (ORDER BY ts, user_id, item_id) - 1)::BIGINT AS example_id,
            user_id, h_items AS history_item_ids, h_ratings AS history_ratings,
            h_ts AS history_timestamps, item_id AS target_item_id, rating AS target_rating,
            ts AS target_timestamp
        FROM seq WHERE pos > 1
        ORDER BY example_id
    """


def _write_parquet(
    con: duckdb.DuckDBPyConnection, query: str, schema: pa.Schema, dest: Path
) -> None:
    """Stream a query's rows into `dest`, cast to the contract schema."""
    reader = con.sql(query).to_arrow_reader(batch_size=65_536)
    with pq.ParquetWriter(dest, schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch.select(schema.names).cast(schema))


def _write_examples(
    con: duckdb.DuckDBPyConnection, max_history: int, sizes: tuple[int, int, int], dests: list[Path]
) -> None:
    """Stream the examples once, in example_id order, cutting them into the split files."""
    reader = con.sql(_examples_query(max_history)).to_arrow_reader(batch_size=65_536)
    with ExitStack() as stack:
        writers = [
            stack.enter_context(pq.ParquetWriter(d, EXAMPLES, compression="zstd")) for d in dests
        ]
        first = 0  # example_id of the batch's first row
        for batch in reader:
            batch = batch.select(EXAMPLES.names).cast(EXAMPLES)
            lo = 0  # example_id where the split starts
            for writer, size in zip(writers, sizes, strict=True):
                a, b = max(lo - first, 0), min(lo + size - first, batch.num_rows)
                if a < b:
                    writer.write_batch(batch.slice(a, b - a))
                lo += size
            first += batch.num_rows


def _write_outputs(
    con: duckdb.DuckDBPyConnection,
    staging: Path,
    paths: Paths,
    sizes: tuple[int, int, int],
    max_history: int,
) -> tuple[dict[str, int], int]:
    """The items (text cleaning, on a second connection and thread) while the examples are
    built and split; returns the wrong-type and NUL counts of the items written
    (`_field_counts`)."""
    _item_ids(con)
    cursor = con.cursor()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            items_done = pool.submit(
                _write_parquet, cursor, _ITEMS_QUERY, ITEMS, staging / paths.items_file.name
            )
            _write_examples(
                con, max_history, sizes, [staging / paths.split_file(s).name for s in SPLITS]
            )
            items_done.result()
    finally:
        cursor.close()
    return _field_counts(con)


_ITEM_LINES = """
    FROM item_ids i
    JOIN meta_valid v USING (parent_asin)
    JOIN meta_raw m ON m.rowid = v.line_no
"""
_ITEMS_QUERY = f"""
    SELECT i.item_id, i.parent_asin, m.title,
        rrec_clean_list(rrec_meta_list(m.description), ' ') AS description,
        rrec_clean_list(rrec_meta_list(m.features), ' ') AS features,
        rrec_clean_text(rrec_meta_text(m.store)) AS store,
        rrec_clean_list(rrec_meta_list(m.categories), ' > ') AS categories,
        rrec_clean_text(rrec_meta_text(m.main_category)) AS main_category,
        m.price, rrec_meta_number(m.average_rating) AS average_rating,
        rrec_meta_count(m.rating_number) AS rating_number, i.n_interactions
    {_ITEM_LINES}
    ORDER BY i.item_id
"""
# Per typed field, the items written whose field had the wrong type (read as missing);
# last, the items written with a NUL character in their title or text.
_FIELD_COUNTS_QUERY = "SELECT " + ", ".join(
    [f"coalesce(count_if(rrec_meta_list_wrong(m.{f})), 0)" if kind == "list"
     else f"coalesce(count_if(rrec_meta_wrong(m.{f}, rrec_meta_{kind}(m.{f}))), 0)"
     for f, kind in clean.TYPED_FIELDS.items()]
    + ["coalesce(count_if(m.title_has_nul OR " + " OR ".join(
        f"rrec_{kind}_has_nul(m.{f})" for f, kind in clean.TYPED_FIELDS.items()
        if kind in ("list", "text")) + "), 0)"]
) + _ITEM_LINES


def _field_counts(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, int], int]:
    """Over `item_ids`: {field: items written whose field had the wrong type}, and the
    number of items written with a NUL character in their title or text."""
    *counts, nul = con.execute(_FIELD_COUNTS_QUERY).fetchone()
    return {f: int(n) for f, n in zip(clean.TYPED_FIELDS, counts, strict=True)}, int(nul)


def _remove_outputs(paths: Paths) -> None:
    paths.window_stats.unlink(missing_ok=True)
    for f in [paths.items_file, *(paths.split_file(s) for s in SPLITS)]:
        f.unlink(missing_ok=True)


def _remove_dead_runs(data_dir: Path, spill_root: Path) -> None:
    """What killed window runs left: their half-written `data/.processed.tmp-<pid>` and
    DuckDB spill folders `data/.duckdb_tmp/window-<pid>-*` (runs still alive keep theirs)."""
    stale = remove_dead_temporaries(data_dir) if data_dir.is_dir() else []
    if spill_root.is_dir():
        for d in sorted(spill_root.glob("window-*")):
            pid = d.name.split("-")[1]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
                stale.append(d)
    if stale:
        print(f"[window] removed what killed runs left: {', '.join(str(p) for p in stale)}", flush=True)


# -------------------------------------------------------------------------- stage


def run_window(params: Params, paths: Paths) -> dict[str, Any]:
    """Run the window stage for `params.data.category`; return the stats also written to
    `paths.window_stats` (Table 3's columns plus the window, the roll-back and every drop
    count)."""
    w = params.data.window
    category = params.data.category
    fmt = params.data.interactions
    inter_path = (
        paths.rating_only_file(category) if fmt == "rating_only" else paths.reviews_file(category)
    )
    meta_path = paths.meta_file(category)
    for p in (inter_path, meta_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: input of the window stage not found; run the download stage first")

    _remove_outputs(paths)
    data_dir = paths.root / "data"
    run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    spill_root = data_dir / ".duckdb_tmp"
    _remove_dead_runs(data_dir, spill_root)
    spill = spill_root / f"window-{run_id}"
    phase = Phases("window", echo=True)
    con: duckdb.DuckDBPyConnection | None = None
    try:
        spill.mkdir(parents=True, exist_ok=True)
        # data/processed is written whole beside itself and replaces the old one only
        # once every check has passed; a failure leaves no half-written directory.
        with atomic_path(paths.processed) as staging:
            staging.mkdir()
            con = duckdb.connect(
                ":memory:",
                config={
                    "memory_limit": w.memory_limit,
                    "threads": w.threads,
                    "temp_directory": str(spill),
                    "preserve_insertion_order": False,
                },
            )
            con.execute("SET enable_progress_bar = false")
            clean.register(con)
            end_excl = _ms(w.end + dt.timedelta(days=1))
            with phase("read interactions and metadata, check items"):
                counts, bad_lines = _read_both(
                    con, inter_path, fmt, meta_path, end_excl, w.max_title_words
                )
            for p, (lines, malformed) in counts.items():
                check_malformed(p, lines, malformed, w.max_malformed_share)

            with phase("drop duplicate metadata"):
                drops = _clean_items(con)
            drops.update(bad_lines)
            _check_dropped(_drop_stats(drops, counts, inter_path, w.max_dropped_share), inter_path,
                           meta_path.name, w.max_dropped_share, final=False)
            with phase("choose the window"):
                start, rolled, n_valid, n_no_meta, reached = _choose_window(con, w, inter_path)
            drops["no_metadata"] = n_no_meta
            # Stop before the expensive steps when too much was bad data.
            _check_dropped(_drop_stats(drops, counts, inter_path, w.max_dropped_share), inter_path,
                           meta_path.name, w.max_dropped_share, final=False)
            with phase("cut the window, drop duplicates"):
                n_in, n_kept = _cut_window(con, _ms(start), end_excl)
            drops["outside_window"] = n_valid - n_in
            drops["duplicate_interactions"] = n_in - n_kept
            with phase("k-core"):
                drops["kcore"] = _kcore(con, w.kcore)
            users, items, interactions = con.execute(
                "SELECT count(DISTINCT user_id), count(DISTINCT parent_asin), count(*) FROM win"
            ).fetchall()[0]
            n_examples = int(interactions - users)  # every interaction but each user's first
            if n_examples == 0:
                raise WindowError(
                    f"{inter_path}: the window {start} .. {w.end} yields no example (no user has "
                    f"two interactions in it after cleaning); move data.window.end or lower "
                    f"data.window.kcore"
                )
            sizes = split_sizes(n_examples, w.split)
            with phase("write examples and items"):
                wrong_type, nul = _write_outputs(con, staging, paths, sizes, w.max_history)

            stats: dict[str, Any] = {
                "category": category,
                "users": int(users),
                "items": int(items),
                "interactions": int(interactions),
                "train": sizes[0],
                "valid": sizes[1],
                "test": sizes[2],
                "examples": n_examples,
                "window_start": start.isoformat(),
                "window_end": w.end.isoformat(),
                "months_rolled_back": rolled,
                "min_items_reached": reached,
                **_drop_stats(drops, counts, inter_path, w.max_dropped_share),
                "wrong_type": wrong_type,
                "nul_characters": nul,
            }
            _check_dropped(stats, inter_path, meta_path.name, w.max_dropped_share, final=True)
        write_text(paths.window_stats, json.dumps(stats, indent=2) + "\n")
        print(f"[window] done in {phase.total():.2f} s: {users} users, {items} items, "
              f"{n_examples} examples", flush=True)
        return stats
    finally:
        if con is not None:
            con.close()
        shutil.rmtree(spill, ignore_errors=True)
        try:
            spill_root.rmdir()
        except OSError:
            pass  # another run still spills there, or it was never created


__all__ = [
    "DROP_REASONS", "WindowError", "check_malformed", "drop_table", "months_before", "run_window",
    "split_sizes",
]


def clean_meta_file(
    path: Path, max_title_words: int
) -> tuple[list[dict[str, Any]], dict[str, int], int, dict[str, int], int]:
    """Clean an Amazon 2023 metadata file (JSONL, optionally gzipped) with the window stage's
    rules; returns the kept items (ITEMS columns but item_id / n_interactions, in file order),
    the drop counts per reason (with `malformed`), the number of lines read, per typed
    field the kept items whose field had the wrong type (read as missing), and the kept
    items with a NUL character in their title or text (read as a space).

    This is the window stage's own metadata reader, validity rules and items query, for
    catalogue updates at serving time: a served item is cleaned exactly like a trained one."""
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        con.execute("SET enable_progress_bar = false")
        clean.register(con)
        try:
            lines, malformed = _read_meta(con, Path(path), max_title_words)
        except duckdb.Error as err:
            raise ValueError(
                f"{path}: could not be read as Amazon metadata JSONL ({err}); one JSON object a line"
            ) from err
        drops = _clean_items(con)
        con.execute(
            "CREATE TABLE item_ids AS SELECT parent_asin, "
            "(row_number() OVER (ORDER BY line_no) - 1)::INTEGER AS item_id, "
            "0::BIGINT AS n_interactions FROM meta_valid"
        )
        rows = con.sql(_ITEMS_QUERY).to_arrow_table().to_pylist()
        wrong_type, nul = _field_counts(con)
    finally:
        con.close()
    for row in rows:
        row.pop("item_id")
        row.pop("n_interactions")
    return rows, {**drops, "malformed": int(malformed)}, int(lines), wrong_type, nul
