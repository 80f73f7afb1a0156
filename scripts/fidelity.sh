#!/usr/bin/env bash
# Fidelity figures of the streaming algorithm on the shipped test model (issue #12): writes the held-out
# sets as WAV + text, decodes each streaming and offline (bench/fidelity.py), measures the words at forced
# cuts (bench/forced_cuts.py), renders docs/fidelity.md.
#   bash scripts/fidelity.sh [recordings per set, default 40]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-40}"
bash scripts/setup.sh cpu >/dev/null
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
source scripts/preload.sh
for s in test test_unseen test_noise; do
  .venv-official/bin/python -m training.corpus --split "$s" --shards 0-0 --size 300
done
.venv-official/bin/python -m training.heldout --n "$N" --out results/heldout
MODEL="$(.venv/bin/python -c 'from livekit_qwen_asr.test_model import ensure_test_model; print(ensure_test_model())')"
dirs=()
for s in test test_unseen test_noise; do
  .venv/bin/python -m bench.fidelity "results/heldout/$s" --model "$MODEL" --out "results/fidelity-$s"
  dirs+=("results/fidelity-$s")
done
# words at forced cuts: 120 s of pause-free held-out speech, segments of 10 s and 30 s
.venv-official/bin/python -m training.long_speech results/forced-cuts/speech.wav
.venv/bin/python -m bench.forced_cuts results/forced-cuts/speech.wav --model "$MODEL" --out results/forced-cuts/report.json
.venv/bin/python -m bench.fidelity_report "${dirs[@]}" --forced-cuts results/forced-cuts/report.json
