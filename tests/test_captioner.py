"""`RoomCaptioner` end to end: real audio tracks, a real vLLM engine, a room double.

No LiveKit server exists here, so the room is `tests/room_double.py` (it mirrors exactly the rtc
surface the captioner uses; see its docstring). The audio is real: each participant's microphone is an
`rtc.AudioSource` -> `rtc.LocalAudioTrack`, and the captioner reads it through `rtc.AudioStream`,
paced at real time by `AudioSource.capture_frame`. The speech is espeak-ng (four voices) made at test
time; the engine is the shared tiny random-weight checkpoint, so transcripts are random tokens and
nothing here looks at words, only at what was published where, when, and how often.

Utterances are sentences of ~2.3-2.7 s with no inner pause over 50 ms, separated by 1.5 s of
silence, so the stream's endpointing (default 500 ms of silence) must cut exactly one utterance per
sentence; a participant who leaves or mutes mid-sentence cuts that sentence short, and its final must
still be published.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from livekit import rtc

import livekit_qwen_asr
from livekit_qwen_asr import EngineOptions, EngineStats, RequestRejectedError, StepRequest, StepResult
from livekit_qwen_asr.captioner import Caption, RoomCaptioner
from livekit_qwen_asr.samples import iter_frames, read_wav

from .engine_wrappers import RecordingEngine
from .room_double import RemoteTrackPublicationDouble, RoomDouble, TextStreamRecord

REPO = Path(__file__).resolve().parents[1]
RATE = 16_000
LEAD_S = 0.3  # silence before the first sentence
GAP_S = 1.5  # silence between sentences: one utterance each
TAIL_S = 1.2  # silence after the last sentence: the endpoint fires before the track ends
SCENARIO_TIMEOUT_S = 150.0
STALL_S = 1.0  # one event-loop stall in the meeting (the talkers' queues hold 2 s)

VOICES = {"alice": "en-us", "bob": "en-gb", "carol": "en-us+f3", "dave": "en-gb+m3"}
SENTENCES = (
    "The quick brown fox jumps over the lazy dog",
    "Please send the report before noon today",
    "We will meet again next week in the big room",
)


# -- audio -----------------------------------------------------------------------------------------
def _espeak(voice: str, text: str, out_dir: Path, name: str) -> np.ndarray:
    raw, wav = out_dir / f"{name}.raw.wav", out_dir / f"{name}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "170", "-w", str(raw), text], check=True)
    subprocess.run(
        [
            "sox",
            str(raw),
            "-r",
            "16000",
            "-c",
            "1",
            "-b",
            "16",
            "-e",
            "signed-integer",
            "-t",
            "wavpcm",
            str(wav),
        ],
        check=True,
    )
    data, rate, channels = read_wav(wav)
    assert (rate, channels) == (RATE, 1)
    return _trim(data)


def _trim(x: np.ndarray, threshold: int = 300) -> np.ndarray:
    """Cut leading/trailing silence (10 ms frames whose peak is under `threshold`)."""
    n = len(x) // 160 * 160
    voiced = np.nonzero(np.abs(x[:n].astype(np.int32)).reshape(-1, 160).max(axis=1) > threshold)[0]
    return x[voiced[0] * 160 : (voiced[-1] + 1) * 160]


def _max_inner_gap_s(x: np.ndarray, threshold: int = 300) -> float:
    n = len(x) // 160 * 160
    voiced = np.nonzero(np.abs(x[:n].astype(np.int32)).reshape(-1, 160).max(axis=1) > threshold)[0]
    return float((np.diff(voiced).max() - 1) * 0.01) if len(voiced) > 1 else 0.0


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, list[np.ndarray]]:
    """Per participant, the three sentences in its own voice (16 kHz mono int16, trimmed)."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{missing} not installed (apt-get install espeak-ng sox)")
    out = tmp_path_factory.mktemp("voices")
    voices = {
        who: [_espeak(voice, s, out, f"{who}{i}") for i, s in enumerate(SENTENCES)]
        for who, voice in VOICES.items()
    }
    for sentences in voices.values():
        for s in sentences:
            # the premise of the utterance counts: no pause inside a sentence comes near the endpoint
            assert 1.8 < len(s) / RATE < 3.5 and _max_inner_gap_s(s) < 0.1
    return voices


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.int16)


