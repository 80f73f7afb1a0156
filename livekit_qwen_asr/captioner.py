"""Live captions for a whole room: every remote participant's microphone, one STT stream per track.

`RoomCaptioner(room, stt).start()` captions the microphone tracks already subscribed and every one
subscribed later (a participant who joins while others talk is captioned at once). Each track gets an
`rtc.AudioStream` (16 kHz mono, resampled natively) and its own STT stream; all streams come from the
one `STT`, so they share its engine and their steps batch together.

What is published (the LiveKit transcription protocol, as livekit-agents' RoomIO publishes it):
a text stream per interim and per final on topic `lk.transcription`, `sender_identity` = the speaker,
attributes `lk.segment_id` (the STT utterance's `request_id`: new per utterance), `lk.transcribed_track_id`
(the track sid) and `lk.transcription_final` ("false" / "true"). Every interim re-sends the full segment
text; the final repeats it with "true". While a standard participant with client protocol < 3 is in the
room, the same captions also go out as legacy `rtc.Transcription` packets (`legacy_transcription`).

Lifecycle: track unsubscribed / unpublished, participant disconnected, track muted, the track's audio
ending, or the room disconnecting ends the track: its STT stream's input is ended (the finish step runs
on the audio so far), the final is published, then the audio stream and STT stream are closed. A track
that is unmuted is captioned again (new STT stream, new segments). A failed STT stream is logged,
counted, and replaced (up to `max_stream_restarts` times per track); an open segment is closed with
its last text first, so no client is left with a dangling interim.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from livekit import rtc
from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions, stt, utils
from livekit.agents.types import (
    ATTRIBUTE_TRANSCRIPTION_FINAL,
    ATTRIBUTE_TRANSCRIPTION_SEGMENT_ID,
    ATTRIBUTE_TRANSCRIPTION_TRACK_ID,
    CLIENT_PROTOCOL_TRANSCRIPTION_STREAMS,
    NOT_GIVEN,
    TOPIC_TRANSCRIPTION,
    NotGivenOr,
)
from livekit.agents.utils import is_given

from .log import logger
from .tasks import OwnedTasks

DEFAULT_TRACK_SOURCES: tuple[int, ...] = (
    rtc.TrackSource.SOURCE_MICROPHONE,
    rtc.TrackSource.SOURCE_UNKNOWN,  # some server-side SDKs publish microphones without a source
)

CaptionerEvent = Literal["caption", "track_started", "track_ended"]


@dataclass(frozen=True)
class Caption:
    """One published caption (emitted as the captioner's "caption" event after publishing)."""

    participant_identity: str
    track_sid: str
    segment_id: str
    text: str
    final: bool
    language: str
    received_at: float  # time.monotonic() when the STT event reached the captioner
    published_at: float  # time.monotonic() when the text stream was closed


@dataclass
class CaptionerStats:
    """Counters for operations and tests. Errors are also logged; nothing is dropped silently."""

    tracks_started: int = 0
    tracks_finished: int = 0
    tracks_failed: int = 0  # gave up after max_stream_restarts failed STT streams
    interims_published: int = 0
    interims_superseded: int = 0  # replaced by a newer interim of the same segment before publishing
    finals_published: int = 0
    legacy_published: int = 0  # rtc.Transcription packets (clients with protocol < 3)
    publish_errors: int = 0
    stream_errors: int = 0
    stream_restarts: int = 0
    frames_dropped: int = 0  # audio that arrived while the track's STT stream was failing
    finish_timeouts: int = 0  # a track's final did not arrive within finish_timeout


@dataclass
class TrackCaptionInfo:
    """Record of one captioned track (live in `active_tracks`, final in `history`)."""

    participant_identity: str
    track_sid: str
    stream_ids: list[str] = field(default_factory=list)  # the STT streams used (several after restarts)
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    end_reason: str = ""
    segments: int = 0  # segments opened (first interim or final)
    interims_published: int = 0
    finals_published: int = 0
    failed: bool = False


@dataclass(frozen=True)
class _Item:
    segment_id: str
    text: str
    final: bool
    language: str
    received_at: float


class _Outbox:
    """Per-track publish queue. A queued interim is replaced by a newer interim of the same segment
    (publishing lags behind recognition under load: only the latest text matters); finals are never
    replaced or reordered."""

    def __init__(self) -> None:
        self._items: collections.deque[_Item] = collections.deque()
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, item: _Item) -> bool:
        """Queue an item; True when it replaced a queued interim."""
        replaced = False
        last = self._items[-1] if self._items else None
        if last is not None and not item.final and not last.final and last.segment_id == item.segment_id:
            self._items[-1] = item
            replaced = True
        else:
            self._items.append(item)
        self._ready.set()
        return replaced

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> _Item | None:
        """The next item, or None once closed and drained."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class RoomCaptioner(rtc.EventEmitter[CaptionerEvent]):
    """Captions every remote participant's microphone tracks in a connected room.

    Events (sync callbacks): "caption" (`Caption`, after each publish), "track_started" and
    "track_ended" (`TrackCaptionInfo`).
    """

    def __init__(
        self,
        room: rtc.Room,
        stt: stt.STT,
        *,
        language: NotGivenOr[str | None] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        sample_rate: int = 16_000,
        track_sources: Iterable[int] = DEFAULT_TRACK_SOURCES,
        participant_filter: Callable[[rtc.RemoteParticipant], bool] | None = None,
        subscribe: bool = True,
        legacy_transcription: bool | Literal["auto"] = "auto",
        finish_timeout: float = 30.0,
        max_stream_restarts: int = 3,
        history_size: int = 1000,
    ) -> None:
        """
        Args:
            room: a connected room (the captioner publishes as its local participant).
            stt: a streaming STT (e.g. `livekit_qwen_asr.STT`); every track gets `stt.stream(...)`.
            language: passed to `stt.stream()` (default: the STT's own setting).
            conn_options: passed to `stt.stream()` (retries of the STT stream itself).
            sample_rate: rate the track audio is resampled to by `rtc.AudioStream` (16 kHz: what the
                model uses; any rate works, the stream converts).
            track_sources: audio track sources to caption (microphones; screen-share audio is not).
            participant_filter: caption only participants for which this returns True.
            subscribe: subscribe to matching audio tracks that are published but not subscribed
                (rooms joined without auto-subscribe).
            legacy_transcription: also publish `rtc.Transcription` packets: "auto" = while a standard
                participant with client protocol < 3 is in the room; True = always; False = never.
            finish_timeout: how long a track that ends may take to deliver and publish its final.
            max_stream_restarts: failed STT streams replaced per track before the track is given up.
            history_size: ended tracks kept in `history`.
        """
        super().__init__()
        if not stt.capabilities.streaming:
            raise ValueError("RoomCaptioner needs a streaming STT")
        self._room = room
        self._stt = stt
        self._language = language
        self._conn_options = conn_options
        self._sample_rate = sample_rate
        self._sources = frozenset(track_sources)
        self._filter = participant_filter
        self._subscribe = subscribe
        self._legacy = legacy_transcription
        self._finish_timeout = finish_timeout
        self._max_restarts = max_stream_restarts
        self._tracks: dict[str, _TrackCaptioner] = {}
        self._finishing: set[_TrackCaptioner] = set()
        self._tasks = OwnedTasks("captioner")
        self._history: collections.deque[TrackCaptionInfo] = collections.deque(maxlen=history_size)
        self._stats = CaptionerStats()
        self._started = False
        self._closed = False
        self._handlers: dict[str, Callable[..., None]] = {
            "track_published": self._on_track_published,
            "track_subscribed": self._on_track_subscribed,
            "track_unsubscribed": self._on_track_unsubscribed,
            "track_unpublished": self._on_track_unpublished,
            "track_muted": self._on_track_muted,
            "track_unmuted": self._on_track_unmuted,
            "participant_disconnected": self._on_participant_disconnected,
            "disconnected": self._on_room_disconnected,
        }

    # -- public ----------------------------------------------------------------------------------
    @property
    def stats(self) -> CaptionerStats:
        return self._stats

    @property
    def active_tracks(self) -> dict[str, TrackCaptionInfo]:
        """Tracks being captioned now, by track sid."""
        return {sid: tc.info for sid, tc in self._tracks.items()}

    @property
    def history(self) -> list[TrackCaptionInfo]:
        """Tracks that ended (oldest first, at most `history_size`)."""
        return list(self._history)

    @property
    def finishing(self) -> list[TrackCaptionInfo]:
        """Tracks that ended and are still delivering their final."""
        return [tc.info for tc in self._finishing]

    def start(self) -> None:
        """Register the room callbacks and caption the matching tracks already in the room.
        Call from the room's event loop."""
        if self._started:
            return
        self._started = True
        for event, handler in self._handlers.items():
            self._room.on(event, handler)  # type: ignore[arg-type]
        for participant in list(self._room.remote_participants.values()):
            for publication in list(participant.track_publications.values()):
                self._consider(participant, publication)

    async def aclose(self, *, flush: bool = True) -> None:
        """Stop captioning. With `flush`, every track's pending utterance is finished and its final
        published first (bounded by `finish_timeout`); without, everything is cancelled now."""
        if self._closed:
            return
        self._closed = True
        for event, handler in self._handlers.items():
            self._room.off(event, handler)  # type: ignore[arg-type]
        for sid in list(self._tracks):
            self._end_track(sid, "captioner closed", abort=not flush)
        await self._tasks.wait()

    # -- room callbacks (sync: livekit rejects async callbacks) ----------------------------------
    def _on_track_published(self, publication: rtc.RemoteTrackPublication, participant) -> None:
        self._consider(participant, publication)

    def _on_track_subscribed(self, track: rtc.Track, publication, participant) -> None:
        self._consider(participant, publication)

    def _on_track_unsubscribed(self, track: rtc.Track, publication, participant) -> None:
        self._end_track(publication.sid, "track unsubscribed")

    def _on_track_unpublished(self, publication, participant) -> None:
        self._end_track(publication.sid, "track unpublished")

    def _on_track_muted(self, participant, publication) -> None:
        self._end_track(publication.sid, "track muted")

    def _on_track_unmuted(self, participant, publication) -> None:
        if self._room.remote_participants.get(participant.identity) is participant:
            self._consider(participant, publication)

    def _on_participant_disconnected(self, participant) -> None:
        for sid, tc in list(self._tracks.items()):
            if tc.info.participant_identity == participant.identity:
                self._end_track(sid, "participant disconnected")

    def _on_room_disconnected(self, *args: Any) -> None:
        for sid in list(self._tracks):
            self._end_track(sid, "room disconnected")

    # -- track lifecycle -------------------------------------------------------------------------
    def _wanted(self, participant, publication) -> bool:
        return (
            publication.kind == rtc.TrackKind.KIND_AUDIO
            and publication.source in self._sources
            and (self._filter is None or self._filter(participant))
        )

    def _consider(self, participant, publication) -> None:
        """Start captioning a publication if it matches, is subscribed and unmuted; subscribe to it
        if it matches and is not subscribed."""
        if self._closed or not self._wanted(participant, publication):
            return
        if not publication.subscribed:
            if self._subscribe:
                publication.set_subscribed(True)  # "track_subscribed" follows
            return
        track = publication.track
        if track is None or publication.muted or publication.sid in self._tracks:
            return
        try:
            tc = _TrackCaptioner(self, participant.identity, publication.sid, track)
        except Exception:
            self._stats.tracks_failed += 1
            logger.exception(
                "could not start captioning a track",
                extra={"participant": participant.identity, "track": publication.sid},
            )
            return
        self._tracks[publication.sid] = tc
        self._stats.tracks_started += 1
        logger.info("captioning track", extra={"participant": participant.identity, "track": publication.sid})
        self._notify("track_started", tc.info)

    def _end_track(
        self, sid: str, reason: str, *, only: _TrackCaptioner | None = None, abort: bool = False
    ) -> None:
        """Stop captioning track `sid` (if it is still `only`, when given); it finishes in a task."""
        tc = self._tracks.get(sid)
        if tc is None or (only is not None and tc is not only):
            return
        del self._tracks[sid]
        self._finishing.add(tc)
        self._spawn(self._finish_track(tc, reason, abort), name=f"captioner.finish.{sid}")

    async def _finish_track(self, tc: _TrackCaptioner, reason: str, abort: bool) -> None:
        try:
            if abort:
                await tc.abort()
            else:
                await tc.finish(self._finish_timeout)
        finally:
            self._finishing.discard(tc)
        tc.info.ended_at = time.monotonic()
        tc.info.end_reason = reason
        self._stats.tracks_finished += 1
        self._history.append(tc.info)
        logger.info(
            "track caption ended",
            extra={"participant": tc.info.participant_identity, "track": tc.info.track_sid, "reason": reason},
        )
        self._notify("track_ended", tc.info)

    def _notify(self, event: CaptionerEvent, arg: Any) -> None:
        """Emit to user callbacks; a failing callback is logged and never stops the captioner."""
        try:
            self.emit(event, arg)
        except Exception:  # rtc's emit logs most callback errors itself but re-raises TypeError
            logger.exception("a %r callback failed", event)

    def _spawn(self, coro, *, name: str) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name)

    def _open_stream(self) -> stt.RecognizeStream:
        if is_given(self._language):
            return self._stt.stream(language=self._language, conn_options=self._conn_options)
        return self._stt.stream(conn_options=self._conn_options)

    # -- publishing ------------------------------------------------------------------------------
    def _legacy_needed(self) -> bool:
        """Whether some client still relies on the deprecated `rtc.Transcription` packet: a standard
        participant with client protocol < 3 (the rule livekit-agents' RoomIO applies; the protocol is
        only readable from the private `_info`, as there)."""
        if self._legacy != "auto":
            return bool(self._legacy)
        return any(
            p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
            and p._info.client_protocol < CLIENT_PROTOCOL_TRANSCRIPTION_STREAMS
            for p in self._room.remote_participants.values()
        )

    async def _publish(self, info: TrackCaptionInfo, item: _Item) -> None:
        """One caption: a text stream with the full segment text, then (if needed) the legacy packet."""
        attributes = {
            ATTRIBUTE_TRANSCRIPTION_SEGMENT_ID: item.segment_id,
            ATTRIBUTE_TRANSCRIPTION_TRACK_ID: info.track_sid,
            ATTRIBUTE_TRANSCRIPTION_FINAL: "true" if item.final else "false",
        }
        local = self._room.local_participant
        try:
            writer = await local.stream_text(
                topic=TOPIC_TRANSCRIPTION, sender_identity=info.participant_identity, attributes=attributes
            )
            try:
                await writer.write(item.text)
            finally:
                await writer.aclose()
        except Exception as e:
            self._stats.publish_errors += 1
            logger.warning(
                "failed to publish a caption: %s",
                e,
                extra={"participant": info.participant_identity, "segment": item.segment_id},
            )
            return
        published_at = time.monotonic()
        if item.final:
            self._stats.finals_published += 1
            info.finals_published += 1
        else:
            self._stats.interims_published += 1
            info.interims_published += 1
        if self._legacy_needed():
            await self._publish_legacy(info, item)
        self._notify(
            "caption",
            Caption(
                participant_identity=info.participant_identity,
                track_sid=info.track_sid,
                segment_id=item.segment_id,
                text=item.text,
                final=item.final,
                language=item.language,
                received_at=item.received_at,
                published_at=published_at,
            ),
        )

    async def _publish_legacy(self, info: TrackCaptionInfo, item: _Item) -> None:
        transcription = rtc.Transcription(
            participant_identity=info.participant_identity,
            track_sid=info.track_sid,
            segments=[
                rtc.TranscriptionSegment(
                    id=item.segment_id,
                    text=item.text,
                    start_time=0,
                    end_time=0,
                    language=item.language,
                    final=item.final,
                )
            ],
        )
        try:
            await self._room.local_participant.publish_transcription(transcription)
        except Exception as e:
            self._stats.publish_errors += 1
            logger.warning("failed to publish a legacy transcription: %s", e)
            return
        self._stats.legacy_published += 1


