#!/usr/bin/env bash
# Set up (idempotent) and serve the live-caption page on http://127.0.0.1:8080/ : open it in a browser
# on this machine, allow the microphone, speak. Extra args go to `python -m livekit_qwen_asr.browser`
# (e.g. --model PATH --port 9000 --language en).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
source scripts/preload.sh
exec .venv/bin/python -m livekit_qwen_asr.browser "$@"
