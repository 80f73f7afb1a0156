"""A sample-rate change mid-stream must not click.

The signal is continuous across the switch (same waveform, sampled at the old rate before it and the new
rate after it). The output around the switch is compared with the same signal resampled in one piece at a
single rate; the bound is the resampler's own error elsewhere in the same output (rounding + dither, a
few LSB), times a stated factor. The old code (flush the old resampler, start a cold one) left a
~1 ms click there: 560-5,400 LSB on an 8,000 LSB tone, against 2-3 LSB elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from livekit import rtc

from livekit_qwen_asr.audio import TARGET_RATE, AudioNormalizer
from livekit_qwen_asr.samples import bundled_speech_path, iter_frames, read_wav

AMP = 8000
SWITCH_S = 0.5  # on every rate's grid and on the 16 kHz output grid
NEAR = 160  # output samples (10 ms) on each side of the switch: covers the resampler's ~3 ms filter
FACTOR = 4  # the switch may deviate at most 4x the normal error measured elsewhere in the same run


def _tone(rate: int, start_s: float, end_s: float, freq: float) -> np.ndarray:
    # cosine peaking at the switch: the worst case for a cold resampler (a zero crossing would hide it)
    t = np.arange(round(start_s * rate), round(end_s * rate)) / rate
    return np.round(AMP * np.cos(2 * np.pi * freq * (t - SWITCH_S))).astype(np.int16)


def _resample(x: np.ndarray, rate: int) -> np.ndarray:
    """One piece, one resampler: the reference the switched stream must match."""
    if rate == TARGET_RATE:
        return x.copy()
    rs = rtc.AudioResampler(rate, TARGET_RATE, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH)
    frames = list(rs.push(rtc.AudioFrame(x.tobytes(), rate, 1, x.shape[0]))) + list(rs.flush())
    return np.concatenate([np.frombuffer(f.data, np.int16) for f in frames])


def _normalize(pieces: list[tuple[np.ndarray, int]], sizes_ms: tuple[float, ...]) -> np.ndarray:
    norm = AudioNormalizer()
    out = [norm.push(f) for x, rate in pieces for f in iter_frames(x, rate, 1, sizes_ms)]
    out.append(norm.flush())
    return np.concatenate(out)


def _deviation(out: np.ndarray, ref: np.ndarray) -> tuple[int, int]:
    """(max |out - ref| within NEAR of the switch, max |out - ref| in the steady parts away from it)."""
    assert out.shape == ref.shape
    err = np.abs(out.astype(np.int64) - ref.astype(np.int64))
    k = round(SWITCH_S * TARGET_RATE)
    near = int(err[k - NEAR : k + NEAR].max())
    # "elsewhere": 50-450 ms into each piece, clear of the switch and of the stream's own start/end
    steady = np.concatenate([err[800 : k - 800], err[k + 800 : -800]])
    return near, int(steady.max())


@pytest.mark.parametrize(
    ("old", "new"),
    [(48000, 24000), (16000, 48000), (44100, 16000), (24000, 48000), (48000, 44100), (8000, 48000)],
)
@pytest.mark.parametrize("freq", [440.0, 3000.0])
def test_rate_switch_is_seamless_for_a_continuous_tone(old, new, freq):
    end_s = 2 * SWITCH_S
    out = _normalize([(_tone(old, 0, SWITCH_S, freq), old), (_tone(new, SWITCH_S, end_s, freq), new)], (20,))
    # the reference is the tone at the higher of the two rates, resampled in one piece
    hi = max(old, new)
    ref = _resample(_tone(hi, 0, end_s, freq), hi)
    assert out.shape[0] == ref.shape[0] == round(end_s * TARGET_RATE)  # nothing lost or added
    near, steady = _deviation(out, ref)
    assert near <= FACTOR * max(steady, 1), f"click at the switch: {near} LSB vs {steady} LSB elsewhere"


def test_rate_switch_in_speech_with_small_frames():
    """Real speech, 48 kHz -> 24 kHz, delivered in frames shorter than the switch needs to look ahead:
    the normalizer holds a few ms back at the switch and still joins the two rates without a click."""
    data, rate, channels = read_wav(bundled_speech_path())
    speech = data.reshape(-1, channels)[:, 0]
    assert rate == TARGET_RATE
    hi = _resample_up(speech[:TARGET_RATE], 48000)
    lo = hi[::2]  # 48 kHz speech (content < 8 kHz) sampled at 24 kHz: the same continuous signal
    cut = 24000  # 0.5 s
    out = _normalize([(hi[:cut], 48000), (lo[cut // 2 :], 24000)], (2.5, 1, 4))
    ref = _resample(hi, 48000)
    assert out.shape[0] == ref.shape[0] == TARGET_RATE
    near, steady = _deviation(out, ref)
    assert near <= FACTOR * max(steady, 1), f"click at the switch: {near} LSB vs {steady} LSB elsewhere"


def _resample_up(x16k: np.ndarray, rate: int) -> np.ndarray:
    rs = rtc.AudioResampler(TARGET_RATE, rate, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH)
    frames = list(rs.push(rtc.AudioFrame(x16k.tobytes(), TARGET_RATE, 1, x16k.shape[0]))) + list(rs.flush())
    return np.concatenate([np.frombuffer(f.data, np.int16) for f in frames])


def test_sample_counts_at_switches_are_unchanged():
    """The join holds back and primes, but the output count per piece stays the resampler's own rounding."""
    norm = AudioNormalizer()
    total = 0
    for rate, ms in [(48000, 10), (44100, 7.3), (16000, 20), (8000, 3), (22050, 10), (48000, 1)]:
        x = _tone(rate, 0, 0.25, 440)
        total += sum(norm.push(f).size for f in iter_frames(x, rate, 1, (ms,)))
    total += norm.flush().size
    assert total == norm.samples_out
    assert abs(total - 6 * 4000) <= 6  # 6 x 0.25 s at 16 kHz, within one sample of rounding per piece