# -- participants ----------------------------------------------------------------------------------
@dataclass
class Spoken:
    started_at: float  # time.monotonic() when its first sample plays out of the source
    ended_at: float  # ... when its last sample does (or when it was cut short)
    complete: bool


@dataclass
class Talker:
    """A remote participant whose microphone is a real `rtc.AudioSource` -> `rtc.LocalAudioTrack`."""

    room: RoomDouble
    identity: str
    client_protocol: int = 3
    source: rtc.AudioSource = field(init=False)
    track: rtc.LocalAudioTrack = field(init=False)
    publication: RemoteTrackPublicationDouble | None = None
    spoken: list[Spoken] = field(default_factory=list)
    joined_at: float = 0.0

    def __post_init__(self) -> None:
        # A queue of 2 s: when the event loop stalls (a loaded CI machine), the source keeps playing
        # queued audio; a short queue runs dry and the track fills the stall with silence, which can
        # split a sentence in two (measured: a 100 ms queue and a 0.6 s stall put 0.5 s of silence
        # into the audio). Times stay exact: they count the queued audio (`_playout_time`).
        self.source = rtc.AudioSource(RATE, 1, queue_size_ms=2000)
        self.track = rtc.LocalAudioTrack.create_audio_track(f"{self.identity}-mic", self.source)

    def join(self, *, auto_subscribe: bool = True) -> None:
        self.joined_at = time.monotonic()
        participant = self.room.connect_participant(self.identity, client_protocol=self.client_protocol)
        self.publication = self.room.publish_track(participant, self.track, auto_subscribe=auto_subscribe)

    @property
    def participant(self):
        return self.room.remote_participants[self.identity]

    def _playout_time(self) -> float:
        return time.monotonic() + self.source.queued_duration

    async def play(self, audio: np.ndarray) -> tuple[float, float]:
        start = self._playout_time()
        for frame in iter_frames(audio, RATE, 1, (20.0,)):
            await self.source.capture_frame(frame)  # paced at real time: pacing, not synchronisation
        return start, self._playout_time()

    async def say(self, sentence: np.ndarray, *, cut_at: float | None = None) -> None:
        """Speak a sentence, or its first `cut_at` fraction (the caller then leaves or mutes)."""
        audio = sentence if cut_at is None else sentence[: int(len(sentence) * cut_at)]
        start, end = await self.play(audio)
        if cut_at is not None:
            await self.source.wait_for_playout()  # the caller leaves or mutes after its last sample
        self.spoken.append(Spoken(start, end, cut_at is None))

    async def pause(self, seconds: float) -> None:
        await self.play(_silence(seconds))

    def mark_cut(self) -> None:
        """The last (cut) sentence ends now, when the participant leaves or mutes."""
        self.spoken[-1].ended_at = time.monotonic()

    async def aclose(self) -> None:
        await self.source.aclose()


# -- helpers over what the room double recorded ----------------------------------------------------
def _finals(records: list[TextStreamRecord], identity: str | None = None) -> list[TextStreamRecord]:
    return [r for r in records if r.final and (identity is None or r.sender_identity == identity)]


def _overlapping_participant_pairs(engine, streams_of: dict[str, list[str]]) -> set[frozenset[str]]:
    """Pairs of participants whose engine steps ran at the same time (from engine.stats.recent)."""
    who = {sid: identity for identity, sids in streams_of.items() for sid in sids}
    steps = sorted((s for s in engine.stats.recent if s[0] in who), key=lambda s: s[1])
    pairs: set[frozenset[str]] = set()
    for i, (sid, _start, end) in enumerate(steps):
        for sid2, start2, _end2 in steps[i + 1 :]:
            if start2 >= end:
                break
            if who[sid2] != who[sid]:
                pairs.add(frozenset((who[sid], who[sid2])))
    return pairs


