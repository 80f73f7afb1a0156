"""A real `livekit.agents.AgentSession` (no room, no LLM, no TTS) drives our STT plugin.

Offline wiring (livekit-agents 1.8.9): `session.input.audio` is set to an `io.AudioInput` subclass
before `session.start(agent)`, and `room=` is omitted (`room=None` crashes). With `llm=None` the
session skips the reply after each user turn. Turn detection is "vad": at each VAD end of speech the
session flushes our stream (we declare `manual_flush=True`), which emits FINAL_TRANSCRIPT.

The audio is the bundled speech at 48 kHz, twice, with 1.5 s of digital silence between the copies and
after the second, fed in 20 ms frames paced at twice real time (see PACE). It is mono: the session
hands the same frames to the VAD, and the bundled `inference.VAD` resamples but never downmixes (a
stereo frame kills its task with "Channel count mismatch: expected 1, got 2"). RoomIO never sends
stereo either (its default input is 24 kHz mono), so stereo input is left to the stream-level tests.

The engine is the shared tiny random-weight checkpoint: transcripts are random tokens, so nothing here
looks at words, only at what flowed where.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import (
    Agent,
    AgentSession,
    ModelSettings,
    UserInputTranscribedEvent,
    UserStateChangedEvent,
    inference,
    stt,
)
from livekit.agents.metrics import STTMetrics
from livekit.agents.voice import io

import livekit_qwen_asr
from livekit_qwen_asr.samples import iter_frames, upsample_to_stereo

from .engine_wrappers import RecordingEngine
from .fake_llm import RecordingLLM

RATE = 48_000
CHANNELS = 1  # see the module docstring
GAP_S = 1.5  # silence between the two copies and after the second
# Audio seconds per wall second. The VAD (and the flush it triggers) must keep up with the frames:
# the flush positions asserted below were identical at 1x, 2x and 4x; at ~50x the VAD lagged by more
# than the 1.5 s gap and its first flush landed after all the audio. 2x keeps a wide margin.
PACE = 2.0
WAIT_TIMEOUT_S = 60.0  # after the last frame: the last flush's final + usage must arrive by then
CLOSE_TIMEOUT_S = 30.0

E = stt.SpeechEventType
TRANSCRIPT_TYPES = (
    stt.SpeechEventType.INTERIM_TRANSCRIPT,
    stt.SpeechEventType.PREFLIGHT_TRANSCRIPT,
    stt.SpeechEventType.FINAL_TRANSCRIPT,
)


class PacedAudioInput(io.AudioInput):
    """A microphone stand-in: yields the frames at `pace` x real time, then ends."""

    def __init__(self, frames: list[rtc.AudioFrame], pace: float, on_done) -> None:
        super().__init__(label="test.PacedAudioInput")
        self._frames = frames
        self._pace = pace
        self._on_done = on_done
        self._i = 0
        self._audio_s = 0.0
        self._t0: float | None = None

    async def __anext__(self) -> rtc.AudioFrame:
        if self._i >= len(self._frames):
            self._on_done()  # the session has pushed every frame by now
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        if self._t0 is None:
            self._t0 = loop.time()
        delay = self._t0 + self._audio_s / self._pace - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing, not synchronisation
        frame = self._frames[self._i]
        self._i += 1
        self._audio_s += frame.samples_per_channel / frame.sample_rate
        return frame


class RecordingAgent(Agent):
    """The default STT node, recording every event our stream yields on its way into the session."""

    def __init__(self, on_event) -> None:
        super().__init__(instructions="Transcribe only.")
        self._on_event = on_event

    async def stt_node(self, audio: AsyncIterable[rtc.AudioFrame], model_settings: ModelSettings):
        async for ev in Agent.default.stt_node(self, audio, model_settings):
            self._on_event(ev)
            yield ev


def _two_utterances(speech16k: np.ndarray, gap_s: float = GAP_S) -> tuple[list[rtc.AudioFrame], float]:
    mono48k = upsample_to_stereo(speech16k)[::2]  # L = R
    silence = np.zeros(int(gap_s * RATE) * CHANNELS, dtype=np.int16)
    audio = np.concatenate([mono48k, silence, mono48k, silence])
    return list(iter_frames(audio, RATE, CHANNELS, (20.0,))), len(audio) / CHANNELS / RATE


@pytest.mark.parametrize(
    "setup", ["default", "vad-none", "explicit-vad"], ids=["session-owns", "session-flushes", "both-vads"]
)
async def test_agent_session_drives_plugin(engine, speech16k, setup):
    """default: the session has a VAD and ends turns itself, so the plugin runs no VAD of its own and
    follows the session's flushes (one endpointing owner). vad-none: the same, asked for explicitly.
    explicit-vad: the user asked for the plugin's VAD too; its own endpointing usually ends each
    utterance first and the session's flush then finds nothing left to finish."""
    own_vad = setup == "explicit-vad"
    speech_s = len(speech16k) / 16_000
    frames, total_s = _two_utterances(speech16k)
    if setup == "default":
        plugin = livekit_qwen_asr.STT(engine=engine)
    elif setup == "vad-none":
        plugin = livekit_qwen_asr.STT(engine=engine, vad=None)
    else:
        plugin = livekit_qwen_asr.STT(engine=engine, vad=inference.VAD())
    steps_before = engine.stats.steps

    stt_events: list[stt.SpeechEvent] = []  # what our stream yielded, in order
    transcribed: list[UserInputTranscribedEvent] = []  # what the session reported
    metrics: list[STTMetrics] = []
    user_states: list[str] = []
    errors: list[object] = []
    audio_done = False
    finished = asyncio.Event()

    def check_finished() -> None:
        # Every frame was pushed, the VAD ended both utterances, the stream answered each of those
        # flushes (RECOGNITION_USAGE comes last, after FINAL / END_OF_SPEECH), and the session and
        # the metrics caught up with everything the stream yielded.
        usage = [e for e in stt_events if e.type == stt.SpeechEventType.RECOGNITION_USAGE]
        ended = user_states.count("listening")
        if (
            audio_done
            and ended >= 2
            and user_states[-1] == "listening"
            and len(usage) >= ended
            and stt_events[-1].type == stt.SpeechEventType.RECOGNITION_USAGE
            and len(transcribed) == len(_expected(stt_events))
            and len(metrics) == len(usage)
        ):
            finished.set()

    uses_own_vad: list[bool] = []

    def on_stt_event(ev: stt.SpeechEvent) -> None:
        if not stt_events:
            uses_own_vad.extend(s.uses_own_vad for s in plugin._streams)
        stt_events.append(ev)
        check_finished()

    def on_transcribed(ev: UserInputTranscribedEvent) -> None:
        transcribed.append(ev)
        check_finished()

    def on_user_state(ev: UserStateChangedEvent) -> None:
        user_states.append(ev.new_state)
        check_finished()

    def on_metrics(m) -> None:
        if isinstance(m, STTMetrics):
            metrics.append(m)
            check_finished()

    def on_audio_done() -> None:
        nonlocal audio_done
        audio_done = True
        check_finished()

    plugin.on("metrics_collected", on_metrics)
    plugin.on("error", errors.append)

    session = AgentSession(
        stt=plugin,
        # 0.6 s: the espeak pauses inside the speech (<= 0.4 s) do not split it, the 1.5 s gaps do
        vad=inference.VAD(min_silence_duration=0.6),
        llm=None,  # no reply: the user turn ends in the chat context and nothing else happens
        turn_handling={"turn_detection": "vad", "preemptive_generation": {"enabled": False}},
        user_away_timeout=None,
    )
    session.on("user_input_transcribed", on_transcribed)
    session.on("user_state_changed", on_user_state)
    session.on("error", errors.append)
    session.input.audio = PacedAudioInput(frames, PACE, on_audio_done)

    try:
        async with asyncio.timeout(total_s / PACE + WAIT_TIMEOUT_S):
            await session.start(RecordingAgent(on_stt_event))
            await finished.wait()
        # Snapshot before closing: aclose() flushes the stream once more (its
        # session_close_transcript_timeout), and the random model "transcribes" the trailing silence.
        stt_seen, got = list(stt_events), [(ev.transcript, ev.is_final) for ev in transcribed]
        metrics_seen, states_seen = list(metrics), list(user_states)
    finally:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await session.aclose()
            await plugin.aclose()

    assert not errors, errors
    assert states_seen == ["speaking", "listening", "speaking", "listening"]  # two user turns
    assert uses_own_vad == [own_vad], uses_own_vad  # one stream, with the expected endpointing owner

    # The session reported exactly what our stream emitted, in order: interims and preflights as
    # is_final=False, finals as is_final=True.
    assert got == _expected(stt_seen)
    finals = [i for i, (_, is_final) in enumerate(got) if is_final]
    interims = [i for i, (_, is_final) in enumerate(got) if not is_final]
    assert finals, f"no final transcript reached the session: {got}"
    assert interims and interims[0] < finals[0], got
    assert all(text for text, _ in got)

    # We never flush: the session did, once per VAD end of speech, and each flush closed an utterance.
    kinds = [e.type for e in stt_seen]
    n_final = kinds.count(stt.SpeechEventType.FINAL_TRANSCRIPT)
    assert len(finals) <= n_final <= 2
    assert kinds.count(stt.SpeechEventType.START_OF_SPEECH) == n_final
    assert kinds.count(stt.SpeechEventType.END_OF_SPEECH) == n_final
    assert kinds.count(stt.SpeechEventType.RECOGNITION_USAGE) == 2

    # Usage -> STTMetrics, one per flushed utterance. The metered audio places each flush in the
    # silence after its copy of the speech: the session flushed at VAD end of speech, and the stream
    # lost no audio (48 kHz in, counted at 16 kHz).
    assert len(metrics_seen) == 2, metrics_seen
    assert all(m.streamed and m.audio_duration > 0 for m in metrics_seen), metrics_seen
    assert all(m.label == plugin.label for m in metrics_seen)
    first_flush = metrics_seen[0].audio_duration
    second_flush = first_flush + metrics_seen[1].audio_duration
    if own_vad:  # metered audio is the speech the VAD kept (onset - 0.3 s .. end + 0.3 s), not silence
        for m in metrics_seen:
            assert speech_s - 0.6 <= m.audio_duration <= speech_s + 0.6, metrics_seen
    else:
        tol = 0.05
        assert speech_s - tol <= first_flush <= speech_s + GAP_S + tol, (first_flush, speech_s)
        assert 2 * speech_s + GAP_S - tol <= second_flush <= total_s + tol, (second_flush, total_s)

    assert engine.stats.steps > steps_before


