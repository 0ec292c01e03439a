"""The `evaluate` stage's measurements: the trained policy on the valid and test splits
(full ranking, `rrec.ranking`), with reasoning samples from test. It measures and
returns; writing reports, MLflow and the registry are the stage's (`rrec.stages.evaluate`).
"""

from __future__ import annotations

import json
from typing import Any

from rrec.config import Params
from rrec.model.loading import TRAIN_SUMMARY, load_trained_policy
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.ranking import evaluate_policy, item_titles, reasoning_samples


def evaluate_trained(
    params: Params, paths: Paths, method: str
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]], dict[str, Any], dict[str, dict[int, int]]]:
    """The trained `method` on valid and test: ({split: metrics}, test reasoning samples,
    the training summary, {split: {example_id: the target's rank}})."""
    summary_path = paths.trained(method) / TRAIN_SUMMARY
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path}: no trained model; run the train stage first (`dvc repro train`)")
    summary = json.loads(summary_path.read_text())
    rec, table = load_trained_policy(params, paths.backbone, paths.trained(method))
    reasoning = summary["method"] == "recpo"
    results: dict[str, dict[str, float]] = {}
    samples: list[dict[str, Any]] = []
    ranks: dict[str, dict[int, int]] = {}
    titles = item_titles(paths)
    for split in ("valid", "test"):
        users = load_user_prompts(paths, split).sample_users(params.evaluate.max_users, params.seed)
        metrics, details = evaluate_policy(
            rec, table, users, reasoning=reasoning, ks=params.evaluate.ks,
            max_new_tokens=params.evaluate.max_new_tokens, batch_size=params.evaluate.batch_size,
        )
        results[split] = metrics
        ranks[split] = dict(zip(users.example_ids, details["ranks"].tolist(), strict=True))
        if split == "test":
            samples = reasoning_samples(rec, table, users, details, titles)
    return results, samples, summary, ranks
