"""A stand-in for a connected `rtc.Room`, for testing `RoomCaptioner` without a LiveKit server.

No LiveKit server exists here, so `rtc.Room.connect` cannot run (and `room.local_participant` raises
before a connect). This double mirrors EXACTLY the rtc surface the captioner uses, with the real
names, signatures and semantics of livekit 1.1.21 (`livekit/rtc/room.py`, `participant.py`,
`track_publication.py`, `data_stream.py`), the way livekit/agents' own tests use fakes:

- `RoomDouble` is a real `rtc.EventEmitter` (the same `on` / `off` / `emit`, so async callbacks are
  rejected with ValueError as on a real room) with `remote_participants` (identity -> participant) and
  `local_participant`.
- `RemoteParticipantDouble`: `identity`, `sid`, `name`, `kind`, `attributes`, `track_publications`
  (sid -> publication), and `_info.client_protocol` (private in rtc too; read by the captioner exactly
  as livekit-agents' RoomIO reads it to decide on legacy transcriptions).
- `RemoteTrackPublicationDouble`: `sid`, `name`, `kind`, `source`, `muted`, `subscribed`, `track`,
  `set_subscribed(subscribed)`, as `rtc.RemoteTrackPublication`.
- `LocalParticipantDouble`: `identity`, `stream_text(*, destination_identities, topic, attributes,
  stream_id, reply_to_id, total_size, sender_identity)` returning a writer with `write(text)` and
  `aclose(*, reason, attributes)` (RuntimeError on write-after-close and double close, as
  `TextStreamWriter`), and `publish_transcription(transcription)`. Everything sent is recorded.

The server side is simulated by methods that change state and emit events in the order
`rtc.Room._on_room_event` does: `connect_participant`, `publish_track` (track_published, then
track_subscribed when auto-subscribing), `set_muted` (state first, then track_muted / track_unmuted),
`unpublish_track` (track_unsubscribed with the publication's track cleared, then track_unpublished),
`disconnect_participant`.

The audio is real: a publication's `track` is an `rtc.LocalAudioTrack` made from an `rtc.AudioSource`,
so the captioner's `rtc.AudioStream.from_track(...)` receives real frames, paced at real time by
`AudioSource.capture_frame`. Only its `sid` differs: an unpublished local track reports "TR_unknown",
so the publication carries the sid (the captioner uses `publication.sid`, which a real remote track
shares).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from livekit import rtc
from livekit.rtc.room import EventTypes

_ids = itertools.count(1)


class Signal:
    """Wakes waiters whenever something changed; each waiter re-checks its own predicate."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._event.clear()
                await self._event.wait()


@dataclass
class TextStreamRecord:
    """One text stream opened with `stream_text` and what was written to it."""

    topic: str
    sender_identity: str | None
    attributes: dict[str, str]
    destination_identities: list[str] | None
    stream_id: str
    opened_at: float  # time.monotonic()
    chunks: list[str] = field(default_factory=list)
    closed_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def segment_id(self) -> str:
        return self.attributes.get("lk.segment_id", "")

    @property
    def track_id(self) -> str:
        return self.attributes.get("lk.transcribed_track_id", "")

    @property
    def final(self) -> bool:
        return self.attributes.get("lk.transcription_final") == "true"


@dataclass
class LegacyRecord:
    transcription: rtc.Transcription
    at: float  # time.monotonic()


class TextStreamWriterDouble:
    """`rtc.TextStreamWriter`'s `write` / `aclose`, recording into a `TextStreamRecord`."""

    def __init__(self, owner: LocalParticipantDouble, record: TextStreamRecord) -> None:
        self._owner = owner
        self.record = record
        self._closed = False

    async def write(self, text: str) -> None:
        if self._closed:
            raise RuntimeError("Cannot write after stream is closed")
        self.record.chunks.append(text)

    async def aclose(self, *, reason: str = "", attributes: dict[str, str] | None = None) -> None:
        if self._closed:
            raise RuntimeError("Stream already closed")
        self._closed = True
        if attributes:
            self.record.attributes.update(attributes)
        self.record.closed_at = time.monotonic()
        self._owner.closed_streams.append(self.record)
        self._owner.changed.notify()


class LocalParticipantDouble:
    def __init__(self, identity: str, changed: Signal) -> None:
        self.identity = identity
        self.changed = changed
        self.text_streams: list[TextStreamRecord] = []  # in opening order
        self.closed_streams: list[TextStreamRecord] = []  # in closing order (= delivery order)
        self.transcriptions: list[LegacyRecord] = []

    async def stream_text(
        self,
        *,
        destination_identities: list[str] | None = None,
        topic: str = "",
        attributes: dict[str, str] | None = None,
        stream_id: str | None = None,
        reply_to_id: str | None = None,
        total_size: int | None = None,
        sender_identity: str | None = None,
    ) -> TextStreamWriterDouble:
        record = TextStreamRecord(
            topic=topic,
            sender_identity=sender_identity or self.identity,
            attributes=dict(attributes or {}),
            destination_identities=destination_identities,
            stream_id=stream_id or f"ST_{next(_ids)}",
            opened_at=time.monotonic(),
        )
        self.text_streams.append(record)
        return TextStreamWriterDouble(self, record)

    async def publish_transcription(self, transcription: rtc.Transcription) -> None:
        self.transcriptions.append(LegacyRecord(transcription, time.monotonic()))
        self.changed.notify()


