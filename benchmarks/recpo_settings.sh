#!/usr/bin/env bash
# RecPO's rollout temperature, reasoning length and learning rate, each run 100 steps from
# models/trained/contrastive with validation (all valid users) every 25 steps: the runs
# behind docs/learning.md's RecPO settings table. Needs `dvc repro train@contrastive`
# first; about 5 min a run on 2 cores. Prints each run's name and its evaluation lines.
#
#   bash benchmarks/recpo_settings.sh                # every run
#   bash benchmarks/recpo_settings.sh t1.0_lr1e-4    # the runs whose name contains this
#   bash benchmarks/recpo_settings.sh '' --backbone smollm2-135m --build-into /tmp/bench_sm
#
# Arguments after the filter go to learning_curves.py (e.g. --backbone, see
# benchmarks/bench_project.py); STEPS and EVERY (default 100 and 25) shorten the runs.
set -euo pipefail
py=${PYTHON:-python}
only=${1:-}
shift || true
steps=${STEPS:-100}
every=${EVERY:-25}
# every run states all three settings, whatever params.yaml holds
runs=(
    't1.5_lr3e-4_tok24 {"train.rollout.temperature": 1.5, "train.recpo.lr": 0.0003, "train.rollout.max_new_tokens": 24, "evaluate.max_new_tokens": 24}'
    't1.5_lr3e-4_tok8 {"train.rollout.temperature": 1.5, "train.recpo.lr": 0.0003, "train.rollout.max_new_tokens": 8, "evaluate.max_new_tokens": 8}'
    't1.0_lr3e-4_tok24 {"train.rollout.temperature": 1.0, "train.recpo.lr": 0.0003, "train.rollout.max_new_tokens": 24, "evaluate.max_new_tokens": 24}'
    't1.0_lr3e-4_tok8 {"train.rollout.temperature": 1.0, "train.recpo.lr": 0.0003, "train.rollout.max_new_tokens": 8, "evaluate.max_new_tokens": 8}'
    't1.5_lr1e-4_tok24 {"train.rollout.temperature": 1.5, "train.recpo.lr": 0.0001, "train.rollout.max_new_tokens": 24, "evaluate.max_new_tokens": 24}'
    't1.0_lr1e-4_tok24 {"train.rollout.temperature": 1.0, "train.recpo.lr": 0.0001, "train.rollout.max_new_tokens": 24, "evaluate.max_new_tokens": 24}'
)
for run in "${runs[@]}"; do
    name=${run%% *}
    overrides=${run#* }
    [[ -n "$only" && "$name" != *"$only"* ]] && continue
    echo "=== $name"
    "$py" "$(dirname "$0")/learning_curves.py" recpo "{\"steps\": $steps, \"every\": $every, ${overrides#\{}" "$@" 2>&1 \
        | tr '\r' '\n' | grep --line-buffered '"step"'
done
