"""aiortc (PyAV) audio frames -> `rtc.AudioFrame`.

Only the container changes here: samples are laid out as interleaved int16 at the frame's own rate
and channel count. Downmixing and resampling to 16 kHz mono happen in `SpeechStream.push_frame`
(`audio.AudioNormalizer`), the one conversion every ingress shares.
"""

from __future__ import annotations

import numpy as np
from livekit import rtc

from ..errors import InvalidAudioError

_INT16 = ("s16", "s16p")
_FLOAT = ("flt", "fltp", "dbl", "dblp")


def av_frame_to_rtc(frame) -> rtc.AudioFrame:
    """Convert one `av.AudioFrame` (aiortc decodes Opus to 48 kHz stereo packed s16).

    s16 / s16p are copied as they are; float formats are clipped to [-1, 1] (NaN -> 0) and scaled.
    Any other sample format, or a frame whose data does not match its header, raises InvalidAudioError.
    """
    fmt = frame.format.name
    channels = len(frame.layout.channels)
    samples = frame.samples
    if frame.sample_rate <= 0 or channels <= 0:
        raise InvalidAudioError(f"bad audio frame: rate {frame.sample_rate}, {channels} channels")
    if fmt not in _INT16 + _FLOAT:
        raise InvalidAudioError(f"unsupported audio sample format {fmt!r} (expected s16 or float)")
    arr = frame.to_ndarray()
    # packed: (1, samples * channels) already interleaved; planar: (channels, samples)
    arr = arr.T.reshape(-1) if frame.format.is_planar else arr.reshape(-1)
    if arr.shape[0] != samples * channels:
        raise InvalidAudioError(f"audio frame holds {arr.shape[0]} values, expected {samples} x {channels}")
    if fmt in _FLOAT:
        arr = np.round(np.clip(np.nan_to_num(arr, nan=0.0), -1.0, 1.0) * 32767.0)
    data = np.ascontiguousarray(arr, dtype=np.int16)
    return rtc.AudioFrame(data.tobytes(), frame.sample_rate, channels, samples)
