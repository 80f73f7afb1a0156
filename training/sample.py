"""Write the bundled in-domain recording for the test model: held-out sentences (never trained on) in
seen voices, with pauses between them, as 16 kHz PCM16 WAV plus its reference.

    .venv-official/bin/python -m training.sample

-> ``livekit_qwen_asr/assets/test_model_speech.wav`` and ``test_model_speech.json`` (the reference
text, and each sentence's words, voice and sample range).
"""

from __future__ import annotations

import json
import random
import sys
import wave
from pathlib import Path

import numpy as np

from training.corpus import FULL, _voice, is_held_out, load_words, sentence
from training.speech import SAMPLE_RATE, TRAIN_VARIANTS, Espeak

ASSETS = Path(__file__).resolve().parents[1] / "livekit_qwen_asr" / "assets"
SEED = 5_000_000  # = train_easy's seed base, but only held-out sentences are kept here: never trained on
SENTENCES = 4
PAUSE_S = 0.8


def main() -> int:
    rng = random.Random(SEED)
    words, espeak = load_words(), Espeak()
    parts = [np.zeros(int(0.3 * SAMPLE_RATE), np.float32)]
    meta = []
    n = parts[0].size
    for _ in range(SENTENCES):
        while True:
            ws = sentence(rng, words, min_w=4, max_w=9)
            if is_held_out(ws):
                break
        voice, speed, pitch = _voice(rng, TRAIN_VARIANTS, FULL)
        u = espeak.say(ws, voice, speed, pitch)
        seg = u.audio[: u.speech_end]
        meta.append({"text": " ".join(ws), "voice": voice, "start": n, "end": n + seg.size})
        parts += [seg, np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)]
        n += seg.size + parts[-1].size
    audio = np.concatenate(parts)
    pcm = np.round(np.clip(audio / max(1e-6, float(np.abs(audio).max())) * 0.7, -1, 1) * 32767).astype("<i2")
    with wave.open(str(ASSETS / "test_model_speech.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    reference = {"text": " ".join(m["text"] for m in meta), "sentences": meta, "seed": SEED}
    (ASSETS / "test_model_speech.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(json.dumps({"seconds": round(audio.size / SAMPLE_RATE, 2), **reference}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
