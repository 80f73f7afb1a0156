"""Stream drivers for the benchmark: ours (StreamingTranscriber + window reuse) and the official SDK
loop (official_loop.py, re-feed), back to back or paced at real time, with an optional forced cut
every `cut_sec` seconds of utterance (the plugin's max_utterance_sec on pause-free speech).

Token cap: random weights never stop on their own, so every step generates exactly its cap. The cap
is what real speech produces: the K rolled-back tokens plus 3 tokens per new audio second, and for
a step without a prefix the language header (4 tokens) plus 3 tokens per second of the utterance.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from livekit_qwen_asr.engine import ASREngine, StepRequest, StepResult
from livekit_qwen_asr.streaming import StreamingConfig, StreamingTranscriber

from . import official_loop

SR = 16_000
TOKENS_PER_SECOND = 3  # words of fast speech are ~1.3 tokens; 2-2.5 words per second
HEADER_TOKENS = 4  # "language English<asr_text>"


def token_cap(has_prefix: bool, new_seconds: float, utterance_seconds: float, rollback: int = 5) -> int:
    if has_prefix:
        return rollback + math.ceil(TOKENS_PER_SECOND * new_seconds)
    return HEADER_TOKENS + math.ceil(TOKENS_PER_SECOND * utterance_seconds)


@dataclass
class StepRecord:
    mode: str
    stream: int
    position_s: float  # session audio covered at the end of this step
    utterance_s: float  # utterance audio this step saw
    due: float  # monotonic time its newest audio was complete (paced runs; else its start)
    started: float
    finished: float
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    encoded_upper_s: float  # audio seconds not served from the prefix cache (upper bound)
    encoder_s: float | None  # audio seconds the encoder really ran (instrumented runs)
    chunks: int  # chunks this step advanced (> 1: the stream fell behind and coalesced)
    final: bool
    text_chars: int  # interim text length after this step
    generated: str = ""  # what the model generated

    @property
    def wall_s(self) -> float:
        return self.finished - self.started

    @property
    def lag_s(self) -> float:
        return self.finished - self.due

    def as_dict(self) -> dict:
        d = asdict(self)
        d["wall_s"] = self.wall_s
        d["lag_s"] = self.lag_s
        return d


EncoderProbe = Callable[[], float | None]  # encoder seconds since the previous call


class _Pacer:
    """Real-time arrival of a stream's audio: chunk k is complete at t0 + end_k / SR."""

    def __init__(self, t0: float | None) -> None:
        self.t0 = t0

    def due(self, end_sample: int) -> float:
        return (self.t0 or 0.0) + end_sample / SR

    def available(self, total: int) -> int:
        if self.t0 is None:
            return total
        return min(total, int((time.monotonic() - self.t0) * SR))

    async def wait_for(self, end_sample: int) -> None:
        if self.t0 is not None:
            await asyncio.sleep(max(0.0, self.due(end_sample) - time.monotonic()))


async def run_ours(
    engine: ASREngine,
    audio: np.ndarray,
    *,
    cut_sec: float | None = None,
    t0: float | None = None,
    stream: int = 0,
    mode: str = "ours",
    encoder: EncoderProbe | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    config: StreamingConfig | None = None,
) -> list[StepRecord]:
    """Our streaming over `audio`; `t0` = monotonic start for real-time pacing (None: back to back)."""
    config = config or StreamingConfig()
    cs = config.chunk_samples
    pacer = _Pacer(t0)
    t = StreamingTranscriber(config, engine.codec, engine.base_prompt)
    sid = f"{mode}-{stream}"
    records: list[StepRecord] = []
    fed = 0  # session samples pushed
    utt_start = 0  # session sample where the current utterance starts
    total = audio.shape[0]
    while utt_start < total:
        limit = total if not cut_sec else min(total, utt_start + int(cut_sec * SR))
        need = min(limit, utt_start + t.utterance_samples + cs)  # one more chunk, or the tail
        await pacer.wait_for(need)
        avail = min(limit, max(need, pacer.available(total)))
        if avail > fed:
            t.push_audio(audio[fed:avail])
            fed = avail
        # back to back: one chunk per step; paced: a stream that fell behind coalesces chunks
        plan = t.next_step(max_chunks=None if t0 is not None else 1)
        if plan is None and fed == limit:
            plan = t.finish_step()
            if plan is None:  # the utterance ended on a chunk boundary: its last step is its final
                if records:
                    records[-1].final = True
                t.reset()
                engine.release_stream(sid)
                utt_start = fed
                continue
        if plan is None:
            continue
        started = time.monotonic()
        due = pacer.due(utt_start + plan.audio.shape[0]) if t0 is not None else started
        new_s = (plan.audio.shape[0] - t.utterance_samples) / SR
        cap = token_cap(bool(plan.prefix), new_s, plan.audio_seconds, config.unfixed_token_num)
        # the draft only matters to an engine with speculative decoding (never changes the output)
        result = await engine.step(StepRequest(plan.prompt, plan.audio, cap, sid, draft=plan.draft))
        hyp = t.apply(plan, result.text)
        rec = _record(
            mode,
            stream,
            utt_start,
            plan.audio.shape[0],
            due,
            result,
            encoder() if encoder else None,
            plan.new_chunks,
            plan.final,
        )
        rec.text_chars = len(hyp.text)
        records.append(rec)
        if on_step:
            on_step(rec)
        if plan.final:
            t.reset()
            engine.release_stream(sid)
            utt_start += plan.audio.shape[0]
    return records


