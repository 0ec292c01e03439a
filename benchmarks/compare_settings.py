"""Paired comparison of one method trained under two settings: two `quality.py --workdir`
folders (the same seeds, the same contrastive models), each seed's `ranks.csv` read from
both; prints B − A in NDCG@10 on the very same examples, averaged over the seeds, with a
95 % bootstrap interval over examples and the number of seeds where B is ahead.

    python benchmarks/compare_settings.py DIR_A DIR_B            # recpo
    python benchmarks/compare_settings.py DIR_A DIR_B --method contrastive
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quality import print_paired  # this folder's quality.py, the same table

from rrec.stages.evaluate import RANKS_CSV, read_ranks


def seed_ranks(workdir: Path, method: str) -> tuple[dict[str, list[dict[int, int]]], list[str]]:
    files = sorted(workdir.glob(f"seed-*/reports/eval/{method}/{RANKS_CSV}"))
    if not files:
        raise SystemExit(f"{workdir}: no seed-*/reports/eval/{method}/{RANKS_CSV}; run quality.py --workdir {workdir}")
    runs = [read_ranks(f) for f in files]
    return {split: [r[split] for r in runs] for split in ("valid", "test")}, [f.parts[-5] for f in files]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--method", default="recpo")
    args = ap.parse_args()
    (a, seeds_a), (b, seeds_b) = seed_ranks(args.a, args.method), seed_ranks(args.b, args.method)
    if seeds_a != seeds_b:
        raise SystemExit(f"the two folders hold different seeds: {seeds_a} and {seeds_b}")
    print(f"{args.method}, {args.b} − {args.a}, NDCG@10, {len(seeds_a)} seeds (seeds ahead: where B is above A)")
    print_paired(a, b)


if __name__ == "__main__":
    main()
