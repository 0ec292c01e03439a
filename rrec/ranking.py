"""Full ranking of a policy's user states against the item table: the metrics of a
policy on a split (used by training's validation and by the evaluate stage) and the
reasoning samples a human reads.

The user state comes either from the prompt directly (`reasoning=False`: the
contrastive "w/o reasoning" model reads `h_u` at `<answer>` appended to the prompt),
or from greedy reasoning (`reasoning=True`: the policy writes its reasoning, then
`<answer>`, and `h_u` is read in the same pass, see `rrec.model.generation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rrec.metrics import mask_history, pad_histories, ranking_report, scorer_ranks, target_ranks
from rrec.model.backbone import read_titles
from rrec.model.generation import policy_user_states
from rrec.model.item_table import ItemTable
from rrec.model.two_headed import RecModel
from rrec.paths import Paths
from rrec.prompts import UserPrompts


def evaluate_policy(
    rec: RecModel,
    table: ItemTable,
    users: UserPrompts,
    *,
    reasoning: bool,
    ks: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
    share_head: bool = True,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of the policy on `users`, and the details: user states, reasoning ids and
    lengths, and the target's rank in each example (`ranks`, in `users` order).
    `share_head`: as in `policy_user_states`."""
    states, reasoning_ids = policy_user_states(
        rec, users.conversations, reasoning=reasoning, max_new_tokens=max_new_tokens,
        batch_size=batch_size, progress=progress, share_head=share_head,
    )
    def score_fn(idx: list[int]) -> torch.Tensor:
        return table.score(states[idx], rec.tau)

    ranks = scorer_ranks(score_fn, users.histories, users.targets, batch_size=256, progress=False)
    metrics = ranking_report(ranks, ks)
    lengths = [len(r) - int(bool(r) and r[-1] == rec.answer_token_id) for r in reasoning_ids]
    metrics["reasoning_len"] = float(sum(lengths) / max(len(lengths), 1))
    return metrics, {"states": states, "reasoning_ids": reasoning_ids, "lengths": lengths, "ranks": ranks}


def reasoning_samples(
    rec: RecModel,
    table: ItemTable,
    users: UserPrompts,
    details: dict[str, Any],
    titles: Sequence[str],
    n: int = 8,
    top: int = 10,
) -> list[dict[str, Any]]:
    """Rows for a human: history, reasoning, top-10 with titles, target and its rank."""
    n = min(n, len(users))
    states = details["states"][:n]
    scores = mask_history(table.score(states, rec.tau), pad_histories(users.histories[:n]))
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
