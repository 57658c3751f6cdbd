#!/usr/bin/env bash
# Every GPU row of docs/performance.md in one run, on one H100/H200 with no network (under 8 minutes):
#
#   bash benchmarks/gpu_wheels.sh            # beforehand, on a machine with PyPI: wheels into benchmarks/.wheels
#   bash benchmarks/gpu.sh [--out DIR]       # on the GPU machine (carry benchmarks/.wheels there)
#   bash benchmarks/gpu.sh --dry-run         # the same rows on the tiny preset, CPU (CI-sized)
#
# Installs the wheels of what the GPU image lacks (diffusers, sqlite-utils, platformdirs, openai and their
# missing dependencies) when they are not importable, runs the checkout itself (PYTHONPATH, no install), and
# writes DIR/gpu.json and DIR/gpu.md (default DIR: $OUT when set, else benchmarks/gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/gpu-results}
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if ! "$PYTHON" -c "import diffusers, sqlite_utils, platformdirs, openai" 2>/dev/null; then
  if compgen -G "benchmarks/.wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps benchmarks/.wheels/*.whl
  else
    echo "error: diffusers/sqlite-utils/platformdirs/openai missing and no wheels in benchmarks/.wheels" \
         "(run benchmarks/gpu_wheels.sh where PyPI is reachable)" >&2
    exit 1
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu.py --out "$OUT_DIR" "${ARGS[@]}"
