"""Calls: one aiortc peer connection, one microphone track, one STT stream each; one hub for all.

Flow of a call: the page's offer -> `CaptionHub.open_call` (answer) -> the remote track's frames ->
`av_frame_to_rtc` -> `SpeechStream.push_frame` (the plugin's downmix + resample) -> the shared
engine -> STT events -> caption messages (JSON) on every open page's data channel, labelled with the
speaker. Captions go to every call (a meeting) unless `share_captions=False`.

Ending a call (hang-up message or POST /hangup, the page closing or reloading, the connection
failing, the track ending, the server shutting down): the audio pump stops, the STT input is ended,
the finish step runs on the audio so far and its final is sent to every page still connected (the
caller's own page too, when its channel is still open), then the stream, its engine state and the
peer connection are closed and the call is removed. Bounded by `finish_timeout`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from livekit.agents import stt, utils

from ..errors import QwenASRError, TooManyStreamsError
from ..log import logger
from ..tasks import OwnedTasks
from ..test_model import TEST_MODEL_LABEL, is_test_model
from .frames import av_frame_to_rtc

# A page that stops reading its data channel must not make the server queue without bound: above
# this many buffered bytes interims to it are skipped (finals are always sent).
MAX_BUFFERED_BYTES = 256 * 1024
MAX_LABEL_CHARS = 40


class CallRejectedError(QwenASRError):
    """The offer was not accepted. `status` is the HTTP status the server answers with."""

    status = 400


class InvalidOfferError(CallRejectedError, ValueError):
    """The offer is not an SDP offer with exactly one audio track and nothing else."""


class TooManyCallsError(CallRejectedError):
    """`max_calls` calls are live already."""

    status = 503


class ServerClosingError(CallRejectedError):
    status = 503


@dataclass
class CallInfo:
    """What the server knows about one call (live in `CaptionHub.calls`, then in `history`)."""

    id: str
    label: str
    stream_id: str = ""  # the STT stream's id (engine state is keyed by it)
    state: str = "connecting"  # connecting -> live (audio flowing) -> ending -> ended
    created_at: float = field(default_factory=time.monotonic)
    first_audio_at: float | None = None
    first_interim_at: float | None = None
    ended_at: float | None = None
    end_reason: str = ""
    audio_seconds: float = 0.0  # audio received from WebRTC (before conversion)
    interims: int = 0
    finals: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HubStats:
    calls_started: int = 0
    calls_ended: int = 0
    calls_rejected: int = 0
    captions_sent: int = 0  # messages actually handed to data channels (all pages)
    interims_skipped: int = 0  # a page's channel was backed up (> MAX_BUFFERED_BYTES) or not open
    finals_undeliverable: int = 0  # a final had no open channel to go to (every page gone)
    finish_timeouts: int = 0
    stream_errors: int = 0


def clean_label(label: object, fallback: str) -> str:
    """A display name: printable, single line, at most MAX_LABEL_CHARS characters."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(label or "")).strip()[:MAX_LABEL_CHARS].strip()
    return text or fallback


def check_offer_sdp(sdp: object) -> str:
    """Exactly one audio m-line, no video, no other media besides the data channel."""
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise InvalidOfferError("offer.sdp must be an SDP string")
    kinds = [line.split()[0][2:] for line in sdp.splitlines() if line.startswith("m=") and line.split()]
    if kinds.count("audio") != 1:
        raise InvalidOfferError(f"the offer must carry exactly one audio track (got {kinds.count('audio')})")
    other = [k for k in kinds if k not in ("audio", "application")]
    if other:
        raise InvalidOfferError(f"audio only: the offer also carries {', '.join(other)}")
    return sdp


