#!/usr/bin/env bash
# Does `pip install -e ".[gpu]"` resolve, and how fast, as a new user would meet it?
#
# Makes a fresh venv and an empty pip cache under a temporary folder, then times
#   pip install --dry-run --ignore-installed --report R -e ".[gpu]" -c constraints/gpu.txt
# and prints the resolved versions of the packages the GPU path depends on. Nothing is
# installed; the dry run downloads the wheels whose metadata the index does not serve
# on its own (vLLM's, ~300 MB), and the folder is deleted at the end.
#
#   scripts/gpu_resolve_check.sh                 # pip as a fresh venv ships it, cold cache
#   scripts/gpu_resolve_check.sh --upgrade-pip   # latest pip first (not timed)
#   scripts/gpu_resolve_check.sh --no-constraints   # the extra's own pins alone
#   scripts/gpu_resolve_check.sh --keep-pip-config  # honour this machine's pip.conf / PIP_*
#   scripts/gpu_resolve_check.sh --project DIR   # another checkout (e.g. with a changed pin)
#
# By default the machine's pip configuration (pip.conf, PIP_FIND_LINKS, PIP_CONSTRAINT,
# ...) is ignored, so local wheels or caps cannot hide what a user on PyPI gets.
# Exit status: pip's (non-zero when it does not resolve or runs past LIMIT_S, default 900 s).
set -euo pipefail
cd "$(dirname "$0")/.."

upgrade_pip=0; constraints=1; keep_config=0; project=.
while [ $# -gt 0 ]; do
  a=$1; shift
  case "$a" in
    --project) project=$1; shift ;;
    --upgrade-pip) upgrade_pip=1 ;;
    --no-constraints) constraints=0 ;;
    --keep-pip-config) keep_config=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown option: $a" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
work=$(mktemp -d "${TMPDIR:-/tmp}/rrec-gpu-resolve.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [ "$keep_config" -eq 0 ]; then
  for v in $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/\1/p'); do unset "$v"; done
  export PIP_CONFIG_FILE=/dev/null
fi
export PIP_CACHE_DIR="$work/cache" PIP_DISABLE_PIP_VERSION_CHECK=1

"$PY" -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
[ "$upgrade_pip" -eq 1 ] && $pip install --quiet --upgrade pip
echo "python: $("$work/venv/bin/python" -V 2>&1); $($pip --version | cut -d' ' -f1-2)"

args=(install --dry-run --ignore-installed --quiet --report "$work/report.json" -e ".[gpu]")
[ "$constraints" -eq 1 ] && args+=(-c "$PWD/constraints/gpu.txt")
echo "command: pip ${args[*]}"

cd "$project"
start=$(date +%s.%N)
set +e
timeout "${LIMIT_S:-900}" $pip "${args[@]}"
rc=$?
set -e
elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
if [ "$rc" -ne 0 ]; then
  echo "did not resolve (exit $rc) after ${elapsed} s" >&2
  exit "$rc"
fi

"$work/venv/bin/python" - "$work/report.json" "$elapsed" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}
print(f"resolved {len(got)} packages in {sys.argv[2]} s")
for name in ("torch", "vllm", "deepspeed", "bitsandbytes", "transformers", "tokenizers", "peft",
             "accelerate", "triton", "flashinfer-python", "torchvision", "torchaudio",
             "numpy", "pydantic", "fastapi", "protobuf", "mlflow", "prefect", "dvc"):
    print(f"  {name:18} {got.get(name, '-')}")
PYEOF
