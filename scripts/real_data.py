"""MovieLens 100K as an Amazon Reviews 2023 category, served on 127.0.0.1 for the pipeline.

MovieLens 100K (GroupLens, https://grouplens.org/datasets/movielens/100k/) is a real
data set of 100,000 ratings (1-5 stars) by 943 users of 1,682 films, September 1997 to
April 1998. Its licence forbids redistribution, so the project does not ship it: fetch
`ml-100k.zip` yourself, unpack it, and point `convert` at the folder that holds
`u.data` and `u.item`.

    python scripts/real_data.py convert ~/ml-100k /tmp/ml100k-amazon --category Movies
    python scripts/real_data.py serve /tmp/ml100k-amazon --port 8765

`convert` writes what `data.source: amazon2023` downloads from `data.base_url`
(`rrec.data.download.source_urls`), at the same relative paths:

    benchmark/5core/rating_only/<Category>.csv.gz   user_id,parent_asin,rating,timestamp
                                                    (timestamps in milliseconds)
    raw/meta_categories/meta_<Category>.jsonl.gz    one Amazon-2023-style object per film
    SHA256SUMS                                      for the reader; the download step
                                                    checks gzip integrity only

Each film's metadata: `parent_asin` "ML100K" + the four-digit film id, `title` as in
`u.item` (latin-1), `main_category` "Movies & TV", `average_rating` (one decimal) and
`rating_number` computed from all of `u.data` (like Amazon's, a snapshot taken after the
last rating), `features` [], `description` one sentence made of the genres and the
release date, `categories` the genre names, `store` "", `details` {}, `images` and
`videos` [], `bought_together` null. MovieLens has no prices, and the window stage drops
an item whose price is not a number (`bad_price`, rrec/data/clean.py), so every film
gets the same placeholder price (`--price`, default 0.0); no stage after the window
reads the price. Users are "U" + the four-digit user id. The gzip files carry no time
stamp, so the same input always gives byte-identical output.

`serve` serves the converted folder over HTTP on 127.0.0.1 (a thread of
`http.server.ThreadingHTTPServer`) and prints the `data.base_url` to use; Ctrl-C stops
it. It answers plain GET requests only (no `Range`); the downloader then simply starts a
file over instead of resuming it, which for files this small costs nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gzip
import hashlib
import io
import json
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# The 19 genre flags at the end of every u.item line, in file order (ml-100k's u.genre).
GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
MAIN_CATEGORY = "Movies & TV"
CSV_HEADER = "user_id,parent_asin,rating,timestamp"


def interactions_relpath(category: str) -> str:
    """Where `rrec.data.download.source_urls` looks for the rating-only file, under base_url."""
    return f"benchmark/5core/rating_only/{category}.csv.gz"


def meta_relpath(category: str) -> str:
    return f"raw/meta_categories/meta_{category}.jsonl.gz"


def item_asin(movie_id: int) -> str:
    return f"ML100K{movie_id:04d}"


def user_name(user_id: int) -> str:
    return f"U{user_id:04d}"


class ConvertError(ValueError):
    """An input line that is not in the MovieLens 100K format; the message names it."""


@dataclass(frozen=True)
class Rating:
    user: int
    movie: int
    rating: int
    seconds: int


@dataclass(frozen=True)
class Movie:
    movie: int
    title: str
    release: dt.date | None
    genres: tuple[str, ...]


def read_ratings(path: Path) -> list[Rating]:
    """u.data: `user item rating unix-seconds`, tab-separated. A first line that is not
    numeric (some copies add a header) is skipped; any other bad line is an error."""
    out: list[Rating] = []
    with open(path, encoding="latin-1") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 4:
                    raise ValueError(f"{len(fields)} fields, expected 4")
                user, movie, rating, seconds = (int(f) for f in fields)
            except ValueError as err:
                if n == 1 and not out:
                    continue  # a header line
                raise ConvertError(f"{path}:{n}: not a `user item rating seconds` line ({err}): "
                                   f"{line.rstrip()!r}") from err
            if not 1 <= rating <= 5:
                raise ConvertError(f"{path}:{n}: rating {rating} is outside 1-5")
            out.append(Rating(user, movie, rating, seconds))
    if not out:
        raise ConvertError(f"{path}: no ratings")
    return out


def _release(text: str) -> dt.date | None:
    text = text.strip()
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, "%d-%b-%Y").date()
    except ValueError:
        return None


def read_movies(path: Path) -> list[Movie]:
    """u.item: `id|title|release date|video release date|IMDb URL|19 genre flags`, latin-1."""
    out: list[Movie] = []
    with open(path, encoding="latin-1") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("|")
            if len(fields) != 5 + len(GENRES):
                raise ConvertError(f"{path}:{n}: {len(fields)} '|'-separated fields, expected "
                                   f"{5 + len(GENRES)}")
            try:
                movie = int(fields[0])
                flags = [int(f) for f in fields[5:]]
            except ValueError as err:
                raise ConvertError(f"{path}:{n}: bad film id or genre flag ({err})") from err
            genres = tuple(g for g, f in zip(GENRES, flags, strict=True) if f)
            out.append(Movie(movie, fields[1].strip(), _release(fields[2]), genres))
    if not out:
        raise ConvertError(f"{path}: no films")
    return out


def describe(movie: Movie) -> str:
    """One sentence from the genres and the release date."""
    known = [g for g in movie.genres if g != "unknown"]
    kinds = " / ".join(known) + " film" if known else "Film of unknown genre"
    if movie.release is None:
        return f"{kinds}; release date unknown."
    return f"{kinds}, released {movie.release.day} {movie.release:%B %Y}."


def meta_record(movie: Movie, ratings: Sequence[int], price: float) -> dict:
    """The Amazon Reviews 2023 metadata object of one film."""
    return {
        "main_category": MAIN_CATEGORY,
        "title": movie.title,
        "average_rating": round(sum(ratings) / len(ratings), 1) if ratings else None,
        "rating_number": len(ratings),
        "features": [],
        "description": [describe(movie)],
        "price": price,
        "images": [],
        "videos": [],
        "store": "",
        "categories": list(movie.genres),
        "details": {},
        "parent_asin": item_asin(movie.movie),
        "bought_together": None,
    }


def _write_gz(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.encode("utf-8"))
    tmp.replace(path)


def convert(ml_dir: Path, out_dir: Path, category: str = "Movies", price: float = 0.0) -> dict:
    """Write the two Amazon-format files of `category` under `out_dir`; return a summary."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", category):
        raise ConvertError(f"category must look like an Amazon category name, got {category!r}")
    ml_dir, out_dir = Path(ml_dir), Path(out_dir)
    for name in ("u.data", "u.item"):
        if not (ml_dir / name).is_file():
            raise ConvertError(f"{ml_dir / name}: not found; point at the unpacked ml-100k folder")
    ratings = read_ratings(ml_dir / "u.data")
    movies = read_movies(ml_dir / "u.item")
    known = {m.movie for m in movies}
    unknown = sorted({r.movie for r in ratings} - known)
    if unknown:
        raise ConvertError(f"{ml_dir / 'u.data'}: film ids {unknown[:5]} are not in u.item")

    by_movie: dict[int, list[int]] = {}
    for r in ratings:
        by_movie.setdefault(r.movie, []).append(r.rating)

    lines = [CSV_HEADER]
    for r in sorted(ratings, key=lambda r: (r.seconds, r.user, r.movie)):
        lines.append(f"{user_name(r.user)},{item_asin(r.movie)},{float(r.rating)},{r.seconds * 1000}")
    inter_path = out_dir / interactions_relpath(category)
    _write_gz(inter_path, "\n".join(lines) + "\n")

    meta = io.StringIO()
    for m in sorted(movies, key=lambda m: m.movie):
        meta.write(json.dumps(meta_record(m, by_movie.get(m.movie, []), price)) + "\n")
    meta_path = out_dir / meta_relpath(category)
    _write_gz(meta_path, meta.getvalue())

    sums = []
    for p in (inter_path, meta_path):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        sums.append(f"{digest}  {p.relative_to(out_dir).as_posix()}")
    (out_dir / "SHA256SUMS").write_text("\n".join(sums) + "\n")

    seconds = [r.seconds for r in ratings]
    return {
        "interactions": len(ratings),
        "users": len({r.user for r in ratings}),
        "items": len(movies),
        "first": dt.datetime.fromtimestamp(min(seconds), dt.UTC).isoformat(),
        "last": dt.datetime.fromtimestamp(max(seconds), dt.UTC).isoformat(),
        "files": [str(inter_path), str(meta_path)],
    }


