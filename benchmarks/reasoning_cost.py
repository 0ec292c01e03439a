"""What reading `<answer>` after greedy reasoning does to a trained model: NDCG@10 of the
model on the whole valid and test splits with the user state read right after the prompt
(no reasoning, as the contrastive model is trained and evaluated) and after N tokens of
greedy reasoning (as RecPO starts from it and is evaluated), plus the paired difference,
and how many distinct reasonings the users get (a reasoning that is the same text for
every user carries nothing about the user).

    python benchmarks/reasoning_cost.py                      # models/trained/contrastive
    ROOT=/path/to/project python benchmarks/reasoning_cost.py contrastive 8
    python benchmarks/reasoning_cost.py contrastive 8 --backbone smollm2-135m --build-into /tmp/bench_sm
    python benchmarks/reasoning_cost.py backbone 32 --splits test --arms none   # zero-shot row

`--backbone` (`benchmarks/bench_project.py`): the project at `ROOT` (default: the
current folder) when its params name that backbone, else a project built with it by the
stage functions in `--build-into` or a temporary folder, where the method is trained for
two steps first. A `ROOT` set in the environment with another backbone is refused.

A diagnosis, not a pipeline stage: nothing is written to the project.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import bench_project  # this folder's helper: --backbone, the project
import torch

from rrec.config import load_params
from rrec.metrics import paired_difference
from rrec.model.item_table import ItemTable
from rrec.model.loading import load_trained_policy, policy_from_adapter
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.ranking import evaluate_policy


def measure(root: Path, method: str, tokens: int, splits: tuple[str, ...] = ("valid", "test"),
            arms: tuple[str, ...] = ("none", "reasoning")) -> None:
    params = load_params(root / "params.yaml")
    torch.set_num_threads(params.threads)
    paths = Paths(root)
    if method == "backbone":  # zero-shot: the untrained backbone and the items stage's table
        rec = policy_from_adapter(params, paths.backbone, None)
        table = ItemTable.load(paths.item_table)
    else:
        rec, table = load_trained_policy(params, paths.backbone, paths.trained(method))
    for split in splits:
        users = load_user_prompts(paths, split)
        ranks, reasonings = {}, []
        for reasoning in [arm == "reasoning" for arm in arms]:
            metrics, details = evaluate_policy(
                rec, table, users, reasoning=reasoning, ks=(10,), max_new_tokens=tokens,
                batch_size=params.evaluate.batch_size, progress=False,
            )  # fmt: skip
            ranks[reasoning] = dict(zip(users.example_ids, details["ranks"].tolist(), strict=True))
            if reasoning:
                reasonings = details["reasoning_ids"]
            print(f"{split} n={len(users)} {'after reasoning' if reasoning else 'no reasoning'}: "
                  f"ndcg@10 {metrics['ndcg@10']:.4f}, reasoning length {metrics['reasoning_len']:.1f}")
        if reasonings:
            texts = Counter(rec.tokenizer.decode(ids) for ids in reasonings)
            ((common, count),) = texts.most_common(1)
            print(f"{split}: {len(texts)} distinct reasonings; the most common, {common!r}, "
                  f"for {count} of {len(users)}")
        if len(ranks) == 2:
            diff, (low, high), _, _ = paired_difference([ranks[False]], [ranks[True]])
            print(f"{split}: reasoning minus none {diff:+.4f} (95 % interval {low:+.4f} … {high:+.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", nargs="?", default="contrastive",
                    help="a trained method, or backbone: the untrained backbone (zero-shot)")
    ap.add_argument("tokens", nargs="?", type=int, default=8, help="greedy reasoning tokens")
    ap.add_argument("--splits", nargs="+", choices=("valid", "test"), default=["valid", "test"])
    ap.add_argument("--arms", nargs="+", choices=("none", "reasoning"), default=["none", "reasoning"],
                    help="read the state with no reasoning, after the reasoning, or both (paired)")
    bench_project.add_arguments(ap)
    args = ap.parse_args()
    with bench_project.Workspace(args.build_into, "reasoning_cost_") as ws:
        root = bench_project.env_project(ws, args.backbone, [] if args.method == "backbone" else [args.method])
        measure(root, args.method, args.tokens, tuple(args.splits), tuple(dict.fromkeys(args.arms)))


if __name__ == "__main__":
    main()
