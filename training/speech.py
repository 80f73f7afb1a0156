"""espeak-ng speech with exact word timings, through libespeak-ng's synchronous API (ctypes).

The CLI would need one process per utterance and gives no timings; the library's word events give
each word's first sample, which is what cut-audio (streaming-shaped) examples need to know which words
a truncated recording contains.  ~100-200x real time on one core.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
_ESPEAK_RATE = 22050  # libespeak-ng's native rate (checked at initialisation)

# Accents (espeak-ng voice names; "en" is British English, "en-gb" is not a name the library takes).
BASES = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
# Voice variants (espeak-ng-data/voices/!v).  Training uses TRAIN_VARIANTS; HELD_OUT_VARIANTS are never
# used in training and make the "unseen voices" test set.  Whispering, robot and effect voices are left out.
TRAIN_VARIANTS = (
    "",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "Alex",
    "Alicia",
    "Andrea",
    "Annie",
    "Denis",
    "Diogo",
    "Gene",
    "Henrique",
    "Hugo",
    "Jacky",
    "Lee",
    "Marco",
    "Mario",
    "Michael",
    "Mike",
    "Nguyen",
    "adam",
    "anika",
    "announcer",
    "antonio",
    "aunty",
    "belinda",
    "benjamin",
    "boris",
    "caleb",
    "david",
    "ed",
    "edward",
    "grandma",
    "iven",
    "iven2",
    "john",
    "klatt",
    "klatt2",
    "klatt3",
    "linda",
    "marcelo",
    "michel",
    "miguel",
    "norbert",
    "pablo",
    "pedro",
    "quincy",
    "rob",
    "robert",
    "sandro",
    "shelby",
    "steph",
    "travis",
    "victor",
    "zac",
)
HELD_OUT_VARIANTS = (
    "f5",
    "m8",
    "Andy",
    "Gene2",
    "edward2",
    "grandpa",
    "iven3",
    "klatt4",
    "max",
    "paul",
    "steph2",
)


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)
_EVENT_LIST_END, _EVENT_WORD = 0, 1
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _PITCH = 1, 3
_POS_CHARACTER = 1


@dataclass(frozen=True)
class Utterance:
    """16 kHz float32 mono audio and, per word, the sample where espeak-ng starts it."""

    audio: np.ndarray
    words: tuple[str, ...]
    word_starts: tuple[int, ...]  # samples at 16 kHz
    speech_end: int  # sample after the last non-silent sample
    voice: str


class Espeak:
    """One libespeak-ng instance (the library is global state: one per process)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        self._lib = ctypes.CDLL(name)
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
        if rate != _ESPEAK_RATE:
            raise RuntimeError(f"libespeak-ng runs at {rate} Hz, expected {_ESPEAK_RATE}")
        self._chunks: list[np.ndarray] = []
        self._starts: list[tuple[int, int]] = []  # (text position, sample at 22.05 kHz)
        self._n = 0
        self._cb = _CALLBACK(self._on_audio)  # keep a reference: the library holds a raw pointer
        self._lib.espeak_SetSynthCallback(self._cb)

    def _on_audio(self, wav, n, events) -> int:  # noqa: ANN001 - ctypes callback
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_END:
            if events[i].type == _EVENT_WORD:
                self._starts.append((events[i].text_position, events[i].sample))
            i += 1
        return 0

    def say(self, words: list[str], voice: str, speed: int, pitch: int) -> Utterance:
        text = " ".join(words)
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self._lib.espeak_SetParameter(_RATE, int(speed), 0)
        self._lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self._chunks, self._starts = [], []
        data = text.encode() + b"\0"
        self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, 0, None, None)
        self._lib.espeak_Synchronize()
        raw = (
            np.concatenate(self._chunks).astype(np.float32) / 32768.0
            if self._chunks
            else np.zeros(0, np.float32)
        )
        audio = resample_poly(raw, 320, 441).astype(np.float32)
        # espeak-ng may report several word events for one word ("european"): keep each word's first,
        # found by its character position (1-based in the events)
        offsets, pos = [], 0
        for w in words:
            offsets.append(pos)
            pos += len(w) + 1
        first: dict[int, int] = {}
        for text_pos, sample in self._starts:
            k = max(i for i, o in enumerate(offsets) if o <= max(text_pos - 1, 0))
            first.setdefault(k, sample)
        first.setdefault(0, 0)  # seen missing once; the first word starts the audio anyway
        # it may also join words into one event ("of the"): place those by character offset between the
        # known starts around them
        n_raw = sum(len(c) for c in self._chunks)
        known = sorted(first.items()) + [(len(words), n_raw)]
        offsets.append(pos)
        raw_starts = []
        for (a, sa), (b, sb) in zip(known, known[1:], strict=False):
            for i in range(a, b):
                raw_starts.append(
                    sa + (sb - sa) * (offsets[i] - offsets[a]) / max(offsets[b] - offsets[a], 1)
                )
        starts = [round(x * SAMPLE_RATE / _ESPEAK_RATE) for x in raw_starts]
        loud = np.flatnonzero(np.abs(audio) > 0.01)
        end = int(loud[-1]) + 1 if loud.size else len(audio)
        return Utterance(audio, tuple(words), tuple(starts), end, f"{voice} s{speed} p{pitch}")


def words_heard(utt: Utterance, cut: int, min_fraction: float = 0.6) -> int:
    """How many words of ``utt`` a recording cut at sample ``cut`` contains: a word counts when at least
    ``min_fraction`` of it (start to the next word's start, or to the end of speech) is before the cut."""
    n = 0
    for i, start in enumerate(utt.word_starts):
        end = utt.word_starts[i + 1] if i + 1 < len(utt.word_starts) else utt.speech_end
        if cut >= start + min_fraction * max(end - start, 1):
            n = i + 1
        else:
            break
    return n
