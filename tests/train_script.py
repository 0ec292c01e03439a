"""Run the train stage of a project dir in this process (used by tests as a subprocess,
alone or under `accelerate launch`). With --hang-after N the process writes a marker
file and sleeps forever right after step N, so that a test can SIGKILL it mid-run."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rrec.config import load_params
from rrec.paths import Paths
from rrec.train.run import run_train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("method")
    ap.add_argument("--hang-after", type=int, default=None)
    args = ap.parse_args()
    root = Path(args.root)

    def hang(step: int) -> bool:
        if args.hang_after is not None and step == args.hang_after:
            (root / "hanging").write_text(str(step))
            time.sleep(3600)
        return False

    summary = run_train(load_params(root / "params.yaml"), Paths(root), args.method, should_stop=hang)
    if summary:
        (root / f"summary_{args.method}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
