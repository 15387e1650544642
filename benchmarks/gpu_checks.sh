#!/usr/bin/env bash
# The GPU checks of issue 13, in one run (prepared for a lent device; see the device tool's README):
#   1. the GPU tests (pytest -m gpu: the Triton kernels against the torch reference on CUDA, the self-check);
#   2. benchmarks/bench_kernels.py at b = 1, 4, 16 on the Llama-3-8B FFN (d=4096, F=14336) and the default
#      model's FFN (SmolLM2-135M, d=576, F=1536), T in {1, 4, 16, 128, 2048}, ratio 0.5, CUDA-graph timing.
# Results go under $OUT (default ./gpu-out): pytest's junit XML and log, one JSON and log per benchmark run.
#
#     OUT=/tmp/out bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1 || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" > "$OUT/versions.txt" 2>&1

echo "== pytest -m gpu" | tee "$OUT/pytest-gpu.log"
timeout 900 "$PY" -m pytest -q -m gpu tests/ --junitxml="$OUT/pytest-gpu.xml" >> "$OUT/pytest-gpu.log" 2>&1 || status=1
tail -3 "$OUT/pytest-gpu.log"

for shape in "4096,14336" "576,1536"; do
    name="bench-kernels-d${shape%%,*}"
    echo "== bench_kernels $shape b=1,4,16" | tee "$OUT/$name.log"
    timeout 900 "$PY" benchmarks/bench_kernels.py --shapes "$shape" --block-sizes 1,4,16 --ratios 0.5 \
        --tokens 1,4,16,128,2048 --modes graph --reps 50 --json "$OUT/$name.json" >> "$OUT/$name.log" 2>&1 || status=1
    tail -20 "$OUT/$name.log"
done
exit $status
