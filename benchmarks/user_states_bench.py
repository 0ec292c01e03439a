"""Evaluation's user states: the head every user prompt shares encoded once against every
prompt encoded from its first token.

Both sides are `rrec.ranking.evaluate_policy` on the same trained model, split, batches
and greedy reasoning; they differ only in `share_head` (`rrec.model.generation.policy_user_states`):
- shared head (what the pipeline does): the prompts' common head (chat template,
  instruction, the history's header) runs through the decoder once and each batch runs
  what follows it on a copy of that KV cache, before reading `<answer>` or, with
  reasoning, before decoding;
- whole prompts (the peer): each batch encodes its prompts from the first token, as a
  batched `transformers` forward or `generate` does.

For each way of reading the state (`--arms`: none, right after the prompt; reasoning,
after `TOKENS` greedy tokens) it prints both times, their ratio, both NDCG@10, how many
users got the same reasoning and the largest 1 - cos between the two states.

    ROOT=/path/to/project python benchmarks/user_states_bench.py contrastive
    ROOT=/path/to/project python benchmarks/user_states_bench.py recpo 32 --arms reasoning
    python benchmarks/user_states_bench.py recpo 8 --backbone smollm2-135m --build-into /tmp/bench_sm

`--backbone` (`benchmarks/bench_project.py`): the project at `ROOT` (default: the
current folder) when its params name that backbone, else a project built with it by the
stage functions in `--build-into` or a temporary folder, where the method is trained for
two steps first. A `ROOT` set in the environment with another backbone is refused.
Nothing is written to the project.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench_project  # this folder's helper: --backbone, the project
import torch

from rrec.config import load_params
from rrec.model.loading import load_trained_policy
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.ranking import evaluate_policy


def measure(root: Path, method: str, tokens: int, split: str, arms: tuple[str, ...], max_users: int | None) -> None:
    params = load_params(root / "params.yaml")
    torch.set_num_threads(params.threads)
    paths = Paths(root)
    rec, table = load_trained_policy(params, paths.backbone, paths.trained(method))
    users = load_user_prompts(paths, split)
    if max_users is not None:
        users = users.take(range(min(max_users, len(users))))
    prompts = rec.user_prompt_ids(users.conversations)
    print(f"{method} on {split}: n={len(users)} examples, {sum(map(len, prompts)) / len(prompts):.0f} prompt "
          f"tokens on average, threads {params.threads}, batch {params.evaluate.batch_size}")
    print(f"{'state read':<26} | {'shared head s':>13} | {'whole prompts s':>15} | {'ratio':>6} | "
          f"{'ndcg@10 shared':>14} | {'ndcg@10 whole':>13} | same reasoning | max 1-cos")
    for arm in arms:
        reasoning = arm == "reasoning"
        seconds, results = {}, {}
        for share_head in (False, True):  # warm-up: the first passes of a process allocate
            evaluate_policy(
                rec, table, users.take(range(min(2, len(users)))), reasoning=reasoning, ks=(10,),
                max_new_tokens=tokens, batch_size=2, progress=False, share_head=share_head,
            )  # fmt: skip
        for share_head in (False, True):
            start = time.perf_counter()
            results[share_head] = evaluate_policy(
                rec, table, users, reasoning=reasoning, ks=(10,), max_new_tokens=tokens,
                batch_size=params.evaluate.batch_size, progress=False, share_head=share_head,
            )  # fmt: skip
            seconds[share_head] = time.perf_counter() - start
        (shared, shared_details), (whole, whole_details) = results[True], results[False]
        same = sum(a == b for a, b in zip(shared_details["reasoning_ids"], whole_details["reasoning_ids"], strict=True))
        cos = torch.nn.functional.cosine_similarity(shared_details["states"], whole_details["states"], dim=1)
        label = f"after {tokens} reasoning tokens" if reasoning else "right after the prompt"
        print(f"{label:<26} | {seconds[True]:>13.1f} | {seconds[False]:>15.1f} | "
              f"{seconds[False] / seconds[True]:>5.2f}x | {shared['ndcg@10']:>14.4f} | {whole['ndcg@10']:>13.4f} | "
              f"{same:>5} of {len(users):<5} | {float((1 - cos).max()):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", nargs="?", default="contrastive", help="a trained method")
    ap.add_argument("tokens", nargs="?", type=int, default=8, help="greedy reasoning tokens")
    ap.add_argument("--split", choices=("valid", "test"), default="valid")
    ap.add_argument("--arms", nargs="+", choices=("none", "reasoning"), default=["none", "reasoning"])
    ap.add_argument("--max-users", type=int, default=None, help="the split's first N examples (default: all)")
    bench_project.add_arguments(ap)
    args = ap.parse_args()
    with bench_project.Workspace(args.build_into, "user_states_bench_") as ws:
        root = bench_project.env_project(ws, args.backbone, [args.method])
        measure(root, args.method, args.tokens, args.split, tuple(dict.fromkeys(args.arms)), args.max_users)


if __name__ == "__main__":
    main()