def _expected(stt_events: list[stt.SpeechEvent]) -> list[tuple[str, bool]]:
    """What the session should report for our stream's events (it drops empty finals)."""
    out = []
    for e in stt_events:
        if e.type in TRANSCRIPT_TYPES and e.alternatives:
            is_final = e.type == stt.SpeechEventType.FINAL_TRANSCRIPT
            if is_final and not e.alternatives[0].text:
                continue
            out.append((e.alternatives[0].text, is_final))
    return out


class _LogLines(logging.Handler):
    def __init__(self, on_line) -> None:
        super().__init__(logging.DEBUG)
        self._on_line = on_line

    def emit(self, record: logging.LogRecord) -> None:
        self._on_line(record.getMessage())


async def test_preemptive_replies_start_only_when_the_turn_may_end(engine, speech16k):
    """Preemptive generation on (livekit-agents' default), a recording LLM, the plugin as a user puts
    it in a session. A PREFLIGHT starts a reply that any later, different interim cancels, so it must
    come only when the turn may be ending (here: the session's flush at its VAD's end of speech),
    never while the user is speaking. Per turn: at most two starts (the preflight's, and the final's
    if its text differs), the session uses a preemptive reply, and when the final equals the
    preflight the first start is the one used. The agent's reply then reaches the next utterance's
    prompt as context (chat_context)."""
    reply = "Could you repeat the account number please"
    rec = RecordingEngine(engine)
    plugin = livekit_qwen_asr.STT(engine=rec)
    # one sentence per turn (livekit-agents skips preemptive replies for turns over 10 s of speech),
    # and gaps long enough for each final to land before the next turn begins
    frames, total_s = _two_utterances(speech16k[: int(4.3 * 16_000)], gap_s=5.0)
    timeline: list[tuple] = []  # ("state", s) | ("stt", event) | ("llm",) | ("used",) in order
    errors: list[object] = []
    replies: list[str] = []
    audio_done = asyncio.Event()
    finished = asyncio.Event()

    class TimelineLLM(RecordingLLM):
        def chat(self, **kwargs):
            timeline.append(("llm",))
            return super().chat(**kwargs)

    def check_finished() -> None:
        if len(replies) >= 2 and audio_done.is_set():
            finished.set()

    def on_item(ev) -> None:
        if getattr(ev.item, "role", None) == "assistant":
            replies.append(ev.item.text_content)
            check_finished()

    def on_audio_done() -> None:
        audio_done.set()
        check_finished()

    def on_line(line: str) -> None:
        if line.startswith("using preemptive generation"):
            timeline.append(("used",))

    handler = _LogLines(on_line)
    agents_logger = logging.getLogger("livekit.agents")
    old_level = agents_logger.level
    agents_logger.setLevel(logging.DEBUG)
    agents_logger.addHandler(handler)
    session = AgentSession(
        stt=plugin,
        vad=inference.VAD(min_silence_duration=0.6),
        llm=TimelineLLM(reply),
        turn_handling={"turn_detection": "vad", "preemptive_generation": {"enabled": True}},
        user_away_timeout=None,
    )
    session.on("user_state_changed", lambda ev: timeline.append(("state", ev.new_state)))
    session.on("conversation_item_added", on_item)
    session.on("error", errors.append)
    # real time: each utterance's final (and the replies it starts) lands before the next one begins
    session.input.audio = PacedAudioInput(frames, 1.0, on_audio_done)
    try:
        try:
            async with asyncio.timeout(total_s + WAIT_TIMEOUT_S):
                await session.start(RecordingAgent(lambda ev: timeline.append(("stt", ev))))
                await finished.wait()
        except TimeoutError:
            trace = [e[1].type.value if e[0] == "stt" else "/".join(map(str, e)) for e in timeline]
            pytest.fail(f"{len(replies)} replies; " + " ".join(trace))
        seen = list(timeline)
    finally:
        agents_logger.removeHandler(handler)
        agents_logger.setLevel(old_level)
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await session.aclose()
            await plugin.aclose()

    assert not errors, errors
    trace = [e[1].type.value if e[0] == "stt" else "/".join(map(str, e)) for e in seen]
    user_state = "listening"
    turns: list[list[tuple]] = []
    for entry in seen:
        if entry[0] == "state":
            if entry[1] == "speaking":
                turns.append([])
            user_state = entry[1]
        elif entry[0] == "stt" and entry[1].type == stt.SpeechEventType.PREFLIGHT_TRANSCRIPT:
            assert user_state != "speaking", "a preflight while the user was still speaking"
        if turns:
            turns[-1].append(entry)
    assert len(turns) == 2, " ".join(trace)
    for turn in turns:
        starts = [i for i, e in enumerate(turn) if e[0] == "llm"]
        used = [i for i, e in enumerate(turn) if e[0] == "used"]
        events = [e[1] for e in turn if e[0] == "stt"]
        preflights = [e.alternatives[0].text for e in events if e.type == E.PREFLIGHT_TRANSCRIPT]
        finals = [e.alternatives[0].text for e in events if e.type == E.FINAL_TRANSCRIPT]
        assert preflights and finals, " ".join(trace)
        assert 1 <= len(starts) <= 2 and len(used) == 1, " ".join(trace)  # no churn; one reply adopted
        pre = next(e for e in events if e.type == E.PREFLIGHT_TRANSCRIPT)
        kinds = [e.type for e in events if e.request_id == pre.request_id]  # that utterance's events
        assert E.INTERIM_TRANSCRIPT not in kinds[kinds.index(E.PREFLIGHT_TRANSCRIPT) :]  # nothing stale
        if finals[-1] == preflights[-1]:
            assert len(starts) == 1  # the reply started at the preflight was the one used
    first_turn_prompts = {r.prompt for r in rec.requests[:1]}
    assert not any(reply in p for p in first_turn_prompts)
    assert any(reply in r.prompt for r in rec.requests), "the agent's reply never became context"