class _TrackCaptioner:
    """One audio track: audio pump -> STT stream -> events -> publish queue -> room.

    Three tasks: `_pump_audio` (AudioStream frames into the current STT stream), `_recognize` (STT
    events into the outbox; replaces a failed stream), `_publish_loop` (outbox into the room, in order).
    """

    def __init__(self, owner: RoomCaptioner, identity: str, track_sid: str, track: rtc.Track) -> None:
        self._owner = owner
        self.info = TrackCaptionInfo(participant_identity=identity, track_sid=track_sid)
        self._audio = rtc.AudioStream.from_track(
            track=track, sample_rate=owner._sample_rate, num_channels=1, frame_size_ms=20
        )
        self._ending = False
        self._outbox = _Outbox()
        self._open_segment: str | None = None  # segment with a queued/published interim and no final
        self._last_text = ""
        try:
            # before the pump starts, so no frame finds no stream
            self._stream: stt.RecognizeStream | None = self._new_stream()
        except BaseException:
            owner._spawn(self._audio.aclose(), name=f"captioner.audio_close.{track_sid}")
            raise
        self._pump_task = asyncio.create_task(self._pump_audio(), name=f"captioner.pump.{track_sid}")
        self._recognize_task = asyncio.create_task(self._recognize(), name=f"captioner.stt.{track_sid}")
        self._publish_task = asyncio.create_task(self._publish_loop(), name=f"captioner.publish.{track_sid}")

    def _new_stream(self) -> stt.RecognizeStream:
        stream = self._owner._open_stream()
        stream_id = getattr(stream, "stream_id", None) or f"stream-{id(stream):x}"
        self.info.stream_ids.append(stream_id)
        return stream

    # -- tasks -----------------------------------------------------------------------------------
    async def _pump_audio(self) -> None:
        async for ev in self._audio:
            self._push(ev.frame)
        # the track's audio ended on its own (e.g. the track went away): finish like an unsubscribe
        self._owner._end_track(self.info.track_sid, "audio ended", only=self)

    def _push(self, frame: rtc.AudioFrame) -> None:
        stream = self._stream
        try:
            if stream is None:
                raise RuntimeError("no STT stream")
            stream.push_frame(frame)
        except RuntimeError:  # the stream failed (its replacement is on the way)
            self._owner._stats.frames_dropped += 1

    async def _recognize(self) -> None:
        restarts = 0
        try:
            while (error := await self._run_stream()) is not None:
                if not self._stream_failed(error, restarts):
                    if not self._ending:  # gave up: free the track (logged and counted)
                        self._owner._end_track(self.info.track_sid, "STT failed", only=self)
                    return
                restarts += 1
        finally:
            self._outbox.close()

    async def _run_stream(self) -> BaseException | None:
        """Consume one STT stream into the outbox. None: it ended because the input was ended."""
        try:
            stream = self._stream if self._stream is not None else self._new_stream()
        except Exception as e:
            return e
        self._stream = stream
        try:
            async for ev in stream:
                self._on_event(ev)
        except Exception as e:
            return e
        finally:
            self._stream = None
            await stream.aclose()
        return None if self._ending else RuntimeError("the STT stream ended on its own")

    def _stream_failed(self, error: BaseException, restarts: int) -> bool:
        """Log and count a failed STT stream; close its open segment. True: open a new stream."""
        owner = self._owner
        owner._stats.stream_errors += 1
        self._close_open_segment()
        retry = not self._ending and not owner._closed and restarts < owner._max_restarts
        logger.error(
            "STT stream failed for %s (%s)",
            self.info.participant_identity,
            "restarting" if retry else "giving up",
            exc_info=error,
            extra={"track": self.info.track_sid},
        )
        if retry:
            owner._stats.stream_restarts += 1
        elif not self._ending:
            self.info.failed = True
            owner._stats.tracks_failed += 1
        return retry

    async def _publish_loop(self) -> None:
        while (item := await self._outbox.get()) is not None:
            await self._owner._publish(self.info, item)

    # -- STT events ------------------------------------------------------------------------------
    def _on_event(self, ev: stt.SpeechEvent) -> None:
        if ev.type == stt.SpeechEventType.INTERIM_TRANSCRIPT:
            text, language = _text(ev)
            if not text:
                return
            if self._open_segment not in (None, ev.request_id):
                self._close_open_segment()  # defensive: a segment never left open
            if self._open_segment is None:
                self.info.segments += 1
            self._open_segment = ev.request_id
            if text != self._last_text:
                self._last_text = text
                self._queue(_Item(ev.request_id, text, False, language, time.monotonic()))
        elif ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT:
            text, language = _text(ev)
            if self._open_segment not in (None, ev.request_id):
                self._close_open_segment()
            if text or self._open_segment == ev.request_id:  # an empty final only closes a segment
                if self._open_segment is None:
                    self.info.segments += 1
                self._queue(_Item(ev.request_id, text, True, language, time.monotonic()))
            self._open_segment, self._last_text = None, ""

    def _close_open_segment(self) -> None:
        if self._open_segment is not None:
            self._queue(_Item(self._open_segment, self._last_text, True, "", time.monotonic()))
            self._open_segment, self._last_text = None, ""

    def _queue(self, item: _Item) -> None:
        if self._outbox.put(item):
            self._owner._stats.interims_superseded += 1

    # -- ending ----------------------------------------------------------------------------------
    async def finish(self, timeout: float) -> None:
        """Stop reading audio, end the STT input (the finish step runs, the final follows), publish
        what is left, then free everything. Bounded by `timeout`."""
        self._ending = True
        await utils.aio.cancel_and_wait(self._pump_task)
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # already closed / failed: _recognize handles it
                stream.end_input()
        _, pending = await asyncio.wait({self._recognize_task, self._publish_task}, timeout=timeout)
        if pending:
            self._owner._stats.finish_timeouts += 1
            logger.error(
                "final not delivered within %.1f s; dropping the rest of %s's caption",
                timeout,
                self.info.participant_identity,
                extra={"track": self.info.track_sid},
            )
        await self.abort()

    async def abort(self) -> None:
        """Cancel everything and free the audio and STT streams."""
        self._ending = True
        await utils.aio.cancel_and_wait(self._pump_task, self._recognize_task, self._publish_task)
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None
        await self._audio.aclose()


def _text(ev: stt.SpeechEvent) -> tuple[str, str]:
    if not ev.alternatives:
        return "", ""
    alt = ev.alternatives[0]
    return alt.text, str(alt.language or "")