@dataclass
class ParticipantInfoDouble:
    """The one field of the private `proto_participant.ParticipantInfo` that is read."""

    client_protocol: int = 3


class RemoteTrackPublicationDouble:
    def __init__(self, room: RoomDouble, participant: RemoteParticipantDouble, track: rtc.Track, *, sid: str,
                 source: int) -> None:  # fmt: skip
        self._room = room
        self._participant = participant
        self._local_track = track  # what a subscription delivers
        self.sid = sid
        self.name = track.name
        self.kind = track.kind
        self.source = source
        self.muted = False
        self.subscribed = False
        self.track: rtc.Track | None = None

    def set_subscribed(self, subscribed: bool) -> None:
        """As on a real publication, the subscription happens later (the server answers): the
        track_subscribed / track_unsubscribed event follows on the next loop iteration."""
        asyncio.get_running_loop().call_soon(self._room._set_subscription, self, subscribed)


class RemoteParticipantDouble:
    def __init__(self, identity: str, *, kind: int, client_protocol: int) -> None:
        self.identity = identity
        self.sid = f"PA_{next(_ids)}"
        self.name = identity
        self.kind = kind
        self.attributes: dict[str, str] = {}
        self._info = ParticipantInfoDouble(client_protocol)
        self._track_publications: dict[str, RemoteTrackPublicationDouble] = {}

    @property
    def track_publications(self) -> Mapping[str, RemoteTrackPublicationDouble]:
        return self._track_publications


class RoomDouble(rtc.EventEmitter[EventTypes]):
    """A connected room as the captioner sees it (see the module docstring)."""

    def __init__(self, local_identity: str = "captioner") -> None:
        super().__init__()
        self.changed = Signal()
        self._local = LocalParticipantDouble(local_identity, self.changed)
        self._remote_participants: dict[str, RemoteParticipantDouble] = {}

    @property
    def local_participant(self) -> LocalParticipantDouble:
        return self._local

    @property
    def remote_participants(self) -> Mapping[str, RemoteParticipantDouble]:
        return self._remote_participants

    # -- the server side -------------------------------------------------------------------------
    def connect_participant(
        self,
        identity: str,
        *,
        kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
        client_protocol: int = 3,
    ) -> RemoteParticipantDouble:
        p = RemoteParticipantDouble(identity, kind=kind, client_protocol=client_protocol)
        self._remote_participants[identity] = p
        self.emit("participant_connected", p)
        return p

    def publish_track(
        self,
        participant: RemoteParticipantDouble,
        track: rtc.Track,
        *,
        source: int = rtc.TrackSource.SOURCE_MICROPHONE,
        auto_subscribe: bool = True,
    ) -> RemoteTrackPublicationDouble:
        pub = RemoteTrackPublicationDouble(self, participant, track, sid=f"TR_{next(_ids)}", source=source)
        participant._track_publications[pub.sid] = pub
        self.emit("track_published", pub, participant)
        if auto_subscribe:
            self._set_subscription(pub, True)
        return pub

    def set_muted(self, publication: RemoteTrackPublicationDouble, muted: bool) -> None:
        publication.muted = muted
        self.emit("track_muted" if muted else "track_unmuted", publication._participant, publication)

    def unpublish_track(self, publication: RemoteTrackPublicationDouble) -> None:
        participant = publication._participant
        self._set_subscription(publication, False)
        if participant._track_publications.pop(publication.sid, None) is not None:
            self.emit("track_unpublished", publication, participant)

    def disconnect_participant(self, participant: RemoteParticipantDouble, *, unpublish_tracks: bool) -> None:
        """`unpublish_tracks=False`: only participant_disconnected (the captioner must still finish the
        participant's tracks); True: each track is unsubscribed and unpublished first."""
        if unpublish_tracks:
            for pub in list(participant.track_publications.values()):
                self.unpublish_track(pub)
        del self._remote_participants[participant.identity]
        self.emit("participant_disconnected", participant)

    def _set_subscription(self, publication: RemoteTrackPublicationDouble, subscribed: bool) -> None:
        participant = publication._participant
        if participant._track_publications.get(publication.sid) is not publication:
            return  # unpublished meanwhile (the real room skips the event too)
        if subscribed and not publication.subscribed:
            publication.subscribed = True
            publication.track = publication._local_track
            self.emit("track_subscribed", publication.track, publication, participant)
        elif not subscribed and publication.subscribed:
            track, publication.track = publication.track, None
            publication.subscribed = False
            self.emit("track_unsubscribed", track, publication, participant)
