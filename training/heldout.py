"""Write the held-out sets as folders of `name.wav` + `name.txt` (+ `name.words.json`: each word with
its start and end second, as espeak-ng placed it), the input of bench/fidelity.py.

    .venv-official/bin/python -m training.heldout [--n 40] [--out results/heldout] [--sets test ...]

Sets (training.corpus.SPLITS): `test` (new sentences, seen voices), `test_unseen` (new sentences,
voice variants never trained on), `test_noise` (new sentences, seen voices, noise on every example).
Only `whole` and `long` examples: a `cut` example's reference leaves out a partly spoken last word,
which an offline transcription may still write.
"""

from __future__ import annotations

import argparse
import json
import sys
import wave
from pathlib import Path

import numpy as np
import torch

from training import corpus

SETS = ("test", "test_unseen", "test_noise")


def write_set(split: str, out: Path, n: int) -> int:
    data = torch.load(corpus.shard_path(split, 0))
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    if "times" not in data:
        raise SystemExit(f"{corpus.shard_path(split, 0)} has no word times: delete it, run training.corpus")
    rows = zip(data["text"], data["kind"], data["audio"], data["times"], strict=True)
    for i, (text, kind, audio, times) in enumerate(rows):
        if kind not in ("whole", "long") or not text or written >= n:
            continue
        pcm = np.round(np.clip(audio.numpy(), -1, 1) * 32767).astype("<i2")
        with wave.open(str(out / f"{split}-{i:04d}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(corpus.SAMPLE_RATE)
            w.writeframes(pcm.tobytes())
        (out / f"{split}-{i:04d}.txt").write_text(text + "\n")
        sr = corpus.SAMPLE_RATE
        words = [[w, a / sr, b / sr] for w, (a, b) in zip(text.split(), times, strict=True)]
        (out / f"{split}-{i:04d}.words.json").write_text(json.dumps(words) + "\n")
        written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.heldout", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40, help="recordings per set")
    ap.add_argument("--out", type=Path, default=Path("results/heldout"))
    ap.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="which sets to write")
    a = ap.parse_args(argv)
    for split in a.sets:
        print(split, write_set(split, a.out / split, a.n), "recordings ->", a.out / split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
