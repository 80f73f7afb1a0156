"""The synthetic corpus: sentences over a fixed word list, spoken by espeak-ng, as training examples.

Every shard is a pure function of (split, shard index): ``python -m training.corpus`` regenerates the
same data in any session, so only the model state is committed, never the data.

Example kinds (the plugin's real inputs):
- ``whole``: one sentence of 1-14 words (random words, or a template with random slot words);
- ``cut``: the same, cut at an arbitrary sample; the target is the words it contains
  (``speech.words_heard``), as a streaming step sees a growing recording;
- ``long``: 2-6 sentences with pauses, up to 30 s (crosses the encoder's 8 s windows, long prompts),
  sometimes cut as well.
Augmentation: speed, pitch, voice variant, gain, and white/brown noise at 5-35 dB SNR on a share.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from training.speech import (
    BASES,
    HELD_OUT_VARIANTS,
    SAMPLE_RATE,
    TRAIN_VARIANTS,
    Espeak,
    Utterance,
    words_heard,
)

HERE = Path(__file__).resolve().parent
# Stage 1 of the domain: the most frequent words of words.txt (wordfreq's English list) plus the
# templates' words. 1,000 words from scratch kept the encoder on the CTC blank plateau for 2,100 steps
# (0.83 CPU h; ~160 examples per word seen); the spike's 365 words left it by step 1,000. Grow the
# list (and the model's used rows) once the targets hold on this one.
DOMAIN_WORDS = 400
DATA_DIR = Path(os.environ.get("TEST_MODEL_DATA", HERE / "data" / f"w{DOMAIN_WORDS}"))
MAX_SECONDS = 30.0
SHARD_SIZE = 500

TEMPLATES = (
    "i think the {} is {}",
    "can you tell me about the {}",
    "we will meet at the {} {}",
    "please send the {} to {}",
    "the {} and the {} are {}",
    "did you see the {} {}",
    "i want to {} the {}",
    "there is a {} in the {}",
    "it was a {} {} for the {}",
    "my {} said that {} was {}",
    "we need more {} and {}",
    "how do you {} a {}",
    "this is the {} of the {}",
    "they have {} {} {}",
    "what about {} {}",
    "let me know if you {}",
)
# Splits: seed base and which voices they use.  Held-out sets never repeat a training sentence.
SPLITS = {
    "train": (1_000_000, TRAIN_VARIANTS),
    "test": (2_000_000, TRAIN_VARIANTS),  # new sentences, seen voices
    "test_unseen": (3_000_000, HELD_OUT_VARIANTS),  # new sentences, voice variants never trained on
    "test_noise": (4_000_000, TRAIN_VARIANTS),  # new sentences, seen voices, noise on every example
    # Curriculum's first stage: the spike's acoustic range (12 variants, 140-190 wpm, near-default pitch
    # and level, no noise), same sentences and example kinds (training/README.md).
    "train_easy": (5_000_000, TRAIN_VARIANTS[:12]),
}


@dataclass(frozen=True)
class Acoustics:
    speed: tuple[int, int] = (120, 210)  # words per minute
    pitch: tuple[int, int] = (20, 80)
    gain: tuple[float, float] = (0.05, 0.95)  # peak, fraction of full scale
    noise_p: float = 0.3  # share of examples with white/brown noise at 5-35 dB SNR


FULL = Acoustics()
EASY = Acoustics(speed=(140, 190), pitch=(35, 65), gain=(0.5, 0.95), noise_p=0.0)


def load_words() -> list[str]:
    words = (HERE / "words.txt").read_text().split()[:DOMAIN_WORDS]
    for t in TEMPLATES:  # every word a template can say is in the domain
        words += [w for w in t.split() if w != "{}" and w not in words]
    return words


def sentence(rng: random.Random, words: list[str], min_w: int = 1, max_w: int = 14) -> list[str]:
    if rng.random() < 0.3:
        t = rng.choice(TEMPLATES)
        s = t.format(*(rng.choice(words) for _ in range(t.count("{}")))).split()
        if min_w <= len(s) <= max_w:
            return s
    # short sentences over-represented: the decoder learns to find word k in the audio from them
    n = rng.randint(min_w, 4) if rng.random() < 0.35 else rng.randint(min_w, max_w)
    return [rng.choice(words) for _ in range(n)]


def is_held_out(words: list[str]) -> bool:
    """A fixed hash splits sentence space: held-out sets only use sentences training never can."""
    return hash_words(words) % 10 == 0


def hash_words(words: list[str]) -> int:
    h = 1469598103934665603
    for ch in " ".join(words).encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 64)
    return h


def _voice(rng: random.Random, variants: tuple[str, ...], ac: Acoustics) -> tuple[str, int, int]:
    base = rng.choice(BASES)
    var = rng.choice(variants)
    return base + (f"+{var}" if var else ""), rng.randint(*ac.speed), rng.randint(*ac.pitch)


def _augment(rng: random.Random, audio: np.ndarray, noise: bool, ac: Acoustics) -> np.ndarray:
    peak = float(np.abs(audio).max()) or 1.0
    audio = audio * (rng.uniform(*ac.gain) / peak)
    if noise:
        g = np.random.default_rng(rng.getrandbits(32))
        n = g.standard_normal(len(audio)).astype(np.float32)
        if rng.random() < 0.5:  # brown noise
            n = np.cumsum(n)
            n -= np.convolve(n, np.ones(801) / 801, mode="same")
        snr_db = rng.uniform(5, 35)
        p_sig = float(np.mean(audio**2)) + 1e-12
        n *= np.sqrt(p_sig / (10 ** (snr_db / 10)) / (float(np.mean(n**2)) + 1e-12))
        audio = audio + n
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def word_times(u: Utterance, offset: int) -> list[tuple[int, int]]:
    """(start, end) sample of each word of `u` placed at `offset`: a word ends where the next starts
    (the last one at the end of speech), as espeak-ng reports them."""
    ends = list(u.word_starts[1:]) + [u.speech_end]
    return [(offset + a, offset + max(a, b)) for a, b in zip(u.word_starts, ends, strict=True)]


class Generator:
    def __init__(self) -> None:
        self.espeak = Espeak()
        self.words = load_words()
        self.fe = WhisperFeatureExtractor(
            feature_size=128,
            sampling_rate=16000,
            hop_length=160,
            chunk_length=30,
            n_fft=400,
            padding_value=0.0,
            return_attention_mask=True,
        )

    def _say(
        self, rng: random.Random, variants: tuple[str, ...], held_out: bool, ac: Acoustics = FULL
    ) -> Utterance:
        while True:
            ws = sentence(rng, self.words)
            if is_held_out(ws) == held_out:
                break
        return self.espeak.say(ws, *_voice(rng, variants, ac))

    def example(
        self,
        rng: random.Random,
        variants: tuple[str, ...],
        held_out: bool,
        noise_p: float,
        ac: Acoustics = FULL,
    ) -> dict:
        """One example: audio, target text, kind, voice, and each word's (start, end) sample."""
        r = rng.random()
        lead = np.zeros(int(rng.uniform(0.0, 0.4) * SAMPLE_RATE), np.float32)
        if r < 0.08:  # long: several sentences with pauses (the costliest examples to train on)
            parts, words, voices, times = [lead], [], [], []
            n = 0
            for _ in range(rng.randint(2, 6)):
                u = self._say(rng, variants, held_out, ac)
                seg = u.audio[: u.speech_end]
                if n + len(seg) > (MAX_SECONDS - 1.0) * SAMPLE_RATE:
                    break
                times += word_times(u, sum(len(p) for p in parts))
                parts.append(seg)
                parts.append(np.zeros(int(rng.uniform(0.1, 0.8) * SAMPLE_RATE), np.float32))
                n = sum(len(p) for p in parts)
                words += list(u.words)
                voices.append(u.voice)
            audio = np.concatenate(parts)
            kind, text, voice = "long", " ".join(words), "; ".join(voices)
        else:
            u = self._say(rng, variants, held_out, ac)
            text, voice = " ".join(u.words), u.voice
            tail = np.zeros(int(rng.uniform(0.0, 0.4) * SAMPLE_RATE), np.float32)
            if r < 0.45:  # cut at an arbitrary point after the first word began
                first = u.word_starts[0] + SAMPLE_RATE // 5
                cut = rng.randint(first, max(u.speech_end, first + 1))
                k = words_heard(u, cut)
                audio = np.concatenate([lead, u.audio[:cut]])
                kind, text = "cut", " ".join(u.words[:k])
                times = [(a, min(b, len(audio))) for a, b in word_times(u, len(lead))[:k]]
            else:
                audio = np.concatenate([lead, u.audio[: u.speech_end], tail])
                kind = "whole"
                times = word_times(u, len(lead))
        audio = _augment(rng, audio, noise=rng.random() < noise_p, ac=ac)
        return {"audio": audio, "text": text, "kind": kind, "voice": voice, "times": times}

    def features(self, audio: np.ndarray) -> torch.Tensor:
        # what Qwen3ASRProcessor does: pad to the longest (here: itself), no truncation
        r = self.fe(
            audio,
            sampling_rate=16000,
            padding=True,
            truncation=False,
            return_attention_mask=True,
            return_tensors="pt",
        )
        n = int(r["attention_mask"][0].sum())
        return r["input_features"][0][:, :n].to(torch.float16)


