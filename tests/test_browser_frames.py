"""The browser ingress's pure parts: PyAV frames -> rtc.AudioFrame (then the plugin's one converter),
offer checks, labels. Real PyAV frames (what aiortc's Opus decoder returns), real rtc objects."""

from __future__ import annotations

import av
import numpy as np
import pytest
from livekit import rtc

from livekit_qwen_asr.audio import AudioNormalizer
from livekit_qwen_asr.browser.frames import av_frame_to_rtc
from livekit_qwen_asr.browser.session import InvalidOfferError, check_offer_sdp, clean_label
from livekit_qwen_asr.errors import InvalidAudioError


def _av_frame(fmt: str, layout: str, planes: list[np.ndarray], rate: int = 48000) -> av.AudioFrame:
    samples = planes[0].shape[0] // (1 if len(planes) > 1 else len(av.AudioLayout(layout).channels))
    frame = av.AudioFrame(format=fmt, layout=layout, samples=samples)
    for plane, data in zip(frame.planes, planes, strict=True):
        plane.update(np.ascontiguousarray(data).tobytes())
    frame.sample_rate = rate
    return frame


def test_packed_s16_stereo_is_copied_interleaved():
    rng = np.random.default_rng(0)
    inter = rng.integers(-30000, 30000, 960 * 2, dtype=np.int16)  # L0 R0 L1 R1 ...
    out = av_frame_to_rtc(_av_frame("s16", "stereo", [inter]))
    assert (out.sample_rate, out.num_channels, out.samples_per_channel) == (48000, 2, 960)
    np.testing.assert_array_equal(np.frombuffer(out.data, np.int16), inter)


def test_planar_s16_is_interleaved():
    left = np.arange(480, dtype=np.int16)
    right = -left
    out = av_frame_to_rtc(_av_frame("s16p", "stereo", [left, right]))
    got = np.frombuffer(out.data, np.int16).reshape(-1, 2)
    np.testing.assert_array_equal(got[:, 0], left)
    np.testing.assert_array_equal(got[:, 1], right)


def test_float_planar_is_clipped_and_nan_is_silence():
    left = np.array([0.5, -0.5, 2.0, np.nan], np.float32)
    right = np.array([1.0, -1.0, -3.0, 0.0], np.float32)
    out = av_frame_to_rtc(_av_frame("fltp", "stereo", [left, right], rate=16000))
    got = np.frombuffer(out.data, np.int16).reshape(-1, 2)
    np.testing.assert_array_equal(got[:, 0], [16384, -16384, 32767, 0])  # round(0.5 * 32767) = 16384
    np.testing.assert_array_equal(got[:, 1], [32767, -32767, -32767, 0])


def test_unsupported_format_is_a_typed_error():
    frame = _av_frame("u8", "mono", [np.full(160, 128, np.uint8)])
    with pytest.raises(InvalidAudioError, match="u8"):
        av_frame_to_rtc(frame)


def test_browser_audio_goes_through_the_plugin_converter_unchanged():
    """48 kHz stereo av frames -> rtc frames are the same bytes as the rtc frames of the LiveKit path,
    and AudioNormalizer turns them into the same 16 kHz mono: one conversion, not two. (Two soxr
    resampler instances differ by up to 2 LSB run to run, even on identical input: hence atol=2.)"""
    rng = np.random.default_rng(1)
    t = np.arange(48000 * 1) / 48000
    mono = (8000 * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 500, t.shape)).astype(np.int16)
    stereo = np.stack([mono, (mono // 2).astype(np.int16)], axis=1).reshape(-1)
    via_av, direct = AudioNormalizer(), AudioNormalizer()
    out_av, out_direct = [], []
    for i in range(0, mono.shape[0], 960):
        chunk = stereo[2 * i : 2 * (i + 960)]
        converted = av_frame_to_rtc(_av_frame("s16", "stereo", [chunk]))
        lk_frame = rtc.AudioFrame(chunk.tobytes(), 48000, 2, chunk.shape[0] // 2)
        assert bytes(converted.data) == bytes(lk_frame.data)
        out_av.append(via_av.push(converted))
        out_direct.append(direct.push(lk_frame))
    out_av.append(via_av.flush())
    out_direct.append(direct.flush())
    a, b = np.concatenate(out_av), np.concatenate(out_direct)
    np.testing.assert_allclose(a.astype(np.int32), b.astype(np.int32), rtol=0, atol=2)
    assert abs(a.shape[0] - 16000) <= 1  # 1 s of 48 kHz stereo -> 1 s of 16 kHz mono


_AUDIO = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
_DATA = "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
_VIDEO = "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"


def test_offer_checks():
    assert check_offer_sdp(_AUDIO + _DATA)
    for bad, why in [
        (_AUDIO + _VIDEO, "video"),
        (_AUDIO.replace("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "") + _DATA, "exactly one audio"),
        (_AUDIO + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "exactly one audio"),
        ("hello", "SDP"),
        (None, "SDP"),
    ]:
        with pytest.raises(InvalidOfferError, match=why):
            check_offer_sdp(bad)


def test_labels_are_single_line_and_bounded():
    assert clean_label("  Alice\n<b>\x00 ", "x") == "Alice <b>"
    assert clean_label("", "guest-1") == "guest-1"
    assert clean_label(None, "guest-1") == "guest-1"
    assert len(clean_label("y" * 500, "x")) == 40
