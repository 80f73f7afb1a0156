#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
source scripts/preload.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -p no:cacheprovider -q --durations=25 "$@"
