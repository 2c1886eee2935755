#!/usr/bin/env bash
# Issue 6's benchmarks on a CUDA GPU, in under five minutes (each step has its own timeout; a
# step that fails or times out is reported and the next one still runs):
#   1. bench_inference.py --device cuda, 320x320x110 (3 repeats): overhead ratio, metrics ratio;
#   2. bench_inference.py --device cuda --shape 512,512,300 (1 repeat, no metric benchmark):
#      peak host and device memory;
#   3. bench_sweep.py --k 4 on the tiny demo with inference.device=cuda: sweep_reuse_ratio;
#   4. bench_sweep.py --mode sharing on the tiny demo on CUDA: forward_passes_ratio and
#      sweep_cost_ratio of the 8-setting and the overlap x aggregation sweeps (issue 13).
# Needs the project's dependencies with a CUDA build of torch. Writes the JSON files to OUT_DIR
# (default: a new temporary folder) and prints each benchmark's table.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() {  # step TITLE TIMEOUT_S COMMAND...
    local title=$1 limit=$2
    shift 2
    echo "== $title =="
    timeout "$limit" "$@" || { echo "!! $title: exit $? (124: over ${limit} s)"; failed=1; }
}

python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to torch";
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {torch.get_num_threads()} threads")' ||
    exit 1
uptime
step "inference, 320x320x110, UNet (8,16,32,64)" 80 \
    python benchmarks/bench_inference.py --device cuda --repeats 3 --json "$out/inference_cuda.json"
step "inference, 512x512x300 (peak memory)" 130 \
    python benchmarks/bench_inference.py --device cuda --repeats 1 --no-metrics \
    --shape 512,512,300 --json "$out/inference_cuda_512.json"
step "sweep, K=4, tiny demo" 80 \
    python benchmarks/bench_sweep.py --k 4 --size tiny --override inference.device=cuda \
    --json "$out/sweep_cuda.json"
step "sweep sharing, 8 + 4 settings, tiny demo" 240 \
    python benchmarks/bench_sweep.py --mode sharing --size tiny --override inference.device=cuda \
    --json "$out/sharing_cuda.json"
uptime
echo "JSON in $out"
exit "$failed"
