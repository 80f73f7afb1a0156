"""Audio conversion: any `rtc.AudioFrame` (any rate, any channel count) -> 16 kHz mono float32.

One implementation for every ingress (LiveKit tracks, `recognize()` buffers, browser WebRTC).
The LiveKit base `RecognizeStream` resamples but never downmixes, so 48 kHz stereo would reach the
model as interleaved garbage; here channels are averaged first, then resampled with
`rtc.AudioResampler` (soxr, HIGH quality).
"""

from __future__ import annotations

import math

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


# -- seamless rate changes ---------------------------------------------------------------------------
# A resampler sees a rate change as the end of one signal and the start of another: the old one is
# flushed with zeros after the switch point and a fresh one starts from zeros before it, so each misses
# the other side's half of its ~3 ms filter there and the output dips towards zero: a ~1 ms click of up
# to a third of the amplitude. The join below gives both resamplers real audio across the switch.
JOIN_S = 0.010  # signal fed to each resampler past the switch (> its filter: ~3.5 ms; 7 ms from 8 kHz)
JOIN_MIN_S = 0.1  # a piece shorter than this is joined the old way: bounds the cost of rapid switching
MAX_UNIT_S = 0.040  # grid unit (see _join_grid) above which rates are joined the old way (flush + cold)
RECENT_S = 0.1  # input kept per stream for a possible join (>= 2 windows of the largest unit)
JOIN_ITERS = 24  # upper bound; the join converges in 3-12 iterations
JOIN_TOL = 4  # LSB: stop iterating at the resampler's own rounding and dither noise


def _join_grid(old_rate: int, new_rate: int) -> tuple[int, int, int, int] | None:
    """(units, old, new, out): the join window as `units` grid units of `old`/`new`/`out` samples.

    Every piece of the join has to start on the old, the new and the 16 kHz grid at once, or the
    outputs would shift by a fraction of a sample; that common grid is 1/gcd(rates) s (10 ms for
    44.1 kHz, 40 ms for 11.025 kHz). None for exotic rates whose grid is too coarse to wait for."""
    g = math.gcd(math.gcd(old_rate, new_rate), TARGET_RATE)
    if 1 / g > MAX_UNIT_S:
        return None
    units = math.ceil(JOIN_S * g)
    return units, old_rate // g, new_rate // g, TARGET_RATE // g


