#!/usr/bin/env bash
# The whole pipeline on a real data set, MovieLens 100K, in one command (docs/real_data.md):
# convert it to the Amazon Reviews 2023 formats, serve the result on 127.0.0.1 and run
# every stage as a DVC experiment whose parameters point the download stage at that server.
#
#   scripts/real_data.sh ML100K_DIR [more dvc exp run arguments, e.g. -S train.max_steps=100]
#
# ML100K_DIR holds u.data and u.item (fetch ml-100k.zip from GroupLens yourself; its
# licence forbids redistributing it, so it is not in this repository). Environment:
# RREC_REAL_DATA_OUT (converted files, default $TMPDIR/rrec-ml100k-amazon),
# RREC_REAL_DATA_PORT (default 8765; it becomes part of data.base_url), PYTHON.
# Run it from the project root, in a checkout whose data/, models/ and reports/ you are
# ready to have replaced: params.yaml keeps the overrides afterwards, as with any
# `dvc exp run -S`.
set -euo pipefail

ml_dir=${1:?usage: scripts/real_data.sh ML100K_DIR [dvc exp run arguments...]}
shift
out=${RREC_REAL_DATA_OUT:-${TMPDIR:-/tmp}/rrec-ml100k-amazon}
port=${RREC_REAL_DATA_PORT:-8765}
py=${PYTHON:-python}
base_url="http://127.0.0.1:${port}"

"$py" scripts/real_data.py convert "$ml_dir" "$out" --category Movies

"$py" scripts/real_data.py serve "$out" --port "$port" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT

for _ in $(seq 100); do
    if "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
        "${base_url}/SHA256SUMS" 2>/dev/null; then
        break
    fi
    kill -0 "$server_pid" 2>/dev/null || { echo "the file server did not start" >&2; exit 1; }
    sleep 0.1
done

# The window: ML-100K runs from 1997-09-20 to 1998-04-22; two months back from
# 1998-04-30 (from 1998-02-28) hold 23,007 ratings of 1,474 of its 1,682 films by 339
# users, 22,668 examples. Training is shortened to fit a 2-core CPU.
start=$(date +%s)
dvc exp run \
    -S data.source=amazon2023 \
    -S data.category=Movies \
    -S "data.base_url=${base_url}" \
    -S "data.window.end='1998-04-30'" \
    -S data.window.months=2 \
    -S data.window.min_items=1000 \
    -S train.max_steps=300 \
    -S train.eval_max_users=300 \
    -S train.recpo.max_steps=85 \
    -S baselines.epochs=20 \
    -S train.logq_correction=true \
    "$@"
echo "dvc exp run took $(( $(date +%s) - start )) s"
cat reports/comparison.md
