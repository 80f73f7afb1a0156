#!/usr/bin/env bash
# Set up (idempotent) and run the benchmark: our streaming vs the official re-feed loop on one engine.
# Default: the 0.6b-shaped synthetic checkpoint, 300 s per mode, 1-4 paced streams (about 1 h on a
# 2-core CPU). Writes results/bench-<preset>/{results.json,table.md,*.png}. Options: --help
# (e.g. --quick for the CI-sized run, --preset tiny, --streams 3, --seconds 120). With no options it
# also re-renders docs/performance.md from the run (bench/report.py) and runs the speculative-decoding
# benchmark on the trained test model (bench/spec_decode.py, ~10 min), which re-renders its own block.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "${QWEN_ASR_SETUP:-cpu}"
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
source scripts/preload.sh
.venv/bin/python -m bench.run "$@"
if [ "$#" -eq 0 ]; then
  # the default run is the one docs/performance.md shows: re-render it (table, targets, plots)
  .venv/bin/python -m bench.report results/bench-0.6b
  # speculative decoding on the trained test model: its held-out inputs as scripts/fidelity.sh
  # writes them (kept when present), then the run
  if [ ! -d results/heldout/test ]; then
    .venv-official/bin/python -m training.corpus --split test --shards 0-0 --size 300
    .venv-official/bin/python -m training.heldout --n 40 --out results/heldout --sets test
  fi
  if [ ! -f results/forced-cuts/speech.wav ]; then
    .venv-official/bin/python -m training.long_speech results/forced-cuts/speech.wav
  fi
  .venv/bin/python -m bench.spec_decode --heldout results/heldout/test --files 40 --tokens 8
fi