def _convert(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """One-shot resampling of a short snippet (same resampler, same quality as the stream's)."""
    if src == dst:
        return x
    rs = rtc.AudioResampler(src, dst, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH)
    frames = list(rs.push(rtc.AudioFrame(x.tobytes(), src, 1, x.shape[0]))) + list(rs.flush())
    return _concat([_frame_samples(f) for f in frames])


def _join(
    old: np.ndarray, new: np.ndarray, old_rate: int, new_rate: int, grid: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The signal on the other side of the switch, in each side's own rate.

    `old` is the last 2 windows of the old stream's input (ending at the switch), `new` the first 2
    windows of the new one (starting there). Returns (cont, hist): `cont` = the first window after the
    switch at the old rate (fed to the old resampler before its flush), `hist` = the last window before
    it at the new rate (primes the new resampler). Each is the other side converted, but converting
    up to the switch needs the far side of it too, so the two are solved together: convert old+cont to
    get hist, hist+new to get cont, repeat. Only a filter's edge reaches across the switch, so each
    round keeps a fraction (0.02-0.4) of the previous error."""
    units, u_old, u_new, _ = grid
    w_old, w_new = units * u_old, units * u_new
    cont = np.zeros(w_old, np.int16)
    hist = np.zeros(w_new, np.int16)
    for _ in range(JOIN_ITERS):
        hist = _fit(_convert(np.concatenate([old, cont]), old_rate, new_rate), 3 * w_new)[w_new : 2 * w_new]
        nxt = _fit(_convert(np.concatenate([hist, new]), new_rate, old_rate), 3 * w_old)[w_old : 2 * w_old]
        done = int(np.abs(nxt.astype(np.int32) - cont).max()) <= JOIN_TOL
        cont = nxt
        if done:
            break
    return cont, hist


class _Switch:
    """A rate change waiting for enough audio at the new rate to join the two streams."""

    def __init__(
        self,
        old_rate: int,
        resampler: rtc.AudioResampler | None,
        drop: int,
        recent: np.ndarray,
        grid: tuple[int, int, int, int],
    ) -> None:
        self.old_rate = old_rate
        self.resampler = resampler  # the old stream's, not flushed yet (None: it was 16 kHz already)
        self.drop = drop  # its leading outputs still to discard (it was primed by an earlier join)
        self.grid = grid
        units, u_old, u_new, _ = grid
        self.old = _fit(recent, 2 * units * u_old, left=True)  # zeros before a short stream's start
        self.need = 2 * units * u_new
        self.parts: list[np.ndarray] = []
        self.size = 0


class AudioNormalizer:
    """Stateful converter for one stream. `push(frame)` returns the 16 kHz mono samples ready so far.

    A sample-rate change mid-stream is handled, not rejected, and joined without a click or any loss:
    the old resampler runs 10 ms past the switch on the new audio converted to its rate, and the new one
    starts primed with 10 ms of the old audio converted to its rate; the outputs each makes on the other
    side are dropped, so the sample count is what each piece gives alone. The join needs 20 ms of new
    audio, so up to that much is held back at a switch. `flush()` returns everything held and the
    resampler's tail; the next push starts a fresh resampler (used at utterance ends so no audio
    lingers inside it). An empty frame is a no-op (it does not count as a rate change).
    """

    def __init__(self) -> None:
        self._rate = 0
        self._resampler: rtc.AudioResampler | None = None
        self._drop = 0  # leading outputs of a primed resampler still to discard
        self._recent = np.zeros(0, np.int16)  # the current stream's latest input (empty: nothing to join)
        self._switch: _Switch | None = None
        self._stream_len = 0  # input samples of the current rate since its stream began
        self.samples_in = 0  # input samples per channel seen
        self.samples_out = 0  # 16 kHz samples returned

    def push(self, frame: rtc.AudioFrame) -> np.ndarray:
        mono = frame_to_mono_int16(frame)
        self.samples_in += frame.samples_per_channel
        if mono.size == 0:
            return self._count([])
        out: list[np.ndarray] = []
        if frame.sample_rate != self._rate:
            out += self._change_rate(frame.sample_rate)
        self._stream_len += mono.size
        sw = self._switch
        if sw is None:
            out.append(self._feed(mono))
            return self._count(out)
        sw.parts.append(mono)
        sw.size += mono.size
        if sw.size >= sw.need:
            out += self._finish_switch()
        return self._count(out)

    def flush(self) -> np.ndarray:
        return self._count(self._end_stream())

    # -- internals -------------------------------------------------------------------------------
    def _end_stream(self) -> list[np.ndarray]:
        out = self._finish_switch() if self._switch is not None else []
        if self._resampler is not None:
            out.append(self._drop_leading([_frame_samples(f) for f in self._resampler.flush()]))
        self._resampler, self._drop, self._recent = None, 0, np.zeros(0, np.int16)
        self._stream_len = 0
        return out

    def _change_rate(self, rate: int) -> list[np.ndarray]:
        out = self._finish_switch() if self._switch is not None else []  # a switch within a switch
        # ~5-15 ms of CPU per join: fine for a real change of source, not for a (broken or hostile)
        # sender switching every few frames
        joinable = 0 < self._stream_len >= JOIN_MIN_S * self._rate
        grid = _join_grid(self._rate, rate) if joinable else None
        if grid is None:  # nothing to join to (start, after a flush), a short piece, or an exotic pair
            out += self._end_stream()
        else:
            self._switch = _Switch(self._rate, self._resampler, self._drop, self._recent, grid)
            self._resampler, self._drop, self._recent = None, 0, np.zeros(0, np.int16)
            self._stream_len = 0
        self._rate = rate
        return out

    def _finish_switch(self) -> list[np.ndarray]:
        sw, self._switch = self._switch, None
        assert sw is not None
        new = _concat(sw.parts)
        # short of `need` (a flush or a further switch came first), the new stream ends here: zeros are
        # what its resampler sees after it anyway
        cont, hist = _join(sw.old, _fit(new, sw.need), sw.old_rate, self._rate, sw.grid)
        units, _, _, u_out = sw.grid
        out: list[np.ndarray] = []
        if sw.resampler is not None:
            # fed `cont`, the old resampler makes exactly units * u_out outputs more than it would have
            # (the resampler rounds its count once, for its whole input): they lie past the switch
            tail = [_frame_samples(f) for f in sw.resampler.push(_mono_frame(cont, sw.old_rate))]
            whole = _concat(tail + [_frame_samples(f) for f in sw.resampler.flush()])
            whole = whole[: max(0, whole.size - units * u_out)]
            out.append(whole[min(sw.drop, whole.size) :])
        if self._rate == TARGET_RATE:
            self._recent = hist  # for a later join; 16 kHz audio itself passes as is
            out.append(self._feed(new))
        else:
            # primed with `hist`, the new resampler's first units * u_out outputs lie before the switch
            # (the old stream covered them): dropped, which leaves its count that of `new` alone
            self._drop = units * u_out
            out.append(self._feed(np.concatenate([hist, new])))
        return out

    def _feed(self, mono: np.ndarray) -> np.ndarray:
        self._recent = _tail(np.concatenate([self._recent, mono]), self._rate)
        if self._rate == TARGET_RATE:
            return mono
        if self._resampler is None:
            self._resampler = rtc.AudioResampler(
                self._rate, TARGET_RATE, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH
            )
        return self._drop_leading(
            [_frame_samples(f) for f in self._resampler.push(_mono_frame(mono, self._rate))]
        )

    def _drop_leading(self, parts: list[np.ndarray]) -> np.ndarray:
        out = _concat(parts)
        cut = min(self._drop, out.size)
        self._drop -= cut
        return out[cut:]

    def _count(self, parts: list[np.ndarray]) -> np.ndarray:
        out = _concat(parts)
        self.samples_out += out.shape[0]
        return out


def _mono_frame(x: np.ndarray, rate: int) -> rtc.AudioFrame:
    return rtc.AudioFrame(np.ascontiguousarray(x, np.int16).tobytes(), rate, 1, x.shape[0])


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p.size]
    return np.concatenate(parts).astype(np.int16, copy=False) if parts else np.zeros(0, np.int16)


def _fit(x: np.ndarray, n: int, left: bool = False) -> np.ndarray:
    """`x` cut or zero-padded to n samples (on the right, or on the left with `left`)."""
    if x.size >= n:
        return x[x.size - n :] if left else x[:n]
    pad = np.zeros(n - x.size, np.int16)
    return np.concatenate([pad, x] if left else [x, pad])


def _tail(x: np.ndarray, rate: int) -> np.ndarray:
    return x[-math.ceil(RECENT_S * rate) :]


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