class Call:
    """One browser peer: its track pump, STT stream, data channel and ending."""

    def __init__(self, hub: CaptionHub, info: CallInfo, pc: RTCPeerConnection) -> None:
        self.info = info
        self._hub = hub
        self._pc = pc
        self._channel: Any = None
        self._stream: stt.RecognizeStream | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._recognize_task: asyncio.Task[None] | None = None
        self._end_task: asyncio.Task[None] | None = None
        self._rejected: TooManyStreamsError | None = None
        self.closed = asyncio.Event()  # set once the call is fully freed
        self._open_segment: str | None = None
        self._last_text = ""

    # -- wiring (aiortc callbacks) ---------------------------------------------------------------
    def attach_track(self, track: Any) -> None:
        if track.kind != "audio" or self._stream is not None:
            return  # check_offer_sdp admits one audio track only
        try:
            self._stream = self._hub._open_stream()
        except TooManyStreamsError as e:  # the STT's own max_streams: answered as HTTP 503
            self._rejected = e
            return
        self.info.stream_id = str(getattr(self._stream, "stream_id", ""))
        self._pump_task = self._hub._spawn(self._pump(track), f"browser.pump.{self.info.id}")
        self._recognize_task = self._hub._spawn(self._recognize(), f"browser.recognize.{self.info.id}")

    def attach_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.on("open", self._greet)
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._greet()

    def _greet(self) -> None:
        self.send(self._hub._hello(self.info))
        for msg in list(self._hub.recent_finals):  # late joiners see the recent lines
            self.send(msg)

    def _on_message(self, message: object) -> None:
        try:
            msg = json.loads(message) if isinstance(message, str) else None
        except ValueError:
            msg = None
        if isinstance(msg, dict) and msg.get("type") == "hangup":
            self.end("hung up")
        else:
            logger.debug("ignored a data channel message", extra={"call": self.info.id})

    def send(self, msg: dict[str, Any]) -> bool:
        """Send one JSON message on this call's channel; False if it could not go out."""
        ch = self._channel
        if ch is None or ch.readyState != "open":
            return False
        if msg.get("type") == "caption" and not msg["final"] and ch.bufferedAmount > MAX_BUFFERED_BYTES:
            return False
        try:
            ch.send(json.dumps(msg, ensure_ascii=False))
        except Exception:  # the transport closed under us
            logger.debug("data channel send failed", exc_info=True, extra={"call": self.info.id})
            return False
        return True

    # -- audio in, captions out ------------------------------------------------------------------
    async def _pump(self, track: Any) -> None:
        stream = self._stream
        assert stream is not None
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            if self.info.first_audio_at is None:
                self.info.first_audio_at = time.monotonic()
                self.info.state = "live"
            self.info.audio_seconds += frame.samples / frame.sample_rate
            try:
                stream.push_frame(av_frame_to_rtc(frame))
            except QwenASRError as e:  # a frame we cannot read: say so and end the call cleanly
                self.info.errors += 1
                logger.error("call %s: unreadable audio: %s", self.info.id, e)
                self.send({"type": "error", "call": self.info.id, "message": f"unreadable audio: {e}"})
                self.end("unreadable audio")
                return
        self.end("audio track ended")

    async def _recognize(self) -> None:
        stream = self._stream
        assert stream is not None
        try:
            async for ev in stream:
                self._on_event(ev)
        except Exception as e:  # the STT stream failed past its retries
            self.info.errors += 1
            self._hub.stats.stream_errors += 1
            logger.error("STT stream failed for call %s", self.info.id, exc_info=e)
            self._close_open_segment()
            self.send({"type": "error", "call": self.info.id, "message": f"recognition failed: {e}"})
            self.end("recognition failed")

    def _on_event(self, ev: stt.SpeechEvent) -> None:
        if ev.type not in (stt.SpeechEventType.INTERIM_TRANSCRIPT, stt.SpeechEventType.FINAL_TRANSCRIPT):
            return
        final = ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT
        alt = ev.alternatives[0] if ev.alternatives else None
        text = alt.text if alt is not None else ""
        if not final and (not text or text == self._last_text):
            return
        if final and not text and self._open_segment != ev.request_id:
            return  # nothing was said and nothing is shown: no empty line
        now = time.monotonic()
        if final:
            self.info.finals += 1
            self._open_segment, self._last_text = None, ""
        else:
            self.info.interims += 1
            if self.info.first_interim_at is None:
                self.info.first_interim_at = now
            self._open_segment, self._last_text = ev.request_id, text
        meta = (alt.metadata or {}) if alt is not None else {}
        stable = text if final else str(meta.get("stable_text", ""))
        self._broadcast_caption(ev.request_id, final, text, stable, alt)

    def _close_open_segment(self) -> None:
        """A failed stream leaves no interim dangling on the pages: close it with its last text."""
        if self._open_segment is not None:
            self._broadcast_caption(self._open_segment, True, self._last_text, self._last_text)
            self.info.finals += 1
            self._open_segment, self._last_text = None, ""

    def _broadcast_caption(
        self, segment: str, final: bool, text: str, stable: str, alt: stt.SpeechData | None = None
    ) -> None:
        meta = (alt.metadata or {}) if alt is not None else {}
        self._hub.broadcast(
            {
                "type": "caption",
                "call": self.info.id,
                "speaker": self.info.label,
                "segment": segment,
                "final": final,
                "text": text,
                "stable": stable,
                "language": str(alt.language or "") if alt is not None else "",
                "start": round(alt.start_time, 3) if alt is not None else None,
                "end": round(alt.end_time, 3) if alt is not None else None,
                "synthetic": bool(meta.get("synthetic_model", False)),
            }
        )

    # -- ending ----------------------------------------------------------------------------------
    def end(self, reason: str) -> asyncio.Task[None]:
        """End the call (idempotent): flush the final, deliver it, free everything."""
        if self._end_task is None:
            self.info.state = "ending"
            self.info.end_reason = reason
            self._end_task = self._hub._spawn(self._finish(), f"browser.end.{self.info.id}")
        return self._end_task

    async def _finish(self) -> None:
        try:
            if self._pump_task is not None:
                await utils.aio.cancel_and_wait(self._pump_task)
            stream = self._stream
            if stream is not None:
                with contextlib.suppress(RuntimeError):  # input already ended / stream closed
                    stream.end_input()
            task = self._recognize_task
            if task is not None:
                done, _ = await asyncio.wait({task}, timeout=self._hub.finish_timeout)
                if not done:
                    self._hub.stats.finish_timeouts += 1
                    logger.error("call %s: final not delivered within the finish timeout", self.info.id)
                    await utils.aio.cancel_and_wait(task)
                    self._close_open_segment()
            if stream is not None:
                await stream.aclose()
            self.send({"type": "bye", "call": self.info.id, "reason": self.info.end_reason})
        finally:
            try:
                await self._pc.close()
            except Exception:
                logger.warning(
                    "closing the peer connection failed", exc_info=True, extra={"call": self.info.id}
                )
            self.info.state = "ended"
            self.info.ended_at = time.monotonic()
            self._hub._remove(self)
            self.closed.set()


