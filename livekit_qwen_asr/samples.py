"""Bundled test speech and helpers to turn a WAV into LiveKit frames (demo, tests, benchmarks).

`assets/speech_en_16k.wav` was made with:
  espeak-ng -v en-us -s 150 -w s.wav "Hello, this is a streaming speech recognition test for LiveKit. ..."
  sox s.wav -r 16000 -c 1 -b 16 -e signed-integer -t wavpcm speech_en_16k.wav
"""

from __future__ import annotations

import re
import wave
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from livekit import rtc

from .errors import InvalidAudioError


def bundled_speech_path() -> Path:
    return Path(str(resources.files("livekit_qwen_asr") / "assets" / "speech_en_16k.wav"))


def read_wav(path: str | Path) -> tuple[np.ndarray, int, int]:
    """(interleaved int16 samples, sample_rate, channels) of a 16-bit PCM WAV."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise InvalidAudioError(f"{path}: only 16-bit PCM WAV is supported")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).copy()
        return data, w.getframerate(), w.getnchannels()


def write_wav(path: str | Path, mono: np.ndarray, rate: int = 16_000) -> Path:
    """Write int16 mono samples as a 16-bit PCM WAV (what `read_wav` reads)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(mono, dtype=np.int16).tobytes())
    return Path(path)


def upsample_to_stereo(mono16k: np.ndarray, rate: int = 16_000, out_rate: int = 48_000) -> np.ndarray:
    """Mono int16 at `rate` -> interleaved stereo int16 at `out_rate` (L = R), as WebRTC delivers it."""
    if rate == out_rate:
        up = mono16k
    else:
        rs = rtc.AudioResampler(rate, out_rate, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH)
        parts = [
            np.frombuffer(f.data, np.int16)
            for f in rs.push(rtc.AudioFrame(mono16k.tobytes(), rate, 1, len(mono16k)))
        ]
        parts += [np.frombuffer(f.data, np.int16) for f in rs.flush()]
        up = np.concatenate(parts)
    return np.repeat(up, 2)


def iter_frames(
    interleaved: np.ndarray, rate: int, channels: int, sizes_ms: Sequence[float] = (20.0,)
) -> Iterator[rtc.AudioFrame]:
    """Cut interleaved int16 audio into `rtc.AudioFrame`s, cycling through `sizes_ms` (irregular sizes)."""
    n_total = len(interleaved) // channels
    pos, i = 0, 0
    while pos < n_total:
        n = max(1, int(round(rate * sizes_ms[i % len(sizes_ms)] / 1000)))
        n = min(n, n_total - pos)
        chunk = interleaved[pos * channels : (pos + n) * channels]
        yield rtc.AudioFrame(chunk.tobytes(), rate, channels, n)
        pos += n
        i += 1


def pause_free_speech(seconds: float, rate: int = 16_000) -> np.ndarray:
    """`seconds` of speech without a pause an endpointer would take for the end of an utterance:
    the bundled clip (pauses between its sentences are under 0.4 s) with its leading and trailing
    silence trimmed, repeated. float32 in [-1, 1], 16 kHz mono. For benchmarks and long tests."""
    if rate != 16_000:
        raise ValueError("the bundled speech is 16 kHz")
    data, _, _ = read_wav(bundled_speech_path())
    loud = np.flatnonzero(np.abs(data.astype(np.int32)) > 300)
    clip = data[loud[0] : loud[-1] + 1].astype(np.float32) / 32768.0
    n = int(round(seconds * rate))
    return np.tile(clip, -(-n // clip.shape[0]))[:n]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word edit distance / reference words, on lowercased words without punctuation."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w' ]+", " ", text.lower()).split()