# ----------------------------------------------------------------------- serving


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)


@dataclass
class Server:
    """A running file server; `base_url` is what `data.base_url` should be."""

    httpd: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_server(directory: Path, port: int = 0, verbose: bool = False) -> Server:
    """Serve `directory` on 127.0.0.1:`port` (0: a free port) from a daemon thread."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder; run `convert` first")
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    httpd.verbose = verbose  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              name="real-data-server", daemon=True)
    thread.start()
    return Server(httpd, thread)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="MovieLens 100K folder -> Amazon Reviews 2023 files")
    c.add_argument("ml100k_dir", type=Path, help="folder holding u.data and u.item")
    c.add_argument("out_dir", type=Path, help="folder to write (served as data.base_url)")
    c.add_argument("--category", default="Movies", help="category name to write (data.category)")
    c.add_argument("--price", type=float, default=0.0,
                   help="placeholder price of every film (MovieLens has none)")
    s = sub.add_parser("serve", help="serve a converted folder on 127.0.0.1 until Ctrl-C")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    s.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    if args.command == "convert":
        try:
            summary = convert(args.ml100k_dir, args.out_dir, args.category, args.price)
        except ConvertError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
        return 0

    server = start_server(args.out_dir, args.port, verbose=args.verbose)
    print(f"serving {args.out_dir.resolve()} at {server.base_url}", flush=True)
    print(f"data.base_url: {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
