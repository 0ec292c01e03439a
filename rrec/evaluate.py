"""Full-ranking evaluation of the R²ec policy, and the `evaluate` stage.

The user state comes either from the prompt directly (`reasoning=False`: the
contrastive "w/o reasoning" model reads `h_u` at `<answer>` appended to the prompt),
or from greedy reasoning (`reasoning=True`: the policy writes its reasoning, then
`<answer>`, and `h_u` is read in the same pass, see `rrec.train.rollout`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from rrec.config import Params
from rrec.metrics import evaluate_scorer, mask_history, pad_histories, target_ranks
from rrec.model.backbone import read_titles
from rrec.model.wrapper import RecModel, score
from rrec.paths import Paths
from rrec.train.rollout import HFEngine


@dataclass
class UserPrompts:
    """One split's user prompts, in example order."""

    example_ids: list[int]
    user_ids: list[str]
    conversations: list[list[dict[str, str]]]
    histories: list[list[int]]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, idx: Sequence[int]) -> UserPrompts:
        return UserPrompts(*[[col[i] for i in idx] for col in (
            self.example_ids, self.user_ids, self.conversations, self.histories, self.targets)])

    def sample_users(self, n: int | None, seed: int) -> UserPrompts:
        """Every example of `n` users drawn uniformly at random (seeded), in example
        order; all of them when `n` is None or covers every user. The same seed gives
        every method the same users, and no user is over-represented by time order."""
        users = sorted(set(self.user_ids))
        if n is None or n >= len(users):
            return self
        chosen = {users[i] for i in np.random.default_rng(seed).choice(len(users), size=n, replace=False)}
        return self.take([i for i, u in enumerate(self.user_ids) if u in chosen])


def load_user_prompts(paths: Paths, split: str) -> UserPrompts:
    path = paths.user_prompts_file(split)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the prompts stage first (`dvc repro prompts`)")
    t = pq.read_table(path).to_pydict()
    return UserPrompts(
        example_ids=[int(x) for x in t["example_id"]],
        user_ids=list(t["user_id"]),
        conversations=t["messages"],
        histories=[list(h) for h in t["history_item_ids"]],
        targets=[int(x) for x in t["target_item_id"]],
    )


def policy_user_states(
    rec: RecModel,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    reasoning: bool,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
) -> tuple[torch.Tensor, list[list[int]]]:
    """User states [N, d] (float32, cpu) and the reasoning token ids of each user.

    Batches are formed over prompts sorted by length, so padding stays small."""
    prompts = rec.user_prompt_ids(conversations, answer=not reasoning)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    states = torch.empty(len(prompts), rec.hidden_size)
    texts: list[list[int]] = [[] for _ in prompts]
    engine = HFEngine(temperature=1.0, top_k=0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    was_training = rec.training
    rec.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(order), batch_size), desc="user states", disable=not progress, leave=False):
                idx = order[start : start + batch_size]
                batch = [prompts[i] for i in idx]
                if reasoning:
                    roll = engine.generate(rec, batch, group_size=1, greedy=True)
                    out = roll.user_states
                    for j, i in enumerate(idx):
                        texts[i] = roll.reasoning_ids[j]
                else:
                    out = rec.encode(batch).float().cpu()
                states[idx] = out
    finally:
        rec.train(was_training)
    return states, texts


