"""Does the reasoning help? The test table of a project the pipeline has run in
(`dvc repro`, `scripts/smollm2.sh`), with the two rows that need the model again:

- every method the evaluate and baselines stages scored on test (their reports:
  `reports/eval/<method>/metrics.json`, `reports/eval/baselines.json`), with n;
- "zero-shot": the untrained backbone's states with the items stage's table, no
  reasoning (the same test users as the evaluate stage);
- RecPO read right after the prompt, without its reasoning, paired with the evaluate
  stage's ranks after the reasoning (`reports/eval/recpo/ranks.csv`): reasoning minus
  none on the same examples, with its 95 % bootstrap interval; and RecPO minus
  contrastive the same way.

    ROOT=/path/to/project python benchmarks/backbone_table.py

A diagnosis, not a pipeline stage: nothing is written to the project.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from rrec.config import load_params
from rrec.metrics import paired_difference
from rrec.model.item_table import ItemTable
from rrec.model.loading import TRAIN_SUMMARY, load_trained_policy, policy_from_adapter
from rrec.model.two_headed import RecModel
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.ranking import evaluate_policy
from rrec.stages.evaluate import RANKS_CSV, read_ranks


def reported_rows(paths: Paths) -> dict[str, dict[str, float]]:
    """{method: its test metrics} from the evaluate and baselines reports that exist."""
    rows: dict[str, dict[str, float]] = {}
    for method in ("contrastive", "recpo"):
        report = paths.eval_report(method) / "metrics.json"
        if report.exists():
            for name, splits in json.loads(report.read_text())["methods"].items():
                rows.setdefault(name, splits["test"])
    baselines = paths.root / "reports" / "eval" / "baselines.json"
    if baselines.exists():
        for name, result in json.loads(baselines.read_text()).items():
            rows.setdefault(name, result["test"])
    return rows


def row(name: str, reasoning: str, m: dict[str, float]) -> str:
    return f"| {name} | {reasoning} | {int(m['n'])} | {m['ndcg@10']:.4f} | {m['hit@10']:.4f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    root = Path(os.environ.get("ROOT", "."))
    params = load_params(root / "params.yaml")
    torch.set_num_threads(params.threads)
    paths = Paths(root)
    reported = reported_rows(paths)
    if "recpo" not in reported or not (paths.eval_report("recpo") / RANKS_CSV).exists():
        raise SystemExit(f"{root}: no evaluated RecPO model; run the pipeline there first (dvc repro)")
    users = load_user_prompts(paths, "test").sample_users(params.evaluate.max_users, params.seed)
    ev = params.evaluate

    def score(rec: RecModel, table: ItemTable) -> tuple[dict[str, float], dict[int, int]]:
        metrics, details = evaluate_policy(rec, table, users, reasoning=False, ks=(10,),
                                           max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
        return metrics, dict(zip(users.example_ids, details["ranks"].tolist(), strict=True))

    zero_shot, _ = score(policy_from_adapter(params, paths.backbone, None), ItemTable.load(paths.item_table))
    recpo_none, ranks_none = score(*load_trained_policy(params, paths.backbone, paths.trained("recpo")))
    ranks_reasoning = read_ranks(paths.eval_report("recpo") / RANKS_CSV)["test"]
    summary = json.loads((paths.trained("recpo") / TRAIN_SUMMARY).read_text())
    length = reported["recpo"].get("reasoning_len", float("nan"))

    print(f"backbone {params.model.backbone}, test split, greedy reasoning of at most "
          f"{ev.max_new_tokens} tokens (mean {length:.1f}); RecPO kept step {summary['best_step']}\n")
    print("| model | reasoning | n | NDCG@10 | Hit@10 |\n|---|---|---|---|---|")
    for name in sorted(reported, key=lambda n: reported[n]["ndcg@10"]):
        if name != "recpo":
            print(row(name, "none", reported[name]))
    print(row("zero-shot (untrained backbone)", "none", zero_shot))
    print(row("recpo", "none", recpo_none))
    print(row("recpo", "yes", reported["recpo"]))
    diff, (low, high), _, n = paired_difference([ranks_none], [ranks_reasoning])
    print(f"\nRecPO, reasoning minus none: {diff:+.4f} NDCG@10 (95 % interval {low:+.4f} … {high:+.4f}, n={n})")
    contrastive = paths.eval_report("contrastive") / RANKS_CSV
    if contrastive.exists():
        diff, (low, high), _, n = paired_difference([read_ranks(contrastive)["test"]], [ranks_reasoning])
        print(f"RecPO minus contrastive: {diff:+.4f} NDCG@10 (95 % interval {low:+.4f} … {high:+.4f}, n={n})")


if __name__ == "__main__":
    main()
