#!/usr/bin/env bash
# One GPU session (issue 13): a real ViT-B LocalMIM fit (eager, compiled), MAE in the same
# harness, host syncs per step, model steps (ViT-B, Swin-B, ViT-L +/- activation checkpointing)
# and the top kernels, in under 10 minutes; writes gpu.json and gpu.md (benchmarks/gpu.py).
# Usage on a GPU machine: bash benchmarks/gpu.sh [outdir]   (a dry run anywhere: add --smoke).
# Python: $PYTHON, else the repository's .venv (make install), else python3.
set -u -o pipefail
out=${1:-${OUT:-/tmp/lmim_gpu}}
shift || true
mkdir -p "$out"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
(nvidia-smi -L || echo "no nvidia-smi") > "$out/gpu.txt" 2>&1
py=${PYTHON:-}
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=.venv/bin/python; } || py=python3
"$py" benchmarks/gpu.py --out "$out" "$@" 2>&1 | tee -a "$out/gpu.txt"