def evaluate_policy(
    rec: RecModel,
    table: torch.Tensor,
    users: UserPrompts,
    *,
    reasoning: bool,
    ks: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of the policy on `users`, and the details (ranks, reasoning, states)."""
    states, reasoning_ids = policy_user_states(
        rec, users.conversations, reasoning=reasoning, max_new_tokens=max_new_tokens,
        batch_size=batch_size, progress=progress,
    )
    table = table.float()

    def score_fn(idx: list[int]) -> torch.Tensor:
        return score(states[idx], table, rec.tau)

    metrics = evaluate_scorer(score_fn, users.histories, users.targets, ks, batch_size=256, progress=False)
    lengths = [len(r) - int(bool(r) and r[-1] == rec.answer_token_id) for r in reasoning_ids]
    metrics["reasoning_len"] = float(sum(lengths) / max(len(lengths), 1))
    return metrics, {"states": states, "reasoning_ids": reasoning_ids, "lengths": lengths}


def reasoning_samples(
    rec: RecModel,
    table: torch.Tensor,
    users: UserPrompts,
    details: dict[str, Any],
    titles: Sequence[str],
    n: int = 8,
    top: int = 10,
) -> list[dict[str, Any]]:
    """Rows for a human: history, reasoning, top-10 with titles, target and its rank."""
    n = min(n, len(users))
    states = details["states"][:n]
    scores = mask_history(score(states, table.float(), rec.tau), pad_histories(users.histories[:n]))
    ranks = target_ranks(scores, torch.tensor(users.targets[:n]))
    best = scores.topk(min(top, scores.shape[1]), dim=1).indices
    out = []
    for i in range(n):
        out.append({
            "example_id": users.example_ids[i],
            "history": " | ".join(titles[j] for j in users.histories[i]),
            "reasoning": rec.tokenizer.decode(details["reasoning_ids"][i], skip_special_tokens=False),
            "top10": " | ".join(titles[j] for j in best[i].tolist()),
            "target": titles[users.targets[i]],
            "target_rank": int(ranks[i]),
        })
    return out


def item_titles(paths: Paths) -> list[str]:
    return read_titles(paths.items_file)


# --------------------------------------------------------------------- stage


def _write_reports(out: Path, report: dict[str, Any], ks: Sequence[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "metrics.json")
    tmp_csv = out / ".metrics_by_k.csv.tmp"
    with open(tmp_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "split", "k", "hit", "ndcg"])
        for method, by_split in report["methods"].items():
            for split, m in by_split.items():
                for k in ks:
                    w.writerow([method, split, k, m[f"hit@{k}"], m[f"ndcg@{k}"]])
    tmp_csv.replace(out / "metrics_by_k.csv")


def run_evaluate(params: Params, paths: Paths, method: str, *, register: bool = True) -> dict[str, Any]:
    """The `evaluate` stage: the trained policy on valid and test, beside popularity and
    random; metrics JSON + per-K CSV for DVC, and the policy's metrics in its MLflow
    training run (the reference rows get MLflow runs of their own in the baselines stage)."""
    from rrec import tracking
    from rrec.baselines.reference import run_references
    from rrec.train.policy import TRAIN_SUMMARY, load_trained_policy

    tracking.require_reachable(paths.root)  # before any work: results are logged at the end
    summary_path = paths.trained(method) / TRAIN_SUMMARY
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path}: no trained model; run the train stage first (`dvc repro train`)")
    summary = json.loads(summary_path.read_text())
    rec, table = load_trained_policy(params, paths, method)
    reasoning = summary["method"] == "recpo"
    ks = params.evaluate.ks
    results: dict[str, dict[str, dict[str, float]]] = {summary["method"]: {}}
    samples: list[dict[str, Any]] = []
    titles = item_titles(paths)
    for split in ("valid", "test"):
        users = load_user_prompts(paths, split).sample_users(params.evaluate.max_users, params.seed)
        metrics, details = evaluate_policy(
            rec, table, users, reasoning=reasoning, ks=ks, max_new_tokens=params.evaluate.max_new_tokens,
            batch_size=params.evaluate.batch_size,
        )
        results[summary["method"]][split] = metrics
        if split == "test":
            samples = reasoning_samples(rec, table, users, details, titles)
    for name, by_split in run_references(params, paths).items():
        results[name] = by_split
    report = {"category": params.data.category, "policy": summary["method"], "methods": results}
    out = paths.eval_report(method)
    _write_reports(out, report, ks)

    # MLflow: the policy's metrics go into its training run; the reference rows get runs of their own
    run_id = summary.get("mlflow_run_id")
    if run_id:
        import mlflow

        tracking.configure(paths.root)
        with mlflow.start_run(run_id=run_id):
            for split, m in results[summary["method"]].items():
                tracking.log_metrics(m, prefix=f"{split}_")
            mlflow.log_table({k: [s[k] for s in samples] for k in samples[0]} if samples else {}, "test_reasoning_samples.json")
            mlflow.log_artifact(str(out / "metrics.json"))
        if register:
            report["registered"] = _register(params, paths, method, run_id)
    return report


def _register(params: Params, paths: Paths, method: str, run_id: str) -> dict[str, Any]:
    """Register the run's model as a version of `rrec-<category>` (alias `challenger`) and
    make it `champion` only if its test NDCG@10 beats the current champion's."""
    from rrec import registry
    from rrec.serve.pyfunc import MODEL_NAME

    name = registry.model_name(params.data.category)
    version = registry.register_run_model(
        run_id, MODEL_NAME, params.data.category, paths.root,
        tags={"rrec.method": method, "rrec.window_end": str(params.data.window.end)},
    )
    promoted = registry.promote_if_better(name, version, root=paths.root)
    return {"model": name, "version": version, "champion": promoted or registry.champion_version(name, paths.root) == version}
