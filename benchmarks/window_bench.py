"""Benchmark of the `window` stage against the floor of merely reading its inputs.

    python benchmarks/window_bench.py --interactions 2000000 --items 200000 --out /tmp/wb

1. Generates a large synthetic category `Bench` in the Amazon Reviews 2023 formats
   (rating-only CSV and metadata JSONL, both gzip) under `--out/data/raw`: vectorised
   numpy, written in chunks; realistic line sizes (metadata lines carry descriptions,
   features, image URLs and details) and a little dirt (HTML entities, tags,
   non-ASCII, junk prices, duplicate and malformed metadata lines).
2. The floor (the named peer): decompress both files and count their lines, nothing
   else. Measured three ways: Python `gzip` streaming with `bytes.count`, `zcat FILE |
   wc -l` one file after the other, and both `zcat | wc -l` pipelines at once (the
   stage itself reads its two files at the same time); the fastest is the floor.
3. The stage: `run_window` in a fresh interpreter (imports included); wall time, CPU
   time (user + sys) and peak RSS from `resource.getrusage(RUSAGE_CHILDREN)` (the
   floor's children are tiny, so the maximum is the stage's).

Each of `--repeats` rounds measures every floor and the stage; the best of each is
kept, because timings on a shared machine only ever get worse. Prints the ratio stage /
floor for wall time (target: at most 1.5x) and CPU time, and the peak memory (target:
under 4 GiB).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

CATEGORY = "Bench"
_ALNUM = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", dtype=np.uint8)
_WORDS = np.array(
    (
        "game console wireless controller edition deluxe collector pack bundle digital "
        "remastered classic racing adventure puzzle strategy arcade retro portable "
        "headset keyboard mouse charger cable stand case skin grip trigger battery "
        "ultimate legendary dark light shadow dragon knight star galaxy quest legend "
        "super mega turbo hyper power pro max mini neo prime fusion storm fire ice "
        "sword shield magic kingdom empire world island city space ocean forest"
    ).split()
)
_START_MS = int(dt.datetime(2014, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
_END_MS = int(dt.datetime(2023, 9, 30, tzinfo=dt.UTC).timestamp() * 1000)


def _ids(rng: np.random.Generator, n: int, width: int, prefix: bytes = b"") -> np.ndarray:
    """`n` distinct uppercase alphanumeric ids of `width` characters (after `prefix`)."""
    out: np.ndarray = np.empty(0, dtype=f"S{len(prefix) + width}")
    while out.size < n:
        codes = _ALNUM[rng.integers(0, _ALNUM.size, size=(n, width))]
        if prefix:
            codes = np.hstack([np.tile(np.frombuffer(prefix, np.uint8), (n, 1)), codes])
        fresh = np.ascontiguousarray(codes).view(f"S{len(prefix) + width}").ravel()
        out = np.unique(np.concatenate([out, fresh]))
    return rng.permutation(out)[:n]


def _phrases(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[str]:
    """`n` random phrases of `lo..hi` words from the fixed vocabulary."""
    lengths = rng.integers(lo, hi + 1, size=n)
    words = _WORDS[rng.integers(0, _WORDS.size, size=int(lengths.sum()))].tolist()
    ends = np.cumsum(lengths).tolist()
    out, start = [], 0
    for end in ends:
        out.append(" ".join(words[start:end]))
        start = end
    return out


def _write_interactions(
    path: Path, rng: np.random.Generator, asins: np.ndarray, n: int, chunk: int
) -> None:
    n_users = max(1, n // 8)
    users = _ids(rng, n_users, 28, b"A")
    # Zipf-like item popularity, users with a long-tailed number of interactions.
    pop = 1.0 / np.arange(1, asins.size + 1) ** 0.9
    item_cdf = np.cumsum(rng.permutation(pop))
    item_cdf /= item_cdf[-1]
    activity = rng.pareto(1.5, size=n_users) + 1.0
    user_cdf = np.cumsum(activity) / activity.sum()
    with gzip.open(path, "wt", compresslevel=6, newline="\n") as fh:
        fh.write("user_id,parent_asin,rating,timestamp\n")
        for lo in tqdm(range(0, n, chunk), desc="interactions", unit="chunk", leave=False):
            m = min(chunk, n - lo)
            u = users[np.searchsorted(user_cdf, rng.random(m))].astype(str)
            i = asins[np.searchsorted(item_cdf, rng.random(m))].astype(str)
            r = rng.choice(np.array(["1.0", "2.0", "3.0", "4.0", "5.0"]), size=m,
                           p=[0.06, 0.05, 0.1, 0.2, 0.59])
            # Later years hold more reviews, as in the real catalogue.
            ts = (_START_MS + (_END_MS - _START_MS) * np.sqrt(rng.random(m))).astype(np.int64)
            fh.write("\n".join(map(",".join, zip(u, i, r, ts.astype(str), strict=True))))
            fh.write("\n")


def _meta_line(
    asin: str, title: str, desc: list[str], feats: list[str], price: str, store: str, k: int
) -> str:
    images = [
        {
            "thumb": f"https://m.media-amazon.com/images/I/{asin}{j}._SS40_.jpg",
            "large": f"https://m.media-amazon.com/images/I/{asin}{j}._AC_.jpg",
            "variant": "MAIN" if j == 0 else f"PT0{j}",
            "hi_res": f"https://m.media-amazon.com/images/I/{asin}{j}._AC_SL1500_.jpg",
        }
        for j in range(3)
    ]
    return (
        '{"main_category": "Video Games", "title": ' + title
        + f', "average_rating": {3 + (k % 21) / 10:.1f}, "rating_number": {k % 997}, '
        + '"features": ' + json.dumps(feats) + ', "description": ' + json.dumps(desc)
        + ', "price": ' + price + ', "images": ' + json.dumps(images)
        + ', "videos": [], "store": ' + json.dumps(store)
        + ', "categories": ["Video Games", "PC", "Accessories"], "details": '
        + json.dumps({"Brand": store, "Date First Available": "March 3, 2019"})
        + f', "parent_asin": "{asin}", "bought_together": null}}'
    )


def _write_meta(path: Path, rng: np.random.Generator, asins: np.ndarray, chunk: int) -> None:
    n = asins.size
    with gzip.open(path, "wt", compresslevel=6, newline="\n") as fh:
        for lo in tqdm(range(0, n, chunk), desc="meta", unit="chunk", leave=False):
            m = min(chunk, n - lo)
            titles = _phrases(rng, m, 2, 14)
            descs = _phrases(rng, 2 * m, 20, 60)
            feats = _phrases(rng, 4 * m, 4, 12)
            stores = _phrases(rng, m, 1, 2)
            prices = rng.uniform(1, 200, size=m)
            dirt = rng.random(m)
            kind = rng.random(m)
            lines = []
            for j in range(m):
                title = titles[j]
                d = dirt[j]
                if d < 0.02:
                    title = title + " &amp; More"
                elif d < 0.03:
                    title = "<b>" + title + "</b> Caf\u00e9"
                elif d < 0.035:
                    title = '"' + title + '"'
                elif d < 0.036:
                    title = '<span id="x">' + title + "</span>"
                elif d < 0.037:
                    title = "X"
                elif d < 0.038:
                    title = " ".join([title] * 11)  # more than 20 words
                k = kind[j]
                price = (
                    f"{prices[j]:.2f}" if k < 0.75
                    else f'"{prices[j]:.2f}"' if k < 0.85
                    else '"None"' if k < 0.93
                    else "null"
                )
                title_json = "null" if 0.038 <= d < 0.039 else json.dumps(title)
                line = _meta_line(str(asins[lo + j]), title_json, descs[2 * j:2 * j + 2],
                                  feats[4 * j:4 * j + 4], price, stores[j], lo + j)
                if d > 0.9995:
                    line = line[: len(line) // 2]  # a truncated, malformed line
                lines.append(line)
                if 0.995 < d <= 0.9995:
                    lines.append(line)  # a duplicate metadata record
            fh.write("\n".join(lines))
            fh.write("\n")


def generate(out: Path, n_interactions: int, n_items: int, seed: int = 0) -> tuple[Path, Path]:
    """Write `Bench.csv.gz` and `meta_Bench.jsonl.gz` under `out/data/raw`; return both paths."""
    rng = np.random.default_rng(seed)
    raw = out / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    csv_path, meta_path = raw / f"{CATEGORY}.csv.gz", raw / f"meta_{CATEGORY}.jsonl.gz"
    asins = _ids(rng, n_items, 8, b"B0").astype(str)
    _write_interactions(csv_path, rng, asins, n_interactions, chunk=250_000)
    _write_meta(meta_path, rng, asins, chunk=20_000)
    return csv_path, meta_path


# ------------------------------------------------------------------------- floor


class _Clock:
    """Wall time and CPU time (this process plus waited-for children) of a block."""

    def __enter__(self) -> _Clock:
        self._wall = time.perf_counter()
        self._cpu = self._cpu_now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = self._cpu_now() - self._cpu

    @staticmethod
    def _cpu_now() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _count_python(path: Path) -> int:
    n = 0
    with gzip.open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            n += block.count(b"\n")
    return n


def _floor_python(files: list[Path]) -> None:
    for f in files:
        _count_python(f)


def _zcat_wc(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(f"zcat {str(path)!r} | wc -l", shell=True, stdout=subprocess.DEVNULL)


def _floor_zcat_sequential(files: list[Path]) -> None:
    for f in files:
        if _zcat_wc(f).wait() != 0:
            raise RuntimeError(f"zcat | wc -l failed on {f}")


def _floor_zcat_parallel(files: list[Path]) -> None:
    procs = [_zcat_wc(f) for f in files]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError(f"zcat | wc -l failed on one of {files}")


FLOORS: dict[str, Callable[[list[Path]], None]] = {
    "python gzip streaming, one file after the other": _floor_python,
    "zcat | wc -l, one file after the other": _floor_zcat_sequential,
    "zcat | wc -l, both files at once": _floor_zcat_parallel,
}


# ------------------------------------------------------------------------- stage

_STAGE = """
import json, sys, time
from pathlib import Path
from rrec.config import parse_params
from rrec.data.window import run_window
from rrec.paths import Paths
root = Path(sys.argv[1])
params = parse_params({"data": {"source": "amazon2023", "category": sys.argv[2],
    "window": {"end": "2023-09-30", "months": 12, "min_items": int(sys.argv[3]),
               "memory_limit": sys.argv[4], "threads": int(sys.argv[5])}}})
