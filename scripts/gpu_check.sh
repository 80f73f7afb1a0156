#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): on a CUDA machine, set up the [gpu] stack, build the
# 0.6b-shaped synthetic checkpoint and, in under 8 minutes after set-up, report window-reuse
# exactness, p50/p95 step latency and how many real-time streams one GPU holds.
# Writes results/gpu-check/{results.json,summary.md}. Options: --help (e.g. --budget-min 5).
# --dry-run: the same code on CPU with the tiny checkpoint (the cpu stack), about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=gpu
for a in "$@"; do [ "$a" = "--dry-run" ] && STACK=cpu; done
bash scripts/setup.sh "$STACK"
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
if [ "$STACK" = cpu ]; then source scripts/preload.sh; fi
exec .venv/bin/python -m bench.gpu_check "$@"
