"""What orchestration costs: plain `dvc repro -f` wall time against the sum of the
stages' own compute.

Each stage module prints `rrec-stage-compute <stage> <seconds>`: the time spent in the
stage's work (the library call, MLflow logging included). Everything else in the wall
time of the repro is orchestration: a Python process per stage with its imports
(torch, transformers, MLflow) and DVC (hashing, lock file).

    python benchmarks/orchestration_overhead.py                 # forces a full `dvc repro -f` here
    python benchmarks/orchestration_overhead.py --log repro.log --wall 612.3   # parse a finished run
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MARK = re.compile(r"^rrec-stage-compute (\S+) ([0-9.]+)$", re.M)


def stage_compute(log: str) -> dict[str, float]:
    return {stage: float(s) for stage, s in MARK.findall(log)}


def report(compute: dict[str, float], wall: float) -> str:
    total = sum(compute.values())
    lines = [f"{'stage':<24}{'compute s':>10}"]
    lines += [f"{stage:<24}{s:>10.1f}" for stage, s in compute.items()]
    over = wall - total
    lines += [
        f"{'sum of stage compute':<24}{total:>10.1f}",
        f"{'dvc repro wall':<24}{wall:>10.1f}",
        f"orchestration + start-up: {over:.1f} s = {100 * over / wall:.1f} % of the wall time"
        + (f", {over / len(compute):.1f} s per stage" if compute else ""),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="the project (a DVC repository)")
    ap.add_argument(
        "--keep-checkpoints", action="store_true",
        help="keep checkpoints/: a forced train stage then resumes from the finished run's last checkpoint "
        "and trains nothing (by default they are removed, so that training is measured)",
    )
    ap.add_argument("--log", help="parse this captured stdout of a finished repro instead of running one")
    ap.add_argument("--wall", type=float, help="with --log: the measured wall time of that repro, seconds")
    args = ap.parse_args()
    if args.log:
        if args.wall is None:
            ap.error("--log needs --wall")
        print(report(stage_compute(Path(args.log).read_text()), args.wall))
        return
    cmd = [sys.executable, "-m", "dvc", "repro", "-f"]
    if not args.keep_checkpoints:
        shutil.rmtree(Path(args.root) / "checkpoints", ignore_errors=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=args.root, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    print(f"command: {' '.join(cmd)}")
    print(report(stage_compute(out.stdout), wall))


if __name__ == "__main__":
    main()
