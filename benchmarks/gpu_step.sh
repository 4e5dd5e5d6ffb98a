#!/usr/bin/env bash
# DELULU Base bf16 pretraining step on one GPU vs transformers' HuBERT Base at equal dims (<= 5 min):
# step time, peak memory, MFU, audio-seconds per second. See benchmarks/gpu_step.py for the method.
#
#   bash benchmarks/gpu_step.sh            # from the repository root, on a machine with a CUDA GPU
#
# Writes gpu_step.json (into $OUT when set, else runs/) and ends with RESULT lines (gpu_base_bf16_mfu,
# gpu_step_throughput_vs_hubert, per-size step time / audio-s/s / memory). Exits with status 2 and a
# clear message when no CUDA GPU is visible (for a CPU dry run of the script: python
# benchmarks/gpu_step.py --device cpu --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_step.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing measured." >&2
    echo "Run it on a GPU machine; for CPU throughput use: python benchmarks/bench_pretrain_step.py" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 290 python benchmarks/gpu_step.py "$@"
