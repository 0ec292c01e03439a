"""What reading `<answer>` after greedy reasoning does to a trained model: NDCG@10 of the
model on the whole valid and test splits with the user state read right after the prompt
(no reasoning, as the contrastive model is trained and evaluated) and after N tokens of
greedy reasoning (as RecPO starts from it and is evaluated), plus the paired difference,
and how many distinct reasonings the users get (a reasoning that is the same text for
every user carries nothing about the user).

    python benchmarks/reasoning_cost.py                      # models/trained/contrastive
    ROOT=/path/to/project python benchmarks/reasoning_cost.py contrastive 8

A diagnosis, not a pipeline stage: nothing is written to the project.
"""

import os
import sys
from collections import Counter
from pathlib import Path

import torch

from rrec.config import load_params
from rrec.metrics import paired_difference
from rrec.model.loading import load_trained_policy
from rrec.paths import Paths
from rrec.prompts import load_user_prompts
from rrec.ranking import evaluate_policy

method = sys.argv[1] if len(sys.argv) > 1 else "contrastive"
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 8
root = Path(os.environ.get("ROOT", "."))
params = load_params(root / "params.yaml")
torch.set_num_threads(params.threads)
paths = Paths(root)
rec, table = load_trained_policy(params, paths.backbone, paths.trained(method))
for split in ("valid", "test"):
    users = load_user_prompts(paths, split)
    ranks = {}
    for reasoning in (False, True):
        metrics, details = evaluate_policy(
            rec, table, users, reasoning=reasoning, ks=(10,), max_new_tokens=tokens,
            batch_size=params.evaluate.batch_size, progress=False,
        )  # fmt: skip
        ranks[reasoning] = dict(zip(users.example_ids, details["ranks"].tolist(), strict=True))
        print(f"{split} n={len(users)} {'after reasoning' if reasoning else 'no reasoning'}: "
              f"ndcg@10 {metrics['ndcg@10']:.4f}, reasoning length {metrics['reasoning_len']:.1f}")
    texts = Counter(rec.tokenizer.decode(ids) for ids in details["reasoning_ids"])
    (common, count), = texts.most_common(1)
    print(f"{split}: {len(texts)} distinct reasonings; the most common, {common!r}, for {count} of {len(users)}")
    diff, (low, high), _, _ = paired_difference([ranks[False]], [ranks[True]])
    print(f"{split}: reasoning minus none {diff:+.4f} (95 % interval {low:+.4f} … {high:+.4f})")
