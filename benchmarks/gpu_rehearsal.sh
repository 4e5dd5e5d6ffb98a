#!/usr/bin/env bash
# Single-GPU rehearsal of training/configs/base_4xh100.yaml shrunk in steps only (<= 8 min on one H200):
# real Base model, bf16, demo corpus, labels by the demo teacher on the GPU, checkpoint, resume, final
# model. See benchmarks/gpu_rehearsal.py. Ends with RESULT lines; exits 2 without a CUDA GPU.
#
#   bash benchmarks/gpu_rehearsal.sh [--steps 8]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_rehearsal.sh: no CUDA GPU visible to torch; nothing run (CPU dry run: python benchmarks/gpu_rehearsal.py --tiny)." >&2
    exit 2
fi
exec timeout 480 python benchmarks/gpu_rehearsal.py "$@"