async def run_official(
    engine: ASREngine,
    audio: np.ndarray,
    *,
    cut_sec: float | None = None,
    t0: float | None = None,
    stream: int = 0,
    mode: str = "official",
    encoder: EncoderProbe | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> list[StepRecord]:
    """The official SDK loop fed 2 s chunks (real-time when `t0` is set); a cut = finish + new state."""
    pacer = _Pacer(t0)
    records: list[StepRecord] = []
    cs = 2 * SR
    cut = int(cut_sec * SR) if cut_sec else None
    total = audio.shape[0]
    pos = 0
    utt_start = 0
    state = official_loop.init_state(engine)
    sid = f"{mode}-{stream}"

    def cap(prefix: str, audio_s: float, finish: bool) -> int:
        new_s = (audio_s % 2.0 or 2.0) if finish else 2.0  # chunks are 2 s; the finish step: the tail
        return token_cap(bool(prefix), new_s, audio_s)

    collected: list[tuple[StepResult, float | None]] = []

    def collect(result: StepResult) -> None:  # read the encoder probe as each step finishes
        collected.append((result, encoder() if encoder else None))

    def emit(due: float, final: bool) -> None:
        for result, enc in collected:
            rec = _record(
                mode, stream, utt_start, int(round(result.audio_seconds * SR)), due, result, enc, 1, final
            )
            rec.text_chars = len(state.text)
            records.append(rec)
            if on_step:
                on_step(rec)
        collected.clear()

    while pos < total:
        end = min(total, pos + cs)
        if cut is not None:
            end = min(end, utt_start + cut)
        await pacer.wait_for(end)
        due = pacer.due(end) if t0 is not None else time.monotonic()
        await official_loop.streaming_transcribe(engine, audio[pos:end], state, cap, sid, collect)
        emit(due, False)
        pos = end
        if pos >= total or (cut is not None and pos - utt_start >= cut):
            await official_loop.finish_streaming_transcribe(engine, state, cap, sid, collect)
            if collected:
                emit(due, True)
            elif records:
                records[-1].final = True  # no tail: the last chunk step's text is the final
            utt_start = pos
            state = official_loop.init_state(engine)
    return records


def _record(
    mode: str,
    stream: int,
    utt_start: int,
    utt_samples: int,
    due: float,
    r: StepResult,
    encoder_s: float | None,
    chunks: int,
    final: bool,
) -> StepRecord:
    return StepRecord(
        mode=mode,
        stream=stream,
        position_s=(utt_start + utt_samples) / SR,
        utterance_s=utt_samples / SR,
        due=due,
        started=r.started_at,
        finished=r.finished_at,
        prompt_tokens=r.prompt_tokens,
        cached_tokens=r.cached_tokens,
        generated_tokens=r.generated_tokens,
        encoded_upper_s=r.encoded_seconds,
        encoder_s=encoder_s,
        chunks=chunks,
        final=final,
        text_chars=0,
        generated=r.text,
    )