async def test_plugin_endpoints_when_the_session_waits_for_the_stt(engine, speech16k):
    """turn_detection="stt": the session ends turns on our END_OF_SPEECH, so the default plugin runs
    its own VAD (the other owner): two utterances, each final followed by end of speech."""
    plugin = livekit_qwen_asr.STT(engine=engine)
    frames, total_s = _two_utterances(speech16k)
    events: list[stt.SpeechEvent] = []
    uses_own_vad: list[bool] = []
    errors: list[object] = []
    done = asyncio.Event()

    def on_event(ev: stt.SpeechEvent) -> None:
        if not events:
            uses_own_vad.extend(s.uses_own_vad for s in plugin._streams)
        events.append(ev)
        if [e.type for e in events].count(stt.SpeechEventType.RECOGNITION_USAGE) >= 2:
            done.set()

    session = AgentSession(
        stt=plugin, llm=None, turn_handling={"turn_detection": "stt"}, user_away_timeout=None
    )
    session.on("error", errors.append)
    session.input.audio = PacedAudioInput(frames, PACE, lambda: None)
    try:
        async with asyncio.timeout(total_s / PACE + WAIT_TIMEOUT_S):
            await session.start(RecordingAgent(on_event))
            await done.wait()
        kinds = [e.type for e in events]
    finally:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await session.aclose()
            await plugin.aclose()
    assert not errors, errors
    assert uses_own_vad == [True]
    speech_s = len(speech16k) / 16_000
    usage = [e.recognition_usage.audio_duration for e in events if e.type == E.RECOGNITION_USAGE]
    assert all(speech_s - 0.6 <= d <= speech_s + 0.6 for d in usage[:2]), usage  # our VAD trimmed the gaps
    ends = [i for i, k in enumerate(kinds) if k == stt.SpeechEventType.END_OF_SPEECH]
    finals = [i for i, k in enumerate(kinds) if k == stt.SpeechEventType.FINAL_TRANSCRIPT]
    assert len(ends) >= 2 and all(f < e for f, e in zip(finals, ends, strict=False))
