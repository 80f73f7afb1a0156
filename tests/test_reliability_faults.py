"""Faults with the real engine: a step that raises or hangs on one stream (the others untouched), the
engine process killed mid-utterance (restarted once, streams resume, finals arrive; killed again: a
clear non-retryable error), and `max_streams`."""

from __future__ import annotations

import asyncio

import psutil
import pytest
from livekit.agents import APIConnectionError, APIConnectOptions, stt

from livekit_qwen_asr import STT, SupervisedEngine, TooManyStreamsError
from livekit_qwen_asr.engine import EngineOptions
from livekit_qwen_asr.errors import EngineError

from .engine_wrappers import RecordingEngine
from .test_stt_stream import SR, collect, stereo_frames

E = stt.SpeechEventType
RETRY = APIConnectOptions(max_retry=3, retry_interval=0.05, timeout=5.0)

pytestmark = pytest.mark.timeout(600)


class _FaultsForOneStream(RecordingEngine):
    """The real engine; the victim stream's 2nd step raises and its 4th hangs (until the timeout)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.victim = ""
        self.victim_calls = 0
        self.injected: list[str] = []

    async def step(self, request):
        if request.stream_id == self.victim:
            self.victim_calls += 1
            if self.victim_calls == 2:
                self.injected.append("raise")
                raise EngineError("injected failure")
            if self.victim_calls == 4:
                self.injected.append("hang")
                await asyncio.Event().wait()  # never set: the stream's step timeout fires
        return await super().step(request)


async def test_a_failing_stream_does_not_disturb_the_others(engine, speech16k):
    """Stream A's steps raise once and hang once; stream B on the same engine sees neither."""
    rec = _FaultsForOneStream(engine)
    plugin = STT(engine=rec, vad=None)
    errors: list[stt.STTError] = []
    plugin.on("error", errors.append)
    a, b = plugin.stream(conn_options=RETRY), plugin.stream(conn_options=RETRY)
    rec.victim = a.stream_id
    tasks = [asyncio.create_task(collect(s)) for s in (a, b)]
    audio = speech16k[: 10 * SR]
    for i in range(5):  # 2 s at a time to both streams, each part stepped before the next
        for f in stereo_frames(audio[i * 2 * SR : (i + 1) * 2 * SR]):
            a.push_frame(f)
            b.push_frame(f)
        if i >= 1:
            await rec.wait_steps(len(rec.results) + 1)
    a.end_input()
    b.end_input()
    events_a, events_b = await asyncio.gather(*tasks)
    assert rec.injected == ["raise", "hang"]
    assert len(errors) == 2 and all(e.recoverable for e in errors)
    for s, events in ((a, events_a), (b, events_b)):
        assert [ev.type for ev in events].count(E.FINAL_TRANSCRIPT) == 1
        last = [r for r in rec.requests if r.stream_id == s.stream_id][-1]
        assert abs(last.audio.shape[0] - 10 * SR) <= 2  # every sample reached the finish step
    # two injected faults, two errors: B (no faults) had none, and its steps all succeeded
    assert len([r for r in rec.requests if r.stream_id == b.stream_id]) >= 2


def _engine_processes(exclude: set[int]) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in exclude and p.name().startswith("VLLM::EngineCore")
    ]


def _kill_engine(exclude: set[int]) -> int:
    """SIGKILL this engine's EngineCore process and its workers (not the shared test engine's)."""
    (core,) = _engine_processes(exclude)
    victims = [core, *core.children(recursive=True)]
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=30)
    return core.pid


async def test_dead_engine_is_restarted_once_then_fails_clearly(tiny_checkpoint, speech16k, engine):
    others = {p.pid for p in psutil.Process().children(recursive=True)}  # the shared engine's
    sup = await SupervisedEngine.start(
        EngineOptions(model=str(tiny_checkpoint), max_model_len=4096, kv_cache_gib=1, dtype="float32"),
        max_restarts=1,
    )
    try:
        rec = RecordingEngine(sup)
        plugin = STT(engine=rec, vad=None)
        errors: list[stt.STTError] = []
        plugin.on("error", errors.append)
        conn = APIConnectOptions(max_retry=3, retry_interval=0.05, timeout=30.0)
        a, b = plugin.stream(conn_options=conn), plugin.stream(conn_options=conn)
        tasks = [asyncio.create_task(collect(s)) for s in (a, b)]
        first, second = speech16k[: 5 * SR], speech16k[5 * SR : 9 * SR]
        for f in stereo_frames(first):
            a.push_frame(f)
            b.push_frame(f)
        await rec.wait_steps(2)

        _kill_engine(others)  # mid-utterance, both streams open
        for f in stereo_frames(second):  # audio keeps coming while the engine restarts
            a.push_frame(f)
            b.push_frame(f)
        a.end_input()
        b.end_input()
        events_a, events_b = await asyncio.gather(*tasks)
        assert sup.restarts == 1 and sup.state == "running"
        assert errors and all(e.recoverable for e in errors)
        for s, events in ((a, events_a), (b, events_b)):
            assert [ev.type for ev in events].count(E.FINAL_TRANSCRIPT) == 1
            last = [r for r in rec.requests if r.stream_id == s.stream_id][-1]
            assert abs(last.audio.shape[0] - 9 * SR) <= 2  # no audio lost across the restart

        # a second death: no more restarts, a clear error that the framework does not retry
        c = plugin.stream(conn_options=conn)
        task = asyncio.create_task(collect(c))
        steps = len(rec.results)
        for f in stereo_frames(first):
            c.push_frame(f)
        await rec.wait_steps(steps + 1)
        _kill_engine(others)
        for f in stereo_frames(second):
            c.push_frame(f)
        c.end_input()
        with pytest.raises(APIConnectionError, match="not restarting"):
            await task
        assert sup.state == "failed" and sup.restarts == 1
        assert not errors[-1].recoverable and "not restarting" in str(errors[-1].error)
    finally:
        await sup.aclose()


async def test_max_streams_rejects_new_streams_with_a_clear_error(engine, speech16k):
    plugin = STT(engine=engine, vad=None, max_streams=2)
    a, b = plugin.stream(), plugin.stream()
    with pytest.raises(TooManyStreamsError, match="max_streams=2"):
        plugin.stream()
    assert plugin.open_streams == 2
    await a.aclose()  # a closed stream frees its slot
    c = plugin.stream()
    for f in stereo_frames(speech16k[: 2 * SR]):
        b.push_frame(f)
    b.end_input()
    await collect(b)  # an ended and drained stream frees its slot too
    d = plugin.stream()
    assert plugin.open_streams == 2
    for s in (b, c, d):
        await s.aclose()
    assert plugin.open_streams == 0