def shard_path(split: str, index: int) -> Path:
    return DATA_DIR / f"{split}_{index:04d}.pt"


def shard_files(split: str) -> list[Path]:
    """The split's shards on disk, in order ("train_0001", not "train_easy_0001")."""
    return sorted(DATA_DIR.glob(f"{split}_[0-9]*.pt"))


def write_shard(
    gen: Generator, split: str, index: int, size: int = SHARD_SIZE, keep_audio: bool = False
) -> Path:
    seed_base, variants = SPLITS[split]
    rng = random.Random(seed_base + index)
    ac = EASY if split == "train_easy" else FULL
    noise_p = 1.0 if split == "test_noise" else (0.0 if split.startswith("test") else ac.noise_p)
    out: dict[str, list] = {"text": [], "kind": [], "voice": [], "feats": [], "audio": [], "times": []}
    for _ in range(size):
        ex = gen.example(rng, variants, held_out=split.startswith("test"), noise_p=noise_p, ac=ac)
        out["text"].append(ex["text"])
        out["kind"].append(ex["kind"])
        out["voice"].append(ex["voice"])
        out["times"].append(ex["times"])  # word (start, end) samples: the fidelity latency figures
        out["feats"].append(gen.features(ex["audio"]))
        if keep_audio:
            out["audio"].append(torch.from_numpy(ex["audio"]))
    path = shard_path(split, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=sorted(SPLITS), default="train")
    ap.add_argument("--shards", default="0-9", help="range a-b (inclusive) of shard indices")
    ap.add_argument("--size", type=int, default=SHARD_SIZE)
    ap.add_argument("--every", type=int, default=1, help="with --offset: this worker's share of the range")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--keep-audio", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    lo, hi = (int(x) for x in a.shards.split("-"))
    gen = Generator()
    for i in range(lo + a.offset, hi + 1, a.every):
        if shard_path(a.split, i).exists():
            continue
        t0 = time.time()
        keep = a.keep_audio or a.split.startswith("test")
        write_shard(gen, a.split, i, a.size, keep_audio=keep)
        print(f"{a.split} shard {i}: {a.size} examples in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
