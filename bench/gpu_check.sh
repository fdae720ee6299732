#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU: build the package (with the CUDA extension), run the tests on
# the GPU (the backend="cuda" tests in a process of their own), benchmark every op against its reference and the
# installed peers (bench/run.py, modes fwd and fwd+bwd), then the AIMv2-L training step (bench/train_throughput.py,
# eager, every backend, batch 128) and a profile of it (op shares), with a train + probe smoke test between.
# Each stage after the build is capped (75 + 75 + 150 + 45 + 70 + 35 s) so that the whole stays near 8 minutes
# on an H200; what a capped stage measured before its cap is kept (bench/run.py saves after every config).
# Usage: bash bench/gpu_check.sh OUTDIR      (writes logs, JSON, markdown, PNG plots and a trace to OUTDIR)
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

echo "== build (with the CUDA extension, for this GPU's architecture only)"
start=$(date +%s)
ARCH=${AIMV2_CUDA_ARCHS:-$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m == 9 else ''))" 2>/dev/null || echo "80;90a")}
echo "AIMV2_CUDA_ARCHS=$ARCH"
if ! AIMV2_PTXAS_VERBOSE=1 AIMV2_CUDA_ARCHS="$ARCH" MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -v -e . \
    > "$OUT/build.log" 2>&1; then
  # A CUDA compile error must not cost the rest of the check: report it, rebuild without CUDA, go on
  # (test_cuda_kernels.py is then skipped: AIMV2_SKIP_CUDA_BUILD=1).
  echo "CUDA build FAILED (see $OUT/build.log):"; grep -E "error|Error" "$OUT/build.log" | head -n 40; status=1
  export AIMV2_SKIP_CUDA_BUILD=1
  $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build_cpu_only.log" 2>&1 || {
    echo "CPU-only build failed too"; tail -n 30 "$OUT/build_cpu_only.log"; }
fi
grep -E "ptxas info\s*: Used|spill" "$OUT/build.log" > "$OUT/ptxas.txt" 2>/dev/null || true
$PY -c "import aimv2_kernels._C as C; print('extension built, WITH_CUDA =', C.WITH_CUDA)" 2>&1
echo "build: $(( $(date +%s) - start )) s"

echo "== tests on the GPU"
start=$(date +%s)
timeout 75 $PY -m pytest -q -x -m "not slow" -p no:cacheprovider tests --ignore=tests/test_cuda_kernels.py \
  > "$OUT/tests.log" 2>&1
rc=$?; [ $rc -eq 5 ] && rc=0
tail -n 15 "$OUT/tests.log"; [ $rc -ne 0 ] && status=1
echo "tests: exit $rc after $(( $(date +%s) - start )) s"

# The CUDA kernels run in their own process, after the rest: a kernel fault (illegal address) poisons the CUDA
# context of the process it happens in. They are benchmarked only if they pass (AIMV2_BENCH_CUDA=0 otherwise).
echo "== CUDA-kernel tests (backend='cuda')"
start=$(date +%s)
timeout 75 $PY -m pytest -q -rf -p no:cacheprovider tests/test_cuda_kernels.py > "$OUT/tests_cuda.log" 2>&1
rc=$?
tail -n 40 "$OUT/tests_cuda.log"
if [ $rc -eq 0 ]; then export AIMV2_BENCH_CUDA=1; else export AIMV2_BENCH_CUDA=0; status=1; fi
echo "CUDA-kernel tests: exit $rc after $(( $(date +%s) - start )) s"

echo "== op benchmarks (bench/run.py)"
start=$(date +%s)
timeout 150 $PY bench/run.py --device cuda --modes fwd,fwd+bwd --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -n 120 "$OUT/bench.log" | grep -v "it/s\|case/s\|s/case"
echo "op benchmarks: $(( $(date +%s) - start )) s"

# aimv2-train (bf16 autocast, DCP checkpoint) and aimv2-probe end to end on the GPU, tiny preset: a smoke test of the
# issue-6 paths that the CPU cannot reach (CUDA autocast in the trainer, bf16 feature extraction in the probe).
echo "== train + probe smoke on the GPU (aimv2-tiny)"
start=$(date +%s)
SMOKE=$(mktemp -d)
timeout 45 bash -c "$PY -m aimv2.train --preset aimv2-tiny --device cuda --steps 6 --batch-size 8 --log-every 1 \
  --ckpt-every 3 --no-progress --out $SMOKE/run && $PY -m aimv2.train --preset aimv2-tiny --device cuda --steps 8 \
  --batch-size 8 --log-every 1 --ckpt-every 4 --no-progress --out $SMOKE/run --resume && $PY -m aimv2.probe \
  --checkpoint $SMOKE/run --device cuda --vs-random --train-size 200 --test-size 100 --epochs 3 --no-progress" \
  > "$OUT/train_smoke.log" 2>&1 || status=1
cp "$SMOKE/run/metrics.jsonl" "$OUT/train_smoke_metrics.jsonl" 2>/dev/null
rm -rf "$SMOKE"
tail -n 8 "$OUT/train_smoke.log"
echo "train + probe smoke: $(( $(date +%s) - start )) s"

echo "== AIMv2-L training step, batch 128, eager, every backend (bench/train_throughput.py)"
start=$(date +%s)
timeout 70 $PY bench/train_throughput.py --device cuda --preset aimv2-large-patch14-224 --batch-size 128 \
  --steps 8 --warmup 2 --modes eager --out "$OUT" > "$OUT/train.log" 2>&1 || status=1
tail -n 30 "$OUT/train.log"
echo "training throughput: $(( $(date +%s) - start )) s"

echo "== profile of the AIMv2-L step (op shares)"
start=$(date +%s)
timeout 35 $PY bench/train_throughput.py --device cuda --preset aimv2-large-patch14-224 --batch-size 128 \
  --profile --profile-out "$OUT/trace-aimv2-large-cuda.json.gz" --out "$OUT" > "$OUT/profile.log" 2>&1 || status=1
tail -n 20 "$OUT/profile.log"
echo "profile: $(( $(date +%s) - start )) s"
exit $status
