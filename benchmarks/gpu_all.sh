#!/usr/bin/env bash
# Every GPU column of docs/benchmarks.md in one go (a few minutes on an H100/H200): the GPU
# tests, the output-layer step at 1e4..4e6 labels, the incremental refresh and amortised shared
# step at 1e6, and the scale run (1e6 labels x 1e6 points, one epoch, top-5 latency).
#
#   bash benchmarks/gpu_all.sh            # results in benchmarks/results/*_cuda.json (+ $OUT)
#   QUICK=1 bash benchmarks/gpu_all.sh    # a one-minute dry run of the same scripts
#
# Needs torch with CUDA, numpy, scipy, scikit-learn, rich, safetensors (matplotlib for PNGs).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
R=benchmarks/results
mkdir -p "$R"
status=0
run() {  # run NAME TIMEOUT_S CMD...: one step, time-boxed, its log kept, failures counted
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
  if timeout "$limit" "$@" > "$R/gpu_$name.log" 2>&1; then
    tail -n 25 "$R/gpu_$name.log"
  else
    echo "!!! $name failed or timed out (exit $?), log: $R/gpu_$name.log"; tail -n 15 "$R/gpu_$name.log"
    status=1
  fi
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 2
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv || true
if [ "${QUICK:-0}" = 1 ]; then
  run tests 120 "$PY" -m pytest -q -m gpu tests/test_samplers.py tests/test_midx_incremental.py
  run output_layer 120 "$PY" benchmarks/bench_output_layer.py --quick --device cuda --out "$R/output_layer_quick_cuda.json"
  run refresh 120 "$PY" benchmarks/bench_refresh.py --quick --device cuda --out "$R/refresh_quick_cuda.json"
  run scale 180 "$PY" benchmarks/bench_scale.py --quick --device cuda --out "$R/scale_quick_cuda.json"
else
  # about 8 minutes in all; each step is time-boxed so one slow step cannot eat the others
  run tests 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider
  run output_layer 200 "$PY" benchmarks/bench_output_layer.py --device cuda --reps 10 \
      --full-reps-large 5 --memory-methods full,midx-pq-shared --out "$R/output_layer_cuda.json"
  run refresh 90 "$PY" benchmarks/bench_refresh.py --device cuda --rounds 4 --full-rounds 4 \
      --out "$R/refresh_cuda.json"
  run scale 300 "$PY" benchmarks/bench_scale.py --device cuda --labels 1000000 \
      --points "${SCALE_POINTS:-1000000}" --features 50000 --hidden 256 --work /tmp/xmc_gpu_scale \
      --out "$R/scale_1e6x1e6_cuda.json"
fi
if [ -n "${OUT:-}" ]; then cp "$R"/*cuda*.json "$R"/gpu_*.log "$OUT"/ 2>/dev/null || true; fi
echo "=== done ($(date -u +%T)), status $status"
exit $status
