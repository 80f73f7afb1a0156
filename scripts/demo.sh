#!/usr/bin/env bash
# Set up (idempotent) and run the main job: stream the bundled speech through the plugin. Extra args
# go to `python -m livekit_qwen_asr.demo` (e.g. --model PATH --speed 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
source scripts/preload.sh
exec .venv/bin/python -m livekit_qwen_asr.demo "$@"
