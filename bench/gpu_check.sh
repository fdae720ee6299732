#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU: build the package (with the CUDA extension), run the tests on
# the GPU, then benchmark every op against its reference and the installed peers.
# Usage: bash bench/gpu_check.sh OUTDIR      (about 5-8 minutes on an H200; writes logs, JSON and markdown)
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build"
start=$(date +%s)
if ! MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "build failed (see $OUT/build.log)"; tail -n 30 "$OUT/build.log"; status=1
fi
echo "build: $(( $(date +%s) - start )) s"

echo "== tests on the GPU"
start=$(date +%s)
timeout 240 $PY -m pytest -q -x -m "not slow" -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
rc=$?; [ $rc -eq 5 ] && rc=0
tail -n 15 "$OUT/tests.log"; [ $rc -ne 0 ] && status=1
echo "tests: exit $rc after $(( $(date +%s) - start )) s"

echo "== benchmarks"
start=$(date +%s)
timeout 300 $PY bench/gpu_check.py --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -n 80 "$OUT/bench.log"
echo "benchmarks: $(( $(date +%s) - start )) s"
exit $status
