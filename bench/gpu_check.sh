#!/usr/bin/env bash
# The GPU check (issue 14): run on a machine with a CUDA GPU after `pip install torch==<your CUDA build> -e .`;
# prints one table (export frames/s with AMP off/bf16/fp16, teacher and student training steps/s, memorybank
# reads with pinned memory). Paste it into docs/PERFORMANCE.md. Extra arguments go to bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
exec python bench/gpu_check.py --device auto "$@"
