"""A real aiortc caller that does what the caption page does (tests/test_browser_loopback.py).

It sends a recording as a live microphone would (20 ms frames of 48 kHz stereo s16, paced at real
time, silence after the recording ends), with the page's data channel ("captions") and the page's
HTTP offer/answer, and collects the JSON messages that come back.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

FRAME_SAMPLES = 960  # 20 ms at 48 kHz


class RecordingMicTrack(MediaStreamTrack):
    """Plays `stereo48` (int16, interleaved, 48 kHz) in real time, then silence for as long as read."""

    kind = "audio"

    def __init__(self, stereo48: np.ndarray) -> None:
        super().__init__()
        self._pcm = np.asarray(stereo48, dtype=np.int16).reshape(-1, 2)
        self.frames_sent = 0
        self._t0: float | None = None

    @property
    def recording_seconds(self) -> float:
        return self._pcm.shape[0] / 48000

    async def recv(self) -> av.AudioFrame:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        i = self.frames_sent
        due = self._t0 + i * FRAME_SAMPLES / 48000
        await asyncio.sleep(max(0.0, due - time.perf_counter()))  # a microphone delivers in real time
        chunk = self._pcm[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]
        if chunk.shape[0] < FRAME_SAMPLES:
            chunk = np.concatenate([chunk, np.zeros((FRAME_SAMPLES - chunk.shape[0], 2), np.int16)])
        frame = av.AudioFrame(format="s16", layout="stereo", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk.tobytes())
        frame.sample_rate = 48000
        frame.pts = i * FRAME_SAMPLES
        frame.time_base = fractions.Fraction(1, 48000)
        self.frames_sent += 1
        return frame


class LoopbackCaller:
    def __init__(self, base_url: str, label: str, stereo48: np.ndarray) -> None:
        self.base_url = base_url
        self.label = label
        self.track = RecordingMicTrack(stereo48)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("captions")
        self.messages: list[dict[str, Any]] = []
        self.call_id: str | None = None
        self._changed = asyncio.Condition()
        self.channel.on("message", self._on_message)

    def _on_message(self, raw: str) -> None:
        self.messages.append(json.loads(raw))
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def connect(self, http: aiohttp.ClientSession) -> None:
        self.pc.addTransceiver(self.track, direction="sendonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers every candidate
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer", "label": self.label}
        async with http.post(self.base_url + "offer", json=offer) as res:
            answer = await res.json()
            assert res.status == 200, answer
        self.call_id = answer["call"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        # connected once the server greets us on the data channel (as the page shows "Live")
        await self.wait_for(lambda ms: any(m["type"] == "hello" for m in ms), 30)

    async def wait_for(self, predicate, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.messages))

    def captions(self, *, call: str | None = None, final: bool | None = None) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages
            if m["type"] == "caption"
            and (call is None or m["call"] == call)
            and (final is None or m["final"] == final)
        ]

    async def hang_up(self, timeout: float = 60.0) -> None:
        """What the page's Hang up button does: ask, wait for "bye" (sent after the final), close."""
        self.channel.send(json.dumps({"type": "hangup"}))
        await self.wait_for(lambda ms: any(m["type"] == "bye" for m in ms), timeout)
        await self.pc.close()

    async def drop(self) -> None:
        """A tab that vanishes: the connection just closes."""
        await self.pc.close()
