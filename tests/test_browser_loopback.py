"""Browser path, aiortc to aiortc over loopback: real WebRTC (ICE, DTLS, SRTP, Opus, SCTP data
channel), the real HTTP server, the real STT stream with its silero VAD, the real vLLM engine (tiny
synthetic checkpoint, wrapped only to record requests). The caller does what the page's script does."""

from __future__ import annotations

import json

import aiohttp
import numpy as np
import pytest

from livekit_qwen_asr.browser import BrowserCaptionServer, CaptionHub
from livekit_qwen_asr.samples import upsample_to_stereo
from livekit_qwen_asr.stt import STT

from .engine_wrappers import RecordingEngine
from .webrtc_client import LoopbackCaller

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def serve(engine):
    """`await serve(**hub_options)` starts a server on the shared engine (wrapped to record requests);
    every server started is closed after the test."""
    servers: list[BrowserCaptionServer] = []
    async with aiohttp.ClientSession() as http:

        async def start(**hub_options):
            rec = RecordingEngine(engine)
            hub = CaptionHub(STT(engine=rec), **{"finish_timeout": 60, **hub_options})
            server = BrowserCaptionServer(hub, "127.0.0.1", 0)
            await server.start()
            servers.append(server)
            return server, hub, rec, http

        yield start
        for server in servers:
            await server.aclose()


def _speech(speech16k: np.ndarray, seconds: float) -> np.ndarray:
    return upsample_to_stereo(speech16k[: int(seconds * 16000)], 16000)


def _envelope(x: np.ndarray, rate: int) -> np.ndarray:
    hop = rate // 50  # 20 ms
    n = x.shape[0] // hop
    return np.sqrt((x[: n * hop].astype(np.float64).reshape(n, hop) ** 2).mean(axis=1))


