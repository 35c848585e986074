#!/usr/bin/env bash
# One GPU session for the budget comparison (issue 4): LocalMIM against MAE on ViT-B/16 in bf16.
#   1. model step only (no data), both methods interleaved: time ratio and FLOP ratio;
#   2. short real fits under Lightning with the device-hour accounting: images/s, MFU, memory.
# Usage on a GPU machine: bash benchmarks/gpu_budget.sh [outdir]
set -u
out=${1:-${OUT:-/tmp}}
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi -L | tee "$out/gpu_budget.txt"
python3 -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)" 2>&1 | tee -a "$out/gpu_budget.txt"
run() { echo "## $*" | tee -a "$out/gpu_budget.txt"; timeout 200 python3 "$@" 2>&1 | grep -v -i "warn\|tip\|^INFO" | tail -6 | tee -a "$out/gpu_budget.txt"; }
run benchmarks/throughput.py --model vit_b --compare localmim,mae --batch 256 --precision bf16 --steps 10 --warmup 3
run benchmarks/fit_budget.py --model vit_b --batch 256 --steps 40 --precision bf16-mixed --out "$out/fits"
