"""Endpointing inside the stream with the real bundled silero VAD and the real vLLM engine.

The engine's model has random weights, so checks are about segmentation, audio and the engine's own
outputs, never about words.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from livekit.agents import stt

from livekit_qwen_asr import STT
from livekit_qwen_asr.prompt import parse_output
from livekit_qwen_asr.samples import iter_frames

from .engine_wrappers import RecordingEngine

SR = 16000
E = stt.SpeechEventType


async def run_stream(plugin: STT, mono16k: np.ndarray) -> list[stt.SpeechEvent]:
    stream = plugin.stream()
    task = asyncio.create_task(_collect(stream))
    for f in iter_frames(mono16k, SR, 1, (20,)):
        stream.push_frame(f)
        await asyncio.sleep(0)  # let the VAD consume as audio arrives (not a synchronisation point)
    stream.end_input()
    return await task


async def _collect(stream) -> list[stt.SpeechEvent]:
    return [ev async for ev in stream]


def by_utterance(events: list[stt.SpeechEvent]) -> dict[str, list[stt.SpeechEvent]]:
    out: dict[str, list[stt.SpeechEvent]] = {}
    for ev in events:
        out.setdefault(ev.request_id, []).append(ev)
    return out


async def test_utterance_count_matches_pauses_and_silence_costs_nothing(engine, speech16k):
    pause = np.zeros(int(1.5 * SR), np.int16)
    third = speech16k[: 4 * SR]
    audio = np.concatenate([pause, speech16k, pause, speech16k, pause, third, pause])
    rec = RecordingEngine(engine)
    events = await run_stream(STT(engine=rec, endpointing_ms=500), audio)

    utts = by_utterance(events)
    assert len(utts) == 3
    for evs in utts.values():
        types = [e.type for e in evs]
        assert types[0] == E.START_OF_SPEECH
        assert types.count(E.FINAL_TRANSCRIPT) == 1 and types.count(E.END_OF_SPEECH) == 1
        assert types.index(E.FINAL_TRANSCRIPT) < types.index(E.END_OF_SPEECH)
        assert all(t != E.INTERIM_TRANSCRIPT for t in types[types.index(E.FINAL_TRANSCRIPT) :])
    finals = [e.alternatives[0] for e in events if e.type == E.FINAL_TRANSCRIPT]
    # each utterance lies within its speech, give or take the padding (0.3 s) and endpointing (0.5 s)
    spans = [(1.5, 1.5 + len(speech16k) / SR)]
    spans.append((spans[0][1] + 1.5, spans[0][1] + 1.5 + len(speech16k) / SR))
    spans.append((spans[1][1] + 1.5, spans[1][1] + 1.5 + 4.0))
    for f, (a, b) in zip(finals, spans, strict=True):
        assert a - 0.5 <= f.start_time <= a + 0.5
        assert b - 0.5 <= f.end_time <= b + 0.85
    # silence never reached the model: the engine saw less audio than the stream carried
    usage = sum(e.recognition_usage.audio_duration for e in events if e.type == E.RECOGNITION_USAGE)
    assert usage < len(audio) / SR - 3.0
    assert max(r.audio.shape[0] for r in rec.requests) <= len(speech16k) + 1.0 * SR  # bounded per utterance


async def test_forced_cut_on_60s_of_pause_free_speech_loses_and_repeats_nothing(engine, speech16k):
    """60 s without a pause longer than the endpointing silence: the 30 s limit cuts it.

    Checked against the engine's own outputs (so it holds for a random model): the finals are exactly
    the parsed finish-step outputs; the finish steps' audio tiles the speech with no gap or overlap;
    each finish step's prefix came from a step that saw no audio past the cut; cuts fall in quiet
    points between words.
    """
    audio = np.tile(speech16k, 5)[: 61 * SR]
    rec = RecordingEngine(engine)
    plugin = STT(engine=rec, endpointing_ms=500, max_utterance_sec=30.0, vad=None)
    events = await run_stream(plugin, audio)

    finals = [e for e in events if e.type == E.FINAL_TRANSCRIPT]
    assert len(finals) == 3
    # finish steps are the requests whose audio equals a final's span
    spans = [(f.alternatives[0].start_time, f.alternatives[0].end_time) for f in finals]
    assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(61.0, abs=1e-3)
    for (_, b), (c, _) in zip(spans, spans[1:], strict=False):
        assert b == pytest.approx(c, abs=1e-6)  # contiguous: nothing lost, nothing repeated
    assert all(b - a <= 30.0 + 1e-6 for a, b in spans)
    starts = [round(a * SR) for a, _ in spans]
    finish_reqs = []
    for (a, b), f in zip(spans, finals, strict=True):
        n = round((b - a) * SR)
        cands = [(r, res) for r, res in zip(rec.requests, rec.results, strict=True) if r.audio.shape[0] == n]
        req, res = cands[-1]
        start = round(a * SR)
        assert np.array_equal(req.audio, audio[start : start + n].astype(np.float32) / 32768)
        prefix = req.prompt.split("assistant\n", 1)[1]
        assert f.alternatives[0].text == parse_output(prefix + res.text)[1]
        finish_reqs.append(req)
    # the prefix of a cut utterance's finish step comes from a step whose audio ended before the cut
    for k, req in enumerate(finish_reqs[:-1]):
        cut = starts[k + 1] - starts[k]
        prefix = req.prompt.split("assistant\n", 1)[1]
        if prefix:
            earlier = [r for r in rec.requests if r is not req and r.audio.shape[0] <= cut]
            assert earlier
    # cuts fall between words: the 20 ms around each cut is quiet relative to the speech
    level = np.sqrt(np.mean(audio.astype(np.float64) ** 2))
    for s in starts[1:]:
        around = audio[s - 160 : s + 160].astype(np.float64)
        assert np.sqrt(np.mean(around**2)) < 0.2 * level


async def test_forced_cut_with_vad_continues_speech(engine, speech16k):
    audio = np.tile(speech16k, 3)[: 33 * SR]
    events = await run_stream(STT(engine=RecordingEngine(engine), max_utterance_sec=16.0), audio)
    finals = [e.alternatives[0] for e in events if e.type == E.FINAL_TRANSCRIPT]
    assert len(finals) >= 2
    for a, b in zip(finals, finals[1:], strict=False):
        assert b.start_time >= a.end_time - 1e-6  # never overlapping


async def test_previous_final_is_carried_as_context(engine, speech16k):
    rec = RecordingEngine(engine)
    plugin = STT(engine=rec, vad=None, carry_context=True, carry_context_chars=40, context="Topic: demo")
    stream = plugin.stream()
    task = asyncio.create_task(_collect(stream))
    for f in iter_frames(speech16k[: 3 * SR], SR, 1, (20,)):
        stream.push_frame(f)
    stream.flush()
    for f in iter_frames(speech16k[: 3 * SR], SR, 1, (20,)):
        stream.push_frame(f)
    stream.end_input()
    events = await task
    finals = [e.alternatives[0].text for e in events if e.type == E.FINAL_TRANSCRIPT]
    assert len(finals) == 2 and finals[0]
    first_len = 3 * SR
    second = [r for r in rec.requests[1:] if r.audio.shape[0] <= first_len][-1]
    carried = " ".join(finals[0].split())[-40:].strip()
    system = second.prompt.split("<|im_end|>", 1)[0]
    assert "Topic: demo" in system and carried[-10:] in " ".join(system.split())
    assert len(system) < len("<|im_start|>system\nTopic: demo\n") + 40 + 5
