"""The official SDK's streaming loop (qwen-asr 0.0.6 `streaming_transcribe` /
`finish_streaming_transcribe`), re-implemented line for line over our engine protocol: the baseline of
the benchmark. Every chunk re-feeds *all* audio so far as one raw item (`reuse_windows=False`), and
the prompt is `prompt_raw + prefix` with the same token rollback. Only `LLM.generate` is replaced by
`ASREngine.step`, and the generation cap is a parameter (the SDK's is a fixed `max_new_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from livekit_qwen_asr.engine import ASREngine, StepRequest, StepResult
from livekit_qwen_asr.prompt import forced_language_suffix, parse_output

SR = 16_000


@dataclass
class OfficialState:
    prompt_raw: str
    chunk_size_samples: int
    unfixed_chunk_num: int = 2
    unfixed_token_num: int = 5
    force_language: str | None = None
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    audio_accum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    chunk_id: int = 0
    raw_decoded: str = ""
    language: str = ""
    text: str = ""


def init_state(
    engine: ASREngine,
    context: str = "",
    language: str | None = None,
    chunk_size_sec: float = 2.0,
    unfixed_chunk_num: int = 2,
    unfixed_token_num: int = 5,
) -> OfficialState:
    return OfficialState(
        prompt_raw=engine.base_prompt(context) + forced_language_suffix(language),
        chunk_size_samples=int(round(chunk_size_sec * SR)),
        unfixed_chunk_num=unfixed_chunk_num,
        unfixed_token_num=unfixed_token_num,
        force_language=language,
    )


# (prefix, audio seconds, is finish) -> max new tokens of that step
TokenCap = Callable[[str, float, bool], int]


async def streaming_transcribe(
    engine: ASREngine,
    pcm16k: np.ndarray,
    state: OfficialState,
    cap: TokenCap,
    stream_id: str = "official",
    on_step: Callable[[StepResult], None] | None = None,
) -> OfficialState:
    x = np.asarray(pcm16k).reshape(-1)
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32, copy=False)
    if x.shape[0] > 0:
        state.buffer = np.concatenate([state.buffer, x])
    while state.buffer.shape[0] >= state.chunk_size_samples:
        chunk = state.buffer[: state.chunk_size_samples]
        state.buffer = state.buffer[state.chunk_size_samples :]
        state.audio_accum = (
            chunk if state.audio_accum.shape[0] == 0 else np.concatenate([state.audio_accum, chunk])
        )
        prefix = ""
        if state.chunk_id >= state.unfixed_chunk_num:
            cur_ids = engine.codec.encode(state.raw_decoded)
            k = int(state.unfixed_token_num)
            while True:
                end_idx = max(0, len(cur_ids) - k)
                prefix = engine.codec.decode(cur_ids[:end_idx]) if end_idx > 0 else ""
                if "\ufffd" not in prefix:
                    break
                if end_idx == 0:
                    prefix = ""
                    break
                k += 1
        await _generate(engine, state, prefix, cap, stream_id, on_step, finish=False)
    return state


async def finish_streaming_transcribe(
    engine: ASREngine,
    state: OfficialState,
    cap: TokenCap,
    stream_id: str = "official",
    on_step: Callable[[StepResult], None] | None = None,
) -> OfficialState:
    if state.buffer.shape[0] == 0:
        return state
    tail, state.buffer = state.buffer, np.zeros(0, np.float32)
    state.audio_accum = tail if state.audio_accum.shape[0] == 0 else np.concatenate([state.audio_accum, tail])
    prefix = ""
    if state.chunk_id >= state.unfixed_chunk_num:
        cur_ids = engine.codec.encode(state.raw_decoded)
        end_idx = max(1, len(cur_ids) - int(state.unfixed_token_num))
        prefix = engine.codec.decode(cur_ids[:end_idx])
    await _generate(engine, state, prefix, cap, stream_id, on_step, finish=True)
    return state


async def _generate(
    engine: ASREngine,
    state: OfficialState,
    prefix: str,
    cap: TokenCap,
    stream_id: str,
    on_step: Callable[[StepResult], None] | None,
    finish: bool,
) -> None:
    audio_s = state.audio_accum.shape[0] / SR
    result = await engine.step(
        StepRequest(
            state.prompt_raw + prefix,
            state.audio_accum,
            cap(prefix, audio_s, finish),
            stream_id,
            reuse_windows=False,  # one raw item, re-fed every step: the SDK's request
        )
    )
    if on_step is not None:
        on_step(result)
    state.raw_decoded = prefix + result.text
    state.language, state.text = parse_output(state.raw_decoded, state.force_language)
    state.chunk_id += 1
