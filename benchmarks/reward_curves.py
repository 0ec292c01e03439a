"""The reward of a method at each evaluation, over the seeds of a `quality.py --workdir`
folder: each seed's `reports/eval/<method>/valid_curves.csv` read, one row per step with
the mean ± standard deviation over the seeds of the fused reward on the fixed train probe
(`train_reward`, train.reward_probe_users), on the valid split (`reward`) and valid
NDCG@10, then each seed's change from step 0 (the model training starts from) to its
kept step and to its last step.

    python benchmarks/reward_curves.py DIR            # recpo
    python benchmarks/reward_curves.py DIR --method contrastive
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

COLUMNS = ("train_reward", "reward", "ndcg@10")


def read_curves(workdir: Path, method: str) -> dict[str, list[dict[str, float]]]:
    """{seed folder: evaluations in step order}, only seeds whose curves start at step 0."""
    out = {}
    for f in sorted(workdir.glob(f"seed-*/reports/eval/{method}/valid_curves.csv")):
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f.open())]
        if rows and rows[0]["step"] == 0 and all(c in rows[0] for c in COLUMNS):
            out[f.parts[-5]] = rows
    if not out:
        raise SystemExit(f"{workdir}: no seed-*/reports/eval/{method}/valid_curves.csv with a step-0 reward; "
                         f"run quality.py --workdir {workdir}")
    return out


def _cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--method", default="recpo")
    args = ap.parse_args()
    curves = read_curves(args.workdir, args.method)
    steps = sorted({r["step"] for rows in curves.values() for r in rows})
    print(f"{args.method}, {len(curves)} seeds ({', '.join(curves)})\n")
    print("| step | seeds | train-probe reward | valid reward | valid NDCG@10 |")
    print("|---|---|---|---|---|")
    for step in steps:
        at = [r for rows in curves.values() for r in rows if r["step"] == step]
        print(f"| {int(step)} | {len(at)} | " + " | ".join(_cell([r[c] for r in at]) for c in COLUMNS) + " |")
    print("\n| seed | kept step | train-probe reward: start → kept / last | valid reward: start → kept / last |")
    print("|---|---|---|---|")
    for seed, rows in curves.items():
        kept = max(rows[1:] or rows, key=lambda r: r["ndcg@10"])  # the loop keeps the best later step
        cells = [f"{rows[0][c]:.4f} → {kept[c]:.4f} / {rows[-1][c]:.4f}" for c in COLUMNS[:2]]
        print(f"| {seed} | {int(kept['step'])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
