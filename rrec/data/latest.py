"""The date of the newest interaction in the downloaded interactions file.

Scheduled retraining moves `data.window.end` to this date. DuckDB streams the gzip
file, so a file larger than memory is fine. Lines that do not parse, and timestamps
that cannot be real (not positive, or later than tomorrow), are ignored.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb

from rrec.config import Params
from rrec.paths import Paths

_CSV_COLUMNS = "{'user_id': 'VARCHAR', 'parent_asin': 'VARCHAR', 'rating': 'DOUBLE', 'timestamp': 'VARCHAR'}"


def interactions_file(params: Params, paths: Paths) -> Path:
    """The interactions file `download` writes for `params.data.interactions`."""
    cat = params.data.category
    if params.data.interactions == "rating_only":
        return paths.rating_only_file(cat)
    return paths.reviews_file(cat)


def _timestamps_query(path: Path, kind: str) -> str:
    src = str(path).replace("'", "''")
    if kind == "rating_only":
        # strict_mode drops rows with too many or too few fields; ignore_errors drops
        # the rows that still do not fit the columns.
        raw = (
            f"SELECT \"timestamp\" AS ts FROM read_csv('{src}', header = true, "
            f"columns = {_CSV_COLUMNS}, ignore_errors = true, strict_mode = true)"
        )
    else:
        # One JSON value a line, parsed by us: read_json would give up on the whole
        # file for a line that is valid JSON but not an object.
        raw = (
            f"SELECT json_extract_string(json, '$.timestamp') AS ts FROM read_json_objects("
            f"'{src}', format = 'newline_delimited', ignore_errors = true) "
            f"WHERE json_type(json) = 'OBJECT'"
        )
    return f"SELECT TRY_CAST(TRY_CAST(ts AS DOUBLE) AS BIGINT) AS ms FROM ({raw})"


def latest_interaction_date(params: Params, paths: Paths) -> dt.date:
    """The UTC date of the newest valid interaction timestamp (milliseconds) in the file."""
    path = interactions_file(params, paths)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: interactions file not found; run the download stage first "
            f"(`dvc repro download`)"
        )
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    limit_ms = int(tomorrow.timestamp() * 1000)
    w = params.data.window
    con = duckdb.connect(config={"memory_limit": w.memory_limit, "threads": w.threads})
    try:
        con.execute("SET enable_progress_bar = true")
        row = con.execute(
            f"SELECT max(ms), count(ms) FROM ({_timestamps_query(path, params.data.interactions)}) "
            f"WHERE ms > 0 AND ms <= ?",
            [limit_ms],
        ).fetchone()
    except duckdb.Error as err:
        raise ValueError(f"{path}: could not be read as a gzip {params.data.interactions} file: {err}") from err
    finally:
        con.close()
    if row is None or row[0] is None:
        raise ValueError(
            f"{path}: no line with a valid `timestamp` (milliseconds since 1970, not in the "
            f"future); check that data.interactions ({params.data.interactions!r}) matches the file"
        )
    return dt.datetime.fromtimestamp(row[0] / 1000, dt.UTC).date()