t0 = time.perf_counter()
stats = run_window(params, Paths(root))
print("STAGE_SECONDS", time.perf_counter() - t0)
print("STAGE_STATS", json.dumps(stats))
"""


def run_stage(out: Path, min_items: int, memory_limit: str, threads: int) -> tuple[dict, str]:
    """Run the stage in a fresh interpreter; return its stats and its phase lines."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _STAGE, str(out), CATEGORY, str(min_items), memory_limit,
         str(threads)],
        cwd=repo, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"the window stage failed (exit {proc.returncode}), see above")
    stats: dict = {}
    phases = []
    for line in proc.stdout.splitlines():
        if line.startswith("STAGE_STATS "):
            stats = json.loads(line.removeprefix("STAGE_STATS "))
        elif line.startswith(("[window]", "STAGE_SECONDS")):
            phases.append("    " + line)
    return stats, "\n".join(phases)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interactions", type=int, default=2_000_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--out", type=Path, required=True, help="working folder (data/ goes here)")
    ap.add_argument("--min-items", type=int, default=10_000)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of floor + stage; the best of each is kept (shared machines)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="keep already generated files")
    args = ap.parse_args(argv)

    raw = args.out / "data" / "raw"
    files = [raw / f"{CATEGORY}.csv.gz", raw / f"meta_{CATEGORY}.jsonl.gz"]
    if not (args.reuse and all(f.exists() for f in files)):
        t0 = time.perf_counter()
        generate(args.out, args.interactions, args.items, args.seed)
        print(f"generated in {time.perf_counter() - t0:.1f} s")
    for f in files:
        print(f"  {f}: {f.stat().st_size / 2**20:.1f} MiB gzip")
    floors = FLOORS if shutil.which("zcat") else dict(list(FLOORS.items())[:1])

    best: dict[str, tuple[float, float]] = {}
    stage_best = (float("inf"), float("inf"))
    stats: dict = {}
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}")
        for name, way in floors.items():
            with _Clock() as c:
                way(files)
            print(f"  floor, {name}: {c.wall:.2f} s wall, {c.cpu:.2f} s cpu")
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], c.wall), min(old[1], c.cpu))
        with _Clock() as c:
            stats, phases = run_stage(args.out, args.min_items, args.memory_limit, args.threads)
        print(f"  stage (fresh interpreter): {c.wall:.2f} s wall, {c.cpu:.2f} s cpu\n{phases}")
        stage_best = (min(stage_best[0], c.wall), min(stage_best[1], c.cpu))
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1 << 20)

    keys = ("users", "items", "interactions", "train", "valid", "test", "months_rolled_back")
    print("stats:", {k: stats.get(k) for k in keys})
    print(f"lines: {stats.get('lines')}  malformed: {stats.get('malformed')}")
    print(f"drops: {stats.get('drops')}")
    floor_name = min(best, key=lambda k: best[k][0])
    floor_wall = best[floor_name][0]
    floor_cpu = min(v[1] for v in best.values())
    print(f"\nbest of {args.repeats} rounds (the machine may be shared: compare within this run)")
    print(f"floor, wall: {floor_wall:.2f} s ({floor_name})")
    print(f"floor, cpu:  {floor_cpu:.2f} s (the least cpu of the ways above)")
    print(f"stage, wall: {stage_best[0]:.2f} s, cpu: {stage_best[1]:.2f} s "
          "(fresh interpreter, imports included)")
    print(f"ratio stage / floor: wall {stage_best[0] / floor_wall:.2f}x, "
          f"cpu {stage_best[1] / floor_cpu:.2f}x  (target <= 1.5x)")
    print(f"peak RSS of the stage: {peak_gib:.2f} GiB  (target < 4 GiB)")


if __name__ == "__main__":
    main()
