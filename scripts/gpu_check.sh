#!/usr/bin/env bash
# One-GPU check a user can run: the demo on one GPU under moe_backend=auto, attention=auto
# (2+2 steps), then each MoE backend's grouped matmul forward+backward in TFLOP/s against
# jax.lax.ragged_dot and a dense matmul of the same FLOPs at Qwen3-30B-A3B's expert shape
# (2048 -> 768, 128 experts, top-8, 16384 tokens, bf16). The last stdout line is one JSON
# object. Without an NVIDIA GPU: "gpu_check: no GPU ..." on stderr, exit status 2.
# Flags pass through to scripts/gpu_check.py (e.g. --skip_demo --reps=20 --backends=pallas).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$PY" scripts/gpu_check.py "$@"