def _best_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Highest Pearson correlation of two envelopes over every overlap offset."""
    best = -1.0
    for lag in range(-len(b) + 25, len(a) - 25):
        x = a[max(lag, 0) : lag + len(b)]
        y = b[max(-lag, 0) : max(-lag, 0) + len(x)]
        if len(x) >= 25 and x.std() > 0 and y.std() > 0:
            best = max(best, float(np.corrcoef(x, y)[0, 1]))
    return best


def _segments_never_revised(captions: list[dict]) -> None:
    finals = set()
    for m in captions:
        assert m["segment"] not in finals, f"caption after the final of its segment: {m}"
        if m["final"]:
            finals.add(m["segment"])


async def test_call_interims_final_hangup_and_state_freed(serve, speech16k):
    server, hub, rec, http = await serve()
    caller = LoopbackCaller(server.url, "alice", _speech(speech16k, 5.0))
    await caller.connect(http)
    hello = caller.messages[0]
    assert hello["call"] == caller.call_id and hello["speaker"] == "alice" and hello["synthetic"] is True

    # speech, then the mic's silence: the VAD ends the utterance and its final arrives unprompted
    await caller.wait_for(lambda ms: any(m["type"] == "caption" and m["final"] for m in ms), 90)
    interims, finals = caller.captions(final=False), caller.captions(final=True)
    assert interims and finals
    assert all(m["call"] == caller.call_id and m["speaker"] == "alice" for m in interims + finals)
    assert interims[0]["segment"] == finals[0]["segment"]  # interims replaced by their final
    assert finals[0]["text"] == interims[-1]["text"] or finals[0]["end"] > interims[-1]["end"]
    seqs = [m["seq"] for m in caller.captions()]
    assert seqs == sorted(seqs)
    stream_id = hub.calls[caller.call_id].stream_id

    await caller.hang_up()
    bye_at = next(i for i, m in enumerate(caller.messages) if m["type"] == "bye")
    assert caller.messages[bye_at]["reason"] == "hung up"
    assert all(m["type"] != "caption" for m in caller.messages[bye_at + 1 :])
    _segments_never_revised(caller.captions())

    await hub.wait_idle()
    assert hub.calls == {} and hub.pending_tasks == 0
    (info,) = hub.history
    assert info.end_reason == "hung up" and info.state == "ended" and info.errors == 0
    assert stream_id and stream_id in rec.released  # the engine's per-stream state was freed
    # every frame the mic sent before hanging up reached the STT (Opus frames: 20 ms each)
    assert info.audio_seconds >= caller.track.recording_seconds
    assert info.audio_seconds <= caller.track.frames_sent * 0.020 + 1e-6

    # the audio the model saw is the speech that was sent: Opus 48 kHz stereo -> 16 kHz mono
    utterance = max((r for r in rec.requests if r.stream_id == stream_id), key=lambda r: r.audio.shape[0])
    sent = speech16k[: int(5.0 * 16000)].astype(np.float32) / 32768
    assert _best_correlation(_envelope(utterance.audio, 16000), _envelope(sent, 16000)) > 0.9


async def test_two_callers_one_engine_and_a_dropped_call_still_delivers_its_final(serve, speech16k):
    server, hub, rec, http = await serve()
    alice = LoopbackCaller(server.url, "alice", _speech(speech16k, 10.0))
    bob = LoopbackCaller(server.url, "bob", _speech(speech16k[16000:], 10.0))
    await alice.connect(http)
    await bob.connect(http)
    assert len(hub.calls) == 2

    # bob's interim reaches alice's page (captions are shared: a meeting)
    await alice.wait_for(lambda ms: any(m["type"] == "caption" and m["call"] == bob.call_id for m in ms), 90)
    open_segment = alice.captions(call=bob.call_id)[-1]["segment"]
    bob_stream = hub.calls[bob.call_id].stream_id

    # bob's tab vanishes mid-utterance: no hang-up message, the connection just closes
    await bob.drop()
    await alice.wait_for(
        lambda ms: any(
            m["type"] == "caption"
            and m["call"] == bob.call_id
            and m["final"]
            and m["segment"] == open_segment
            for m in ms
        ),
        90,
    )
    ended = await hub.wait_call_ended(bob.call_id)
    assert ended is not None and ended.state == "ended" and ended.end_reason
    assert list(hub.calls) == [alice.call_id]
    assert bob_stream in rec.released

    # both streams were served by the one engine
    streams = {r.stream_id for r in rec.requests}
    assert {hub.history[0].stream_id, hub.calls[alice.call_id].stream_id} <= streams
    await alice.hang_up()
    await hub.wait_idle()
    assert hub.calls == {} and hub.pending_tasks == 0
    _segments_never_revised(alice.captions())
    assert hub.stats.calls_started == hub.stats.calls_ended == 2


async def test_server_shutdown_flushes_the_final_to_a_live_call(serve, speech16k):
    server, hub, _, http = await serve()
    caller = LoopbackCaller(server.url, "carol", _speech(speech16k, 10.0))
    await caller.connect(http)
    await caller.wait_for(lambda ms: any(m["type"] == "caption" for m in ms), 90)
    segment = caller.captions()[-1]["segment"]
    await server.aclose()  # mid-utterance: returns once every call is finished and freed
    await caller.wait_for(lambda ms: any(m["type"] == "bye" for m in ms), 10)
    finals = caller.captions(final=True)
    assert [m["segment"] for m in finals] == [segment]
    assert caller.messages[-1] == {"type": "bye", "call": caller.call_id, "reason": "server shutting down"}
    assert hub.calls == {} and hub.pending_tasks == 0
    await caller.drop()


async def test_bad_requests_get_clear_errors(serve, speech16k):
    server, hub, rec, http = await serve()
    caller = LoopbackCaller(server.url, "dave", _speech(speech16k, 1.0))
    caller.pc.addTransceiver(caller.track, direction="sendonly")
    await caller.pc.setLocalDescription(await caller.pc.createOffer())
    sdp = caller.pc.localDescription.sdp
    video = sdp + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=sendonly\r\n"
    recvonly = sdp.replace("a=sendonly", "a=recvonly")
    cases = [
        ("not json", 400, "JSON"),
        ("[1, 2]", 400, "JSON object"),
        (json.dumps({"sdp": sdp, "type": "answer"}), 400, "type 'offer'"),
        (json.dumps({"sdp": video, "type": "offer"}), 400, "audio only"),
        (json.dumps({"sdp": "v=0\r\n", "type": "offer"}), 400, "exactly one audio"),
        (json.dumps({"sdp": recvonly, "type": "offer"}), 400, "no audio"),
    ]
    for body, status, message in cases:
        async with http.post(server.url + "offer", data=body) as res:
            assert res.status == status, body[:40]
            assert message in (await res.json())["error"]
    async with http.post(server.url + "hangup", json={"call": "nope"}) as res:
        assert (await res.json()) == {"ended": False}
    await caller.pc.close()
    await hub.wait_idle()
    assert hub.calls == {} and hub.pending_tasks == 0
    assert hub.stats.calls_rejected == len(cases) - 2  # the two non-JSON bodies never reach the hub


async def test_max_calls_rejects_the_next_call(serve, speech16k):
    server, hub, _, http = await serve(max_calls=1)
    first = LoopbackCaller(server.url, "one", _speech(speech16k, 1.0))
    await first.connect(http)
    second = LoopbackCaller(server.url, "two", _speech(speech16k, 1.0))
    second.pc.addTransceiver(second.track, direction="sendonly")
    await second.pc.setLocalDescription(await second.pc.createOffer())
    offer = {"sdp": second.pc.localDescription.sdp, "type": "offer"}
    async with http.post(server.url + "offer", json=offer) as res:
        assert res.status == 503
        assert "max_calls" in (await res.json())["error"]
    async with http.get(server.url + "api/state") as res:
        state = await res.json()
    assert [c["label"] for c in state["calls"]] == ["one"] and state["stats"]["calls_rejected"] == 1
    await second.pc.close()
    await first.hang_up()
    await hub.wait_idle()
    assert hub.calls == {} and hub.pending_tasks == 0
