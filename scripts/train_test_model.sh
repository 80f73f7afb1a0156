#!/usr/bin/env bash
# Continue training the small test model from training/state/ (committed), regenerating its synthetic
# corpus when missing.  Usage: scripts/train_test_model.sh [MINUTES] [extra training.train args]
# TRAIN_SPLIT: train_easy (default), train, or train_easy+train (both mixed: the curriculum's current
# stage, training/README.md).
# Runs in .venv-official (the official qwen-asr transformers classes); both cores by default.
# The first 10 training shards are made before training starts; the other 90 are made meanwhile at
# low priority (the trainer picks up new shards every 500 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-60}"; shift || true
bash scripts/setup.sh cpu >/dev/null
export TEST_MODEL_TOKENIZER="$(.venv/bin/python -c 'from livekit_qwen_asr.synthetic import ensure_checkpoint; print(ensure_checkpoint("tiny"))')"
PY=.venv-official/bin/python
for s in test test_unseen test_noise; do $PY -m training.corpus --split "$s" --shards 0-0 --size 300; done
SPLIT="${TRAIN_SPLIT:-train_easy}"
for s in ${SPLIT//+/ }; do
  $PY -m training.corpus --split "$s" --shards 0-9 --every 2 --offset 0 &
  $PY -m training.corpus --split "$s" --shards 0-9 --every 2 --offset 1
  wait
done
(for s in ${SPLIT//+/ }; do nice -n 15 $PY -m training.corpus --split "$s" --shards 10-99; done) &
GEN=$!
trap 'kill $GEN $(pgrep -P $GEN) 2>/dev/null || true' EXIT
$PY -m training.train --minutes "$MINUTES" --train-split "$SPLIT" "$@"
