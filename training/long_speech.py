"""Write pause-free in-domain speech for the forced-cut test: held-out sentences (never trained on) in
one seen voice, each trimmed of its leading and trailing silence and joined with no pause, so the
plugin's endpointing never finds an end of speech and must cut by `max_utterance_sec`.

    .venv-official/bin/python -m training.long_speech OUT.wav [--seconds 120] [--seed N]

-> OUT.wav (16 kHz PCM16 mono) and OUT.json: the reference text and every word with its start and end
second (a word ends where the next one starts, as espeak-ng placed them; a sentence's last word ends at
its last non-silent sample).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import wave
from pathlib import Path

import numpy as np

from training.corpus import EASY, _voice, is_held_out, load_words, sentence
from training.speech import SAMPLE_RATE, TRAIN_VARIANTS, Espeak

SEED = 7_000_000
LOUD = 0.01  # the level training.speech uses for the end of speech


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.long_speech", description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    vocab, espeak = load_words(), Espeak()
    voice, speed, pitch = _voice(rng, TRAIN_VARIANTS[:12], EASY)  # one seen speaker, easy acoustics
    parts: list[np.ndarray] = []
    words: list[list] = []
    n = 0
    while n < a.seconds * SAMPLE_RATE:
        while True:
            ws = sentence(rng, vocab, min_w=4, max_w=12)
            if is_held_out(ws):
                break
        u = espeak.say(ws, voice, speed, pitch)
        loud = np.flatnonzero(np.abs(u.audio) > LOUD)
        head = int(loud[0]) if loud.size else 0
        seg = u.audio[head : u.speech_end]
        bounds = [max(s - head, 0) for s in u.word_starts] + [seg.size]
        for w, s, e in zip(ws, bounds, bounds[1:], strict=False):
            words.append([w, round((n + s) / SAMPLE_RATE, 4), round((n + e) / SAMPLE_RATE, 4)])
        parts.append(seg)
        n += seg.size
    audio = np.concatenate(parts)
    pcm = np.round(np.clip(audio / max(1e-6, float(np.abs(audio).max())) * 0.7, -1, 1) * 32767).astype("<i2")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(a.out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    ref = {
        "text": " ".join(w for w, _, _ in words),
        "words": words,
        "voice": f"{voice} s{speed} p{pitch}",
        "seed": a.seed,
    }
    a.out.with_suffix(".json").write_text(json.dumps(ref) + "\n")
    print(json.dumps({"seconds": round(audio.size / SAMPLE_RATE, 2), "words": len(words), "voice": voice}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