# -- the meeting -----------------------------------------------------------------------------------
async def test_four_participants_overlapping_speech(engine, speech):
    """alice, bob, carol talk at once from the start; dave (an old client: protocol 2) joins while
    they talk, his microphone published without auto-subscribe (the captioner subscribes). bob mutes
    mid-sentence and unmutes for a third sentence; carol leaves mid-sentence (only
    participant_disconnected: her track is never unpublished); dave unpublishes at the end."""
    room = RoomDouble()
    plugin = livekit_qwen_asr.STT(engine=engine)  # endpointing: the bundled VAD, 500 ms of silence
    alice, bob, carol = (Talker(room, name) for name in ("alice", "bob", "carol"))
    dave = Talker(room, "dave", client_protocol=2)
    for t in (alice, bob, carol):
        t.join()

    captioner = RoomCaptioner(room, plugin)
    captions: list[Caption] = []
    captioner.on("caption", captions.append)
    captioner.on("track_started", lambda info: room.changed.notify())
    captioner.on("track_ended", lambda info: room.changed.notify())
    captioner.start()
    t0 = time.monotonic()
    live = sorted(i.participant_identity for i in captioner.active_tracks.values())
    assert live == ["alice", "bob", "carol"], live
    steps_before = engine.stats.steps
    published = room.local_participant.closed_streams
    dave_tasks: list[asyncio.Task] = []
    screen_share: list[RemoteTrackPublicationDouble] = []

    async def dave_joins_and_talks() -> None:
        dave.join(auto_subscribe=False)
        screen_share.append(
            room.publish_track(
                dave.participant, _silent_track(), source=rtc.TrackSource.SOURCE_SCREENSHARE_AUDIO
            )
        )
        # captioned at once: the captioner subscribes, the subscription lands on the next iteration
        await room.changed.wait_for(lambda: dave.publication.sid in captioner.active_tracks, 5.0)
        await dave.pause(LEAD_S)
        await dave.say(speech["dave"][0])
        await dave.pause(GAP_S)
        # a stalled event loop mid-sentence (a busy machine): no silence may enter his audio, no
        # frame may be lost, and the sentence stays one utterance
        start, _ = await dave.play(speech["dave"][1][: RATE // 2])
        time.sleep(STALL_S)
        _, end = await dave.play(speech["dave"][1][RATE // 2 :])
        dave.spoken.append(Spoken(start, end, True))
        await dave.pause(TAIL_S)

    async def alice_talks() -> None:
        await alice.pause(LEAD_S)
        start, _ = await alice.play(speech["alice"][0][:RATE])
        await alice.source.wait_for_playout()  # dave joins 1 s into her sentence
        dave_tasks.append(asyncio.create_task(dave_joins_and_talks()))
        _, end = await alice.play(speech["alice"][0][RATE:])
        alice.spoken.append(Spoken(start, end, True))
        await alice.pause(GAP_S)
        await alice.say(speech["alice"][1])
        await alice.pause(TAIL_S)

    async def bob_talks() -> None:
        await bob.pause(LEAD_S)
        await bob.say(speech["bob"][0])
        await bob.pause(GAP_S)
        await bob.say(speech["bob"][1], cut_at=0.5)
        room.set_muted(bob.publication, True)
        bob.mark_cut()
        await bob.pause(0.8)  # muted: nobody listens
        room.set_muted(bob.publication, False)
        await bob.say(speech["bob"][2])
        await bob.pause(TAIL_S)

    async def carol_talks() -> None:
        await carol.pause(LEAD_S)
        await carol.say(speech["carol"][0])
        await carol.pause(GAP_S)
        await carol.say(speech["carol"][1], cut_at=0.5)
        room.disconnect_participant(carol.participant, unpublish_tracks=False)
        carol.mark_cut()

    expected = {"alice": 2, "bob": 3, "carol": 2, "dave": 2}
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            await asyncio.gather(alice_talks(), bob_talks(), carol_talks())
            await asyncio.gather(*dave_tasks)
            # every utterance's final, then the ends of carol's, bob's first and dave's tracks
            await room.changed.wait_for(
                lambda: all(len(_finals(published, who)) >= n for who, n in expected.items()), 60.0
            )
            room.unpublish_track(dave.publication)
            await room.changed.wait_for(lambda: len(captioner.history) == 3, 60.0)
            live = sorted(i.participant_identity for i in captioner.active_tracks.values())
            assert live == ["alice", "bob"], live
    finally:
        await captioner.aclose()  # flushes alice's and bob's tracks: silence, so no final
        for t in (alice, bob, carol, dave):
            await t.aclose()
        await plugin.aclose()

    stats = captioner.stats
    assert stats.publish_errors == stats.stream_errors == stats.finish_timeouts == 0, stats
    assert stats.frames_dropped == 0 and stats.tracks_failed == 0, stats
    assert stats.tracks_started == stats.tracks_finished == 5, stats  # bob twice (mute, unmute)
    assert not captioner.active_tracks and not captioner.finishing
    reasons = {(i.participant_identity, i.end_reason) for i in captioner.history}
    assert reasons == {
        ("carol", "participant disconnected"),
        ("bob", "track muted"),
        ("dave", "track unsubscribed"),
        ("alice", "captioner closed"),
        ("bob", "captioner closed"),
    }, reasons
    assert screen_share and screen_share[0].sid not in {i.track_sid for i in captioner.history}

    # Exactly one final per utterance per participant, nothing after (aclose published no extra).
    talkers = {t.identity: t for t in (alice, bob, carol, dave)}
    got = {who: len(_finals(published, who)) for who in talkers}
    assert got == expected, _timeline(published, talkers, t0)
    assert stats.finals_published == sum(expected.values())
    assert [len(t.spoken) for t in talkers.values()] == [expected[w] for w in talkers]

    # Every text stream: topic, speaker, that speaker's track, one write of the full segment text.
    assert len(published) == len(room.local_participant.text_streams)  # all closed
    for r in published:
        t = talkers[r.sender_identity]
        assert r.topic == "lk.transcription"
        assert r.track_id == t.publication.sid, (r.sender_identity, r.track_id)
        assert len(r.chunks) == 1 and r.closed_at is not None
        assert set(r.attributes) == {"lk.segment_id", "lk.transcribed_track_id", "lk.transcription_final"}
    assert stats.interims_published == sum(not r.final for r in published) > 0

    # Segments: a new id per utterance; interims under their final's id and before it; the final is
    # the last text sent for its segment.
    finals = _finals(published)
    assert len({r.segment_id for r in finals}) == len(finals)
    final_index = {r.segment_id: published.index(r) for r in finals}
    for i, r in enumerate(published):
        assert r.segment_id in final_index, f"segment {r.segment_id} never got a final"
        assert i <= final_index[r.segment_id]
        f = published[final_index[r.segment_id]]
        assert (r.sender_identity, r.track_id) == (f.sender_identity, f.track_id)
    # One segment at a time per speaker: its interims form one run per segment. A final may come
    # after the speaker's next segment began only across a mute (bob): the muted stream finishes
    # while the unmuted one runs (seen on CI when the finish step is slow).
    for who in talkers:
        mine = [r.segment_id for r in published if r.sender_identity == who and not r.final]
        runs = [seg for seg, _ in itertools.groupby(mine)]
        assert len(runs) == len(set(runs)), runs
    assert Counter((c.participant_identity, c.segment_id, c.text, c.final) for c in captions) == Counter(
        (r.sender_identity, r.segment_id, r.text, r.final) for r in published
    )

    # The late joiner (an old client) was captioned; legacy packets mirror the text streams, and only
    # went out while he was in the room.
    legacy = room.local_participant.transcriptions
    assert legacy and stats.legacy_published == len(legacy)
    streams = {(r.sender_identity, r.track_id, r.segment_id, r.text, r.final) for r in published}
    for rec in legacy:
        tr = rec.transcription
        (seg,) = tr.segments
        assert (tr.participant_identity, tr.track_sid, seg.id, seg.text, seg.final) in streams
        assert rec.at >= dave.joined_at
    assert len(legacy) == sum(r.closed_at >= dave.joined_at for r in published)  # dave never left

    # The streams shared the engine and their steps ran together.
    streams_of: dict[str, list[str]] = {}
    for info in captioner.history:
        streams_of.setdefault(info.participant_identity, []).extend(info.stream_ids)
    assert all(sid.startswith("QS_") for sids in streams_of.values() for sid in sids)
    pairs = _overlapping_participant_pairs(engine, streams_of)
    assert pairs, "no two participants' engine steps overlapped"
    assert engine.stats.steps > steps_before

    # End of speech -> FINAL published, per utterance (report; bounded only loosely against hangs).
    print("\nend of speech -> FINAL published (s), endpointing 500 ms; overlapping pairs:",
          sorted(tuple(sorted(p)) for p in pairs))  # fmt: skip
    for who, t in talkers.items():
        delays = [f.closed_at - s.ended_at for f, s in zip(_finals(published, who), t.spoken, strict=True)]
        kinds = ["full" if s.complete else "cut" for s in t.spoken]
        print(f"  {who:6s}", "  ".join(f"{k} {d:5.2f}" for k, d in zip(kinds, delays, strict=True)))
        assert all(0.0 < d < 20.0 for d in delays), (who, delays)
    overhead = max(c.published_at - c.received_at for c in captions if c.final)
    print(f"  FINAL event -> published, at most: {overhead * 1000:.1f} ms")


def _timeline(published: list[TextStreamRecord], talkers: dict[str, Talker], t0: float) -> str:
    """What was spoken and published when (seconds since the start), for failure messages."""
    lines = []
    for who, t in talkers.items():
        spans = ", ".join(f"{s.started_at - t0:.2f}-{s.ended_at - t0:.2f}" for s in t.spoken)
        lines.append(f"{who} spoke {spans}")
        for r in published:
            if r.sender_identity == who:
                kind = "FINAL  " if r.final else "interim"
                lines.append(f"  {r.closed_at - t0:6.2f} {kind} {r.segment_id} {len(r.text):3d} chars")
    return "\n".join(lines)


def _silent_track() -> rtc.LocalAudioTrack:
    return rtc.LocalAudioTrack.create_audio_track("screen-audio", rtc.AudioSource(RATE, 1))


# -- a failing STT stream is replaced, counted and logged ------------------------------------------
async def test_failed_streams_are_replaced_or_given_up(engine, speech, caplog):
    """The engine rejects steps (not retryable), so STT streams fail. erin's first step is rejected:
    the captioner logs and counts it, opens a new stream on her track, and captioning goes on. Every
    step of frank's is rejected: after `max_stream_restarts` his track is given up, logged, counted,
    and freed."""
    rejected: list[str] = []

    def owner(stream_id: str) -> str:
        infos = list(captioner.active_tracks.values())
        return next((i.participant_identity for i in infos if stream_id in i.stream_ids), "")

    def fault(attempt: int, request) -> BaseException | None:
        who = owner(request.stream_id)
        if who == "frank" or (who == "erin" and not any(owner(r) == "erin" for r in rejected)):
            rejected.append(request.stream_id)
            return RequestRejectedError("injected rejection")
        return None

    room = RoomDouble()
    plugin = livekit_qwen_asr.STT(engine=RecordingEngine(engine, fault=fault))
    erin, frank = Talker(room, "erin"), Talker(room, "frank")
    erin.join()
    frank.join()
    captioner = RoomCaptioner(room, plugin, max_stream_restarts=1)
    captioner.on("track_ended", lambda info: room.changed.notify())
    captioner.start()
    published = room.local_participant.closed_streams

    async def talk(t: Talker, sentences: list[np.ndarray]) -> None:
        await t.pause(LEAD_S)
        await t.say(sentences[0])
        await t.pause(GAP_S)
        await t.say(sentences[1])
        await t.pause(TAIL_S)

    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            await asyncio.gather(talk(erin, speech["alice"]), talk(frank, speech["bob"]))
            await room.changed.wait_for(lambda: _finals(published, "erin") and captioner.history, 60.0)
            (erin_info,) = captioner.active_tracks.values()
            (frank_info,) = captioner.history
    finally:
        await captioner.aclose()
        await erin.aclose()
        await frank.aclose()
        await plugin.aclose()

    stats = captioner.stats
    # erin: 1 failure, 1 restart; frank: 2 failures, 1 restart, then given up
    assert (stats.stream_errors, stats.stream_restarts, stats.tracks_failed) == (3, 2, 1), stats
    assert len(erin_info.stream_ids) == 2 and not erin_info.failed
    assert erin_info.stream_ids[0] in rejected and erin_info.stream_ids[1] not in rejected
    assert frank_info.failed and frank_info.end_reason == "STT failed" and len(frank_info.stream_ids) == 2
    assert set(frank_info.stream_ids) <= set(rejected)
    assert _finals(published, "erin") and not [r for r in published if r.sender_identity == "frank"]
    assert stats.publish_errors == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "STT stream failed for erin (restarting)" in messages
    assert "STT stream failed for frank (giving up)" in messages
    # every segment that was opened got its final
    assert {r.segment_id for r in published} == {r.segment_id for r in _finals(published)}


# -- entrypoints -----------------------------------------------------------------------------------
def test_agent_help():
    """agent.py is a LiveKit Agents worker: it cannot connect here, but it imports and its CLI works."""
    proc = subprocess.run(
        [sys.executable, "agent.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for word in ("--model", "--endpointing-ms", "QWEN_ASR_MODEL", "dev", "start"):
        assert word in proc.stdout, (word, proc.stdout)


@pytest.mark.parametrize("name", ["meeting_captions", "voice_agent"])
def test_examples_import(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main: Callable = module.main
    assert callable(main)


class _LoopRecordingEngine:
    """A stand-in engine for `LoopThreadEngine`: records the loop each step runs on; a step
    for stream "hang" waits forever, so cancellation can be observed."""

    model_name = "fake"
    is_synthetic = True
    codec = None

    def __init__(self) -> None:
        self.stats = EngineStats()
        self.loops: list[asyncio.AbstractEventLoop] = []
        self.cancelled = threading.Event()
        self.closed = False

    def base_prompt(self, context: str) -> str:
        return f"prompt:{context}"

    async def step(self, request):
        self.loops.append(asyncio.get_running_loop())
        if request.stream_id == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        now = time.monotonic()
        return StepResult("text", 1, 0, 1, request.audio.shape[0] / RATE, now, now)

    async def aclose(self) -> None:
        self.closed = True


async def test_loop_thread_engine_hands_steps_across_loops():
    """The worker's engine lives on its own loop thread (prewarm has no loop; each job has its own):
    steps awaited on this loop run on the engine's loop, and cancelling the caller cancels them there."""
    from livekit_qwen_asr.loop_thread import LoopThreadEngine

    fake = _LoopRecordingEngine()

    async def start(options):
        return fake

    host = LoopThreadEngine(EngineOptions(model="fake"), start=start)
    try:
        assert host.wait_ready(10) is fake and host.base_prompt("x") == "prompt:x"
        audio = np.zeros(RATE, np.float32)
        result = await host.step(StepRequest("p", audio, 4, "s1"))
        assert result.text == "text" and fake.loops == [host._loop]
        assert host._loop is not asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await host.step(StepRequest("p", audio, 4, "hang"))
        assert await asyncio.to_thread(fake.cancelled.wait, 10)
    finally:
        host.close()
    assert fake.closed
