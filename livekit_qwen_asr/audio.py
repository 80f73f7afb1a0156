"""Audio conversion: any `rtc.AudioFrame` (any rate, any channel count) -> 16 kHz mono float32.

One implementation for every ingress (LiveKit tracks, `recognize()` buffers, browser WebRTC).
The LiveKit base `RecognizeStream` resamples but never downmixes, so 48 kHz stereo would reach the
model as interleaved garbage; here channels are averaged first, then resampled with
`rtc.AudioResampler` (soxr, HIGH quality).
"""

from __future__ import annotations

import numpy as np
from livekit import rtc

from .errors import InvalidAudioError

TARGET_RATE = 16_000


def frame_to_mono_int16(frame: rtc.AudioFrame) -> np.ndarray:
    """Average the channels of an interleaved s16 frame (validated) into mono int16."""
    if frame.sample_rate <= 0:
        raise InvalidAudioError(f"frame sample_rate must be > 0, got {frame.sample_rate}")
    if frame.num_channels <= 0:
        raise InvalidAudioError(f"frame num_channels must be > 0, got {frame.num_channels}")
    data = np.frombuffer(frame.data, dtype=np.int16)
    n = frame.samples_per_channel
    if data.shape[0] != n * frame.num_channels:
        raise InvalidAudioError(
            f"frame holds {data.shape[0]} samples, expected {n} x {frame.num_channels} channels"
        )
    if frame.num_channels == 1:
        return data
    mixed = data.reshape(n, frame.num_channels).astype(np.int32).mean(axis=1)
    return np.round(mixed).astype(np.int16)


class AudioNormalizer:
    """Stateful converter for one stream. `push(frame)` returns the 16 kHz mono samples ready so far.

    A sample-rate change mid-stream is handled, not rejected: the old resampler is flushed (its tail
    is returned) and a new one is made for the new rate. `flush()` returns the resampler's tail; the
    next push starts a fresh resampler (used at utterance ends so no audio lingers inside it).
    """

    def __init__(self) -> None:
        self._rate = 0
        self._resampler: rtc.AudioResampler | None = None
        self.samples_in = 0  # input samples per channel seen
        self.samples_out = 0  # 16 kHz samples returned

    def push(self, frame: rtc.AudioFrame) -> np.ndarray:
        mono = frame_to_mono_int16(frame)
        self.samples_in += frame.samples_per_channel
        out: list[np.ndarray] = []
        if frame.sample_rate != self._rate:
            out.append(self.flush())
            self._rate = frame.sample_rate
        if mono.size == 0:
            return self._collect(out)
        if self._rate == TARGET_RATE:
            out.append(mono)
        else:
            if self._resampler is None:
                self._resampler = rtc.AudioResampler(
                    self._rate, TARGET_RATE, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH
                )
            mono_frame = rtc.AudioFrame(mono.tobytes(), self._rate, 1, mono.shape[0])
            out.extend(_frame_samples(f) for f in self._resampler.push(mono_frame))
        return self._collect(out)

    def flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, np.int16)
        tail = [_frame_samples(f) for f in self._resampler.flush()]
        self._resampler = None
        return self._collect(tail)

    def _collect(self, parts: list[np.ndarray]) -> np.ndarray:
        parts = [p for p in parts if p.size]
        out = np.concatenate(parts) if parts else np.zeros(0, np.int16)
        self.samples_out += out.shape[0]
        return out


def _frame_samples(frame: rtc.AudioFrame) -> np.ndarray:
    return np.frombuffer(frame.data, dtype=np.int16).copy()


def int16_to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 32768.0


def frames_to_16k_mono(frames: list[rtc.AudioFrame] | rtc.AudioFrame) -> np.ndarray:
    """Convert a whole buffer (e.g. for `recognize()`) to 16 kHz mono float32."""
    if isinstance(frames, rtc.AudioFrame):
        frames = [frames]
    norm = AudioNormalizer()
    parts = [norm.push(f) for f in frames]
    parts.append(norm.flush())
    return int16_to_float(np.concatenate(parts) if parts else np.zeros(0, np.int16))
