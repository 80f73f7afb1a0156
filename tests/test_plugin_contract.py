"""What a LiveKit Agents user relies on beyond transcripts (issue #14): preflight semantics, session
keyterms, errors the framework can handle, confidence, option validation. Real vLLM engine (tiny
random-weight checkpoint: text is random, so tests compare texts with each other, never with words).
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import APIConnectOptions, APIError, APIStatusError, stt

from livekit_qwen_asr import STT, InvalidAudioError, InvalidOptionError, TooManyStreamsError

from .engine_wrappers import RecordingEngine

SR = 16000
E = stt.SpeechEventType
FAST_RETRY = APIConnectOptions(max_retry=3, retry_interval=0.05, timeout=30.0)


def mono_frame(samples: np.ndarray) -> rtc.AudioFrame:
    return rtc.AudioFrame(samples.astype(np.int16).tobytes(), SR, 1, len(samples))


async def test_preflight_at_a_flush_has_the_full_text_and_equals_an_unchanged_final(engine, speech16k):
    """PREFLIGHT carries the full current text when the turn may end (here: a flush), never the
    shorter stable prefix mid-speech. When the finish step has nothing new to decode, the final equals
    the preflight, which is what lets AgentSession use the preemptive reply it started."""
    rec = RecordingEngine(engine)
    plugin = STT(engine=rec, vad=None)
    stream = plugin.stream()
    events: list[stt.SpeechEvent] = []

    async def read() -> None:
        async for ev in stream:
            events.append(ev)

    reader = asyncio.create_task(read())
    # exactly two chunks, each awaited (else one step covers both): nothing left for the finish step
    stream.push_frame(mono_frame(speech16k[: 2 * SR]))
    await rec.wait_steps(1)
    stream.push_frame(mono_frame(speech16k[2 * SR : 4 * SR]))
    await rec.wait_steps(2)
    mid = [e.type for e in events]
    assert E.PREFLIGHT_TRANSCRIPT not in mid, mid  # speech may go on: no preflight yet
    stream.flush()
    stream.end_input()
    async with asyncio.timeout(60):
        await reader
    kinds = [e.type for e in events]
    i_pre = kinds.index(E.PREFLIGHT_TRANSCRIPT)
    i_fin = kinds.index(E.FINAL_TRANSCRIPT)
    interims = [e for e in events if e.type == E.INTERIM_TRANSCRIPT]
    assert kinds.count(E.PREFLIGHT_TRANSCRIPT) == 1 and i_pre < i_fin
    # the full text, not the stable part
    assert events[i_pre].alternatives[0].text == interims[-1].alternatives[0].text
    assert events[i_fin].alternatives[0].text == events[i_pre].alternatives[0].text
    assert len(rec.results) == 2  # the finish step had nothing to do


async def test_preflight_follows_the_endpointers_pause_with_the_full_text(engine, speech16k):
    """With the plugin's own VAD: speech, then silence. The silence's start (a Pause) sends a PREFLIGHT
    with the full current text; each later text change during the pause sends one more; then the final."""
    from livekit.agents import inference

    plugin = STT(engine=engine, vad=inference.VAD(), endpointing_ms=800)
    stream = plugin.stream()
    audio = np.concatenate([speech16k[: 4 * SR], np.zeros(2 * SR, np.int16)])
    for i in range(0, len(audio), 320):
        stream.push_frame(mono_frame(audio[i : i + 320]))
    stream.end_input()
    async with asyncio.timeout(60):
        events = [ev async for ev in stream]
    kinds = [e.type for e in events]
    assert E.PREFLIGHT_TRANSCRIPT in kinds and E.FINAL_TRANSCRIPT in kinds
    assert kinds.index(E.PREFLIGHT_TRANSCRIPT) < kinds.index(E.FINAL_TRANSCRIPT)
    latest = ""
    for e in events:
        if e.type == E.INTERIM_TRANSCRIPT:
            latest = e.alternatives[0].text
        elif e.type == E.PREFLIGHT_TRANSCRIPT:
            assert e.alternatives[0].text == latest  # the full text, not the shorter stable prefix
    texts = [e.alternatives[0].text for e in events if e.type == E.PREFLIGHT_TRANSCRIPT]
    assert len(texts) == len(set(texts))  # never the same preflight twice


async def test_session_keyterms_reach_new_streams(engine, speech16k):
    rec = RecordingEngine(engine)
    plugin = STT(engine=rec, vad=None, keyterms=["Alice"])
    plugin._update_session_keyterms(["Zorblax", "Alice"])  # what AgentSession does before it opens a stream
    assert plugin._effective_opts().keyterms == ("Alice", "Zorblax")
    stream = plugin.stream()
    stream.push_frame(mono_frame(speech16k[: 2 * SR + 400]))
    await rec.wait_steps(1)
    await stream.aclose()
    assert "Alice, Zorblax" in rec.requests[0].prompt
    # a later user update keeps the session's terms
    plugin.update_options(keyterms=["Bob"])
    assert plugin._effective_opts().keyterms == ("Bob", "Zorblax", "Alice")


def test_errors_are_livekit_api_errors_the_session_handles():
    too_many = TooManyStreamsError("2 streams are open")
    bad = InvalidAudioError("frame sample_rate must be > 0")
    assert isinstance(too_many, APIStatusError) and too_many.retryable and too_many.status_code == 429
    assert isinstance(bad, APIStatusError) and not bad.retryable and bad.status_code == 400
    assert isinstance(bad, ValueError) and isinstance(too_many, RuntimeError)  # the older contract holds


async def test_max_streams_refusal_is_an_api_error(engine):
    plugin = STT(engine=engine, vad=None, max_streams=1)
    s1 = plugin.stream()
    with pytest.raises(APIError) as info:
        plugin.stream()
    assert isinstance(info.value, TooManyStreamsError) and info.value.retryable
    await s1.aclose()


async def test_a_bad_frame_inside_an_agent_session_is_dropped_and_reported_without_losing_audio(
    engine, speech16k, monkeypatch
):
    """Inside AgentSession the caller of push_frame is the framework's forwarding task, which would
    die on an exception and leave the stream deaf. There, the stream drops the frame, reports a
    recoverable error, and carries on with all other audio."""
    import livekit_qwen_asr.stt as stt_module

    monkeypatch.setattr(stt_module, "session_ends_turns", lambda: True)  # as inside a session pipeline
    rec = RecordingEngine(engine)
    plugin = STT(engine=rec, vad=None)
    errors: list[stt.STTError] = []
    plugin.on("error", errors.append)
    stream = plugin.stream(conn_options=FAST_RETRY)
    audio = speech16k[: 3 * SR]
    stream.push_frame(mono_frame(audio[:SR]))
    bad = rtc.AudioFrame(b"\0\0" * 160, SR, 1, 160)
    bad._sample_rate = 0  # a corrupt header (rtc validates at construction, so corrupt it after)
    stream.push_frame(bad)  # no exception: the session's forwarder keeps running
    stream.push_frame(mono_frame(audio[SR:]))
    stream.flush()
    stream.end_input()
    events = [ev async for ev in stream]
    assert len(errors) == 1 and errors[0].recoverable and isinstance(errors[0].error, InvalidAudioError)
    usage = [e for e in events if e.type == E.RECOGNITION_USAGE]
    assert sum(u.recognition_usage.audio_duration for u in usage) == pytest.approx(len(audio) / SR, abs=0.02)


async def test_confidence_is_the_decoded_tokens_probability(engine, speech16k):
    rec = RecordingEngine(engine)
    plugin = STT(engine=rec, vad=None)
    stream = plugin.stream()
    stream.push_frame(mono_frame(speech16k[: 3 * SR]))
    stream.flush()
    stream.end_input()
    events = [ev async for ev in stream]
    final = next(e for e in events if e.type == E.FINAL_TRANSCRIPT)
    last = rec.results[-1]
    assert last.token_logprobs, "the engine reports the generated tokens' logprobs"
    expected = math.exp(sum(last.token_logprobs) / len(last.token_logprobs))
    assert 0.0 < final.alternatives[0].confidence <= 1.0
    assert final.alternatives[0].confidence == pytest.approx(expected)


async def test_agent_reply_becomes_context_of_the_next_utterance(engine, speech16k):
    from types import SimpleNamespace

    rec = RecordingEngine(engine)
    plugin = STT(engine=rec, vad=None, context="Weekly sync")
    assert plugin.capabilities.chat_context
    stream = plugin.stream()
    user = SimpleNamespace(item=SimpleNamespace(role="user", text_content="hello"))
    reply_item = SimpleNamespace(role="assistant", text_content="What is your account number?")
    reply = SimpleNamespace(item=reply_item)
    plugin._push_conversation_item(user)  # ignored: only the agent's words are context
    plugin._push_conversation_item(reply)
    stream.push_frame(mono_frame(speech16k[: 2 * SR + 400]))
    await rec.wait_steps(1)
    await stream.aclose()
    prompt = rec.requests[0].prompt
    assert "Weekly sync\nWhat is your account number?" in prompt and "hello" not in prompt


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keyterms": "Alice"},
        {"keyterms": [b"Alice"]},
        {"keyterms": [3]},
        {"keyterms": 7},
        {"context": b"bytes"},
        {"context": 42},
        {"context": "Alice \ud800"},
        {"keyterms": ["ok", "bad \udfff"]},
    ],
)
def test_options_of_the_wrong_type_or_unencodable_text_are_refused(engine, kwargs):
    with pytest.raises(InvalidOptionError):
        STT(engine=engine, vad=None, **kwargs)
    plugin = STT(engine=engine, vad=None)
    with pytest.raises(InvalidOptionError):
        plugin.update_options(**kwargs)
    with pytest.raises(InvalidOptionError):
        plugin._update_session_keyterms(kwargs.get("keyterms", ["\ud800"]))  # type: ignore[arg-type]
    assert plugin.options.keyterms == () and plugin.options.context == ""  # nothing half-applied
