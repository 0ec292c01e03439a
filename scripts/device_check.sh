#!/usr/bin/env bash
# The prepared device check (docs/gpu.md): the embedded default's backbone, item
# encoding and a few contrastive and RecPO steps on one CUDA GPU in bf16, the item states
# compared with the CPU states of the same weights, the RecPO steps again under
# `accelerate launch` + DeepSpeed ZeRO-2 and with the vLLM engine when those import;
# one table at the end.
#
#   scripts/device_check.sh prepare [DIR]          # where the project is installed; CPU is enough
#   scripts/device_check.sh run [DIR] [OPTIONS]    # on the GPU machine; no network needed
#
# prepare: builds the embedded default into DIR (default .device_check; ~4.5 MiB, a few
#   minutes on 2 cores) with the stage functions, on the CPU in float32, and downloads
#   into DIR/wheels the wheels of pydantic (the one package rrec imports that a machine
#   with only torch, transformers, peft and accelerate lacks) for DEVICE_PYTHON (3.12).
#   WHEELS=0 skips that download.
# run: installs DIR/wheels into a temporary folder when pydantic does not import, then
#   `python scripts/device_check.py run DIR OPTIONS` (--steps N, --json FILE,
#   --require-all, --dtype ...), stopped after LIMIT_S seconds (default 470, under 8 min).
#   The table is also written to $OUT/device_check.md when OUT is set.
# Exit status: device_check.py's (1: a part failed; 2: --require-all and a part skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
[ $# -gt 0 ] && shift
dir=.device_check
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then dir=$1; shift; fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

case "$cmd" in
  prepare)
    "$PY" scripts/device_check.py prepare "$dir" "$@"
    if [ "${WHEELS:-1}" = 1 ]; then
      pins=$("$PY" -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')
      plats=()
      for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64; do plats+=(--platform "$p"); done
      # shellcheck disable=SC2086
      "$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "${DEVICE_PYTHON:-3.12}" "${plats[@]}" -d "$dir/wheels" $pins \
        && echo "wheels for python ${DEVICE_PYTHON:-3.12}: $(ls "$dir/wheels" | tr '\n' ' ')" \
        || echo "could not download the pydantic wheels; a machine without pydantic cannot run the check" >&2
    fi
    ;;
  run)
    if ! "$PY" -c "import pydantic" 2>/dev/null; then
      if ! ls "$dir"/wheels/*.whl >/dev/null 2>&1; then
        echo "pydantic does not import and $dir/wheels holds no wheels: run prepare where pip works" >&2
        exit 3
      fi
      site=$(mktemp -d "${TMPDIR:-/tmp}/rrec-device-site.XXXXXX")
      "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$dir"/wheels/*.whl
      export PYTHONPATH="$PYTHONPATH:$site"
    fi
    log=$(mktemp "${TMPDIR:-/tmp}/rrec-device-check.XXXXXX.log")
    set +e
    timeout "${LIMIT_S:-470}" "$PY" scripts/device_check.py run "$dir" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 124 ] && echo "device check: stopped after ${LIMIT_S:-470} s" >&2
    if [ -n "${OUT:-}" ]; then
      sed -n '/^device /,$p' "$log" >"$OUT/device_check.md"
      cp "$log" "$OUT/device_check.log"
    fi
    exit "$rc"
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
