#!/usr/bin/env bash
# One GPU benchmark session: ViT-B/16 LocalMIM in bf16 at batch 256, model step only (no data).
# Usage on a GPU machine: bash benchmarks/gpu.sh [outdir]
set -u
out=${1:-${OUT:-/tmp}}
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"
run() { echo "## $*" | tee -a "$out/gpu.txt"; timeout 240 python3 benchmarks/throughput.py "$@" 2>&1 | tail -4 | tee -a "$out/gpu.txt"; }
run --model vit_b --target hog --batch 256 --precision bf16 --steps 10 --warmup 3
run --model vit_b --target hog --batch 256 --precision bf16 --steps 10 --warmup 3 --compile