def test_flush_and_further_switches_during_a_join_lose_nothing():
    """A switch holds a few ms back until the new rate has enough audio to join on; a flush or another
    switch before that finishes the join with what there is."""
    norm = AudioNormalizer()
    got = [norm.push(f) for f in iter_frames(_tone(48000, 0, 0.2, 440), 48000, 1, (20,))]
    held = norm.push(next(iter_frames(_tone(24000, 0.2, 0.205, 440), 24000, 1, (5,))))
    assert held.size == 0  # 5 ms of 24 kHz: not enough to join yet
    got += [held, norm.flush()]
    assert sum(g.size for g in got) == 3200 + 80 == norm.samples_out
    # a second switch before the first is joined, then a third
    norm = AudioNormalizer()
    total = sum(norm.push(f).size for f in iter_frames(_tone(44100, 0, 0.2, 440), 44100, 1, (10,)))
    total += norm.push(rtc.AudioFrame(_tone(48000, 0, 0.001, 440).tobytes(), 48000, 1, 48)).size
    total += sum(norm.push(f).size for f in iter_frames(_tone(16000, 0, 0.2, 440), 16000, 1, (10,)))
    total += norm.flush().size
    assert total == 3200 + 16 + 3200 == norm.samples_out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000, 8001]),
            st.integers(0, 6000),
            st.sampled_from([7, 160, 480, 10_000]),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_output_count_is_each_pieces_own_count(ops):
    """Whatever the switches, flushes and frame sizes, the output is exactly as long as each piece
    (a run of one rate between switches and flushes) resampled on its own: no sample lost or added."""
    norm = AudioNormalizer()
    total = expected = 0
    piece: list[np.ndarray] = []
    piece_rate = 0

    def close_piece() -> int:
        return _resample(np.concatenate(piece), piece_rate).size if piece else 0

    for rate, n, chunk, flush in ops:
        x = _tone(rate, 0, n / rate, 300)
        if x.size and rate != piece_rate:
            expected += close_piece()
            piece, piece_rate = [], rate
        for i in range(0, x.size, chunk):
            part = x[i : i + chunk]
            total += norm.push(rtc.AudioFrame(part.tobytes(), rate, 1, part.size)).size
            piece.append(part)
        if flush:
            total += norm.flush().size
            expected += close_piece()
            piece = []
    total += norm.flush().size
    expected += close_piece()
    assert total == expected == norm.samples_out