class CaptionHub:
    """All calls of one server, on one STT (so one engine: their steps batch together)."""

    def __init__(
        self,
        stt: stt.STT,
        *,
        max_calls: int = 16,
        finish_timeout: float = 30.0,
        share_captions: bool = True,
        recent_finals: int = 50,
        history_size: int = 200,
        rtc_configuration: RTCConfiguration | None = None,
    ) -> None:
        """
        Args:
            stt: a streaming STT (e.g. `livekit_qwen_asr.STT`); each call gets `stt.stream()`.
            max_calls: live calls allowed at once; more are rejected (HTTP 503, TooManyCallsError).
            finish_timeout: how long an ending call may take to deliver its final.
            share_captions: send every call's captions to every page (a meeting); False: own only.
            recent_finals: finals replayed to a page that joins later.
            history_size: ended calls kept in `history`.
            rtc_configuration: aiortc configuration (default: no STUN/TURN servers, host candidates).
        """
        if max_calls < 1:
            raise ValueError("max_calls must be >= 1")
        if not stt.capabilities.streaming:
            raise ValueError("CaptionHub needs a streaming STT")
        self.stt = stt
        self.max_calls = max_calls
        self.finish_timeout = finish_timeout
        self.share_captions = share_captions
        self.recent_finals: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent_finals)
        self.history: collections.deque[CallInfo] = collections.deque(maxlen=history_size)
        self.stats = HubStats()
        self._rtc_configuration = rtc_configuration or RTCConfiguration(iceServers=[])
        self._calls: dict[str, Call] = {}
        self._tasks = OwnedTasks("browser")
        self._closing = False
        self._seq = 0

    @property
    def calls(self) -> dict[str, CallInfo]:
        return {cid: c.info for cid, c in self._calls.items()}

    @property
    def pending_tasks(self) -> int:
        return self._tasks.pending

    async def open_call(
        self, sdp: object, kind: object, label: object = ""
    ) -> tuple[CallInfo, dict[str, str]]:
        """Accept a page's offer; returns the call and the answer ({"sdp", "type"})."""
        if self._closing:
            self.stats.calls_rejected += 1
            raise ServerClosingError("the server is shutting down")
        if kind != "offer":
            self.stats.calls_rejected += 1
            raise InvalidOfferError("expected an SDP of type 'offer'")
        try:
            check_offer_sdp(sdp)
        except InvalidOfferError:
            self.stats.calls_rejected += 1
            raise
        if len(self._calls) >= self.max_calls:
            self.stats.calls_rejected += 1
            raise TooManyCallsError(f"{self.max_calls} calls are live already (max_calls)")
        call_id = uuid.uuid4().hex[:8]
        info = CallInfo(call_id, clean_label(label, f"guest-{call_id[:4]}"))
        pc = RTCPeerConnection(self._rtc_configuration)
        call = Call(self, info, pc)
        pc.on("track", call.attach_track)
        pc.on("datachannel", call.attach_channel)

        @pc.on("connectionstatechange")
        def _on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                call.end(f"connection {pc.connectionState}")

        self._calls[call_id] = call  # before negotiation: the track callback may start the stream
        self.stats.calls_started += 1
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=str(sdp), type="offer"))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as e:
            self.stats.calls_rejected += 1
            call.end("negotiation failed")
            raise InvalidOfferError(f"could not negotiate the offer: {e}") from e
        if call._rejected is not None:
            self.stats.calls_rejected += 1
            call.end("no stream available")
            raise TooManyCallsError(str(call._rejected))
        if call._stream is None:
            self.stats.calls_rejected += 1
            call.end("no audio")
            raise InvalidOfferError("the offer sends no audio (its audio track must be sendonly or sendrecv)")
        logger.info("browser call started", extra={"call": call_id, "label": info.label})
        return info, {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}

    def hang_up(self, call_id: str) -> asyncio.Task[None] | None:
        call = self._calls.get(call_id)
        return call.end("hung up") if call is not None else None

    def broadcast(self, msg: dict[str, Any]) -> None:
        self._seq += 1
        msg["seq"] = self._seq
        if msg["final"]:
            self.recent_finals.append(msg)
        targets = list(self._calls.values())
        if not self.share_captions:
            targets = [c for c in targets if c.info.id == msg["call"]]
        sent = sum(c.send(msg) for c in targets)
        self.stats.captions_sent += sent
        if msg["final"] and not sent:
            self.stats.finals_undeliverable += 1
        elif not msg["final"]:
            self.stats.interims_skipped += len(targets) - sent

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state for /api/state and tests."""
        return {
            "calls": [c.as_dict() for c in self.calls.values()],
            "history": [c.as_dict() for c in self.history],
            "stats": asdict(self.stats),
            "pending_tasks": self.pending_tasks,
            "max_calls": self.max_calls,
        }

    async def wait_call_ended(self, call_id: str) -> CallInfo | None:
        """Wait until call `call_id` is ended and freed; its info (None for an unknown id)."""
        call = self._calls.get(call_id)
        if call is not None:
            await call.closed.wait()
            return call.info
        return next((c for c in self.history if c.id == call_id), None)

    async def wait_idle(self) -> None:
        """Wait until every call task (pumps, recognition, endings) has finished."""
        await self._tasks.wait()

    async def aclose(self) -> None:
        """Refuse new calls, end every call (finals delivered where possible), wait for the tasks."""
        self._closing = True
        for call in list(self._calls.values()):
            call.end("server shutting down")
        await self.wait_idle()

    # -- internals -------------------------------------------------------------------------------
    def _hello(self, info: CallInfo) -> dict[str, Any]:
        engine = getattr(self.stt, "engine", None)
        return {
            "type": "hello",
            "call": info.id,
            "speaker": info.label,
            "model": self.stt.model,
            "synthetic": bool(getattr(engine, "is_synthetic", False)),
            # the small model trained here is labelled wherever it is shown (issue #12)
            "test_model": TEST_MODEL_LABEL if is_test_model(self.stt.model) else "",
            "share_captions": self.share_captions,
        }

    def _open_stream(self) -> stt.RecognizeStream:
        return self.stt.stream()

    def _remove(self, call: Call) -> None:
        if self._calls.get(call.info.id) is call:
            del self._calls[call.info.id]
            self.stats.calls_ended += 1
            self.history.append(call.info)
            logger.info(
                "browser call ended",
                extra={
                    "call": call.info.id,
                    "reason": call.info.end_reason,
                    "audio_s": call.info.audio_seconds,
                },
            )

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name)
