"""Words at forced cuts (issue #12): what an utterance cut by `max_utterance_sec` does to the words
spoken across the cut.

Input: pause-free speech with word times (`training.long_speech`: held-out sentences in one seen voice,
no pause anywhere, so the endpointer never ends an utterance and every segment ends by a forced cut).
It runs through `STT.stream()` (bundled VAD, plugin defaults but `max_utterance_sec`); every segment's
audio (from the finals' start/end) is also decoded offline in one step.

Also, without the model: at a cut every 1.7 s, how often the endpointer's cut rule falls inside a word
(its middle 60 %), beside the quietest-20-ms rule it replaced.

Reported per cut: where it fell in the word espeak-ng was saying (a word's span runs to the next word's
start), and how many reference words beside it the finals got wrong (the word the cut is in, or the two
words whose boundary is nearest) and how many words they inserted there; the same for the offline
decodes of the segments (what the cut position alone costs), and for the streaming finals at each
segment's middle (the model's own error rate away from any cut), so the three can be compared.

    .venv/bin/python -m bench.forced_cuts SPEECH.wav [--max-utterance-sec 10 30] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float
    text: str  # the stream's final
    offline: str  # the same audio decoded in one step, no prefix


def word_index(ref: list[list], t: float) -> int | None:
    """Index of the reference word whose span holds the time `t`, None outside every word."""
    for i, (_, a, b) in enumerate(ref):
        if a <= t < b:
            return i
    return None


def words_at(ref: list[list], t: float) -> list[int]:
    """Indices of the reference words a point in time touches: the word it falls in, or when it is within
    40 ms of a word boundary, the two words on either side of that boundary."""
    i = word_index(ref, t)
    if i is None:
        return [len(ref) - 1] if ref and t >= ref[-1][2] else []
    _, a, b = ref[i]
    if t - a < 0.04 and i > 0:
        return [i - 1, i]
    if b - t < 0.04 and i + 1 < len(ref):
        return [i, i + 1]
    return [i]


def align(ref_words: list[str], hyp_words: list[str]) -> tuple[list[bool], list[int]]:
    """(for each reference word: matched by a hypothesis word, for each unmatched hypothesis word: the
    reference position it was inserted before), from difflib's matching blocks."""
    sm = difflib.SequenceMatcher(a=ref_words, b=hyp_words, autojunk=False)
    matched = [False] * len(ref_words)
    inserted: list[int] = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            matched[i1:i2] = [True] * (i2 - i1)
        elif tag in ("insert", "replace") and j2 - j1 > i2 - i1:
            inserted += [i2] * ((j2 - j1) - (i2 - i1))
    return matched, inserted


def damage(ref: list[list], hyp_text: str, points: list[float]) -> list[dict]:
    from bench.fidelity import normalize  # the fidelity bench's word normalisation (case, punctuation)

    ref_words = [normalize(w) for w, _, _ in ref]
    matched, inserted = align(ref_words, normalize(hyp_text).split())
    out = []
    for t in points:
        idx = words_at(ref, t)
        lost = [ref_words[i] for i in idx if not matched[i]]
        ins = sum(1 for p in inserted if idx and idx[0] <= p <= idx[-1] + 1)
        out.append({"t": round(t, 3), "words": [ref_words[i] for i in idx], "wrong": lost, "inserted": ins})
    return out


def where_in_word(ref: list[list], t: float) -> float | None:
    """Fraction of the word's span before the cut (0: at its start), None outside any word."""
    i = word_index(ref, t)
    if i is None:
        return None
    _, a, b = ref[i]
    return (t - a) / max(b - a, 1e-9)


def cut_rules(audio: np.ndarray, ref: list[list], search_sec: float = 4.0, every_sec: float = 1.7) -> dict:
    """Where the endpointer's cut rule falls against the words, at a forced cut every `every_sec` (each
    searching the `search_sec` before it), beside the quietest-20-ms rule it replaced (`choose_cut` with
    a one-frame context and every frame a candidate)."""
    from livekit_qwen_asr.endpointing import choose_cut

    limits = np.arange(10.0, audio.size / SAMPLE_RATE - 1.0, every_sec)
    rules = {
        "quiet_100ms_context": lambda lo, hi: choose_cut(audio, lo, hi),
        "quietest_20ms": lambda lo, hi: choose_cut(audio, lo, hi, context=320, quiet_share=1.0),
    }
    out = {"cuts": len(limits)}
    for name, rule in rules.items():
        fractions = [
            where_in_word(
                ref, rule(round((t - search_sec) * SAMPLE_RATE), round(t * SAMPLE_RATE)) / SAMPLE_RATE
            )
            for t in limits
        ]
        out[name] = sum(1 for f in fractions if f is not None and 0.2 < f < 0.8)
    return out


async def segments_of(engine, audio: np.ndarray, max_utterance_sec: float) -> list[Segment]:  # noqa: ANN001
    from livekit.agents import stt

    import livekit_qwen_asr
    from livekit_qwen_asr.engine import StepRequest
    from livekit_qwen_asr.prompt import parse_output
    from livekit_qwen_asr.samples import iter_frames

    pcm = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
    stream = livekit_qwen_asr.STT(engine=engine, max_utterance_sec=max_utterance_sec).stream()
    for frame in iter_frames(pcm, SAMPLE_RATE, 1, (20.0,)):
        stream.push_frame(frame)
    stream.end_input()
    finals = [ev.alternatives[0] async for ev in stream if ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT]
    out = []
    for f in finals:
        seg = audio[round(f.start_time * SAMPLE_RATE) : round(f.end_time * SAMPLE_RATE)]
        r = await engine.step(StepRequest(engine.base_prompt(""), seg, 256, "", False))
        out.append(Segment(f.start_time, f.end_time, f.text, parse_output(r.text)[1]))
    return out


def summarize(ref: list[list], segs: list[Segment]) -> dict:
    from livekit_qwen_asr.samples import word_error_rate

    text = " ".join(w for w, _, _ in ref)
    cuts = [s.end for s in segs[:-1]]
    middles = [(s.start + s.end) / 2 for s in segs]
    streaming = " ".join(s.text for s in segs)
    offline = " ".join(s.offline for s in segs)
    at_cuts, off_cuts, at_mid = (
        damage(ref, streaming, cuts),
        damage(ref, offline, cuts),
        damage(ref, streaming, middles),
    )
    inside = [where_in_word(ref, c) for c in cuts]

    def per_point(rows: list[dict]) -> dict:
        n = max(len(rows), 1)
        return {
            "points": len(rows),
            "wrong_words_per_point": round(sum(len(r["wrong"]) for r in rows) / n, 3),
            "inserted_per_point": round(sum(r["inserted"] for r in rows) / n, 3),
            "words_per_point": round(sum(len(r["words"]) for r in rows) / n, 3),
        }

    return {
        "segments": len(segs),
        "cuts": len(cuts),
        "tiled": all(abs(a.end - b.start) < 1e-6 for a, b in zip(segs, segs[1:], strict=False)),
        "cuts_mid_word": sum(1 for f in inside if f is not None and 0.2 < f < 0.8),
        "wer_streaming": round(word_error_rate(text, streaming), 4),
        "wer_offline_segments": round(word_error_rate(text, offline), 4),
        "at_cuts_streaming": per_point(at_cuts),
        "at_cuts_offline": per_point(off_cuts),
        "at_middles_streaming": per_point(at_mid),
        "cut_detail": [
            {**s, "offline_wrong": o["wrong"], "offline_inserted": o["inserted"], "in_word": f}
            for s, o, f in zip(at_cuts, off_cuts, inside, strict=True)
        ],
        "finals": [{"start": s.start, "end": s.end, "text": s.text, "offline": s.offline} for s in segs],
    }


async def amain(a: argparse.Namespace) -> dict:
    from livekit_qwen_asr import test_model as tm
    from livekit_qwen_asr.engine import EngineOptions, VLLMEngine
    from livekit_qwen_asr.samples import read_wav

    pcm, rate, channels = read_wav(a.speech)
    if rate != SAMPLE_RATE or channels != 1:
        raise SystemExit(f"{a.speech}: expected 16 kHz mono")
    audio = pcm.astype(np.float32) / 32768
    ref = json.loads(Path(a.speech).with_suffix(".json").read_text())
    model = a.model or str(tm.ensure_test_model())
    engine = await VLLMEngine.start(
        EngineOptions(model=model, max_model_len=1024, kv_cache_gib=0.25, dtype="float32")
    )
    try:
        runs = {}
        for mus in a.max_utterance_sec:
            segs = await segments_of(engine, audio, mus)
            runs[str(mus)] = summarize(ref["words"], segs)
    finally:
        await engine.aclose()
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": model,
        "speech": {
            "path": str(a.speech),
            "seconds": round(audio.size / SAMPLE_RATE, 2),
            "words": len(ref["words"]),
        },
        "voice": ref.get("voice"),
        "cut_rules": cut_rules(audio, ref["words"]),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.forced_cuts", description=__doc__.split("\n")[0])
    ap.add_argument("speech", type=Path)
    ap.add_argument("--max-utterance-sec", type=float, nargs="+", default=[10.0, 30.0])
    ap.add_argument("--model", default=None, help="default: the bundled test model")
    ap.add_argument("--out", type=Path, default=Path("results/forced_cuts.json"))
    a = ap.parse_args(argv)
    res = asyncio.run(amain(a))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print("cuts inside a word by rule:", res["cut_rules"])
    for mus, r in res["runs"].items():
        print(mus, {k: v for k, v in r.items() if k not in ("cut_detail", "finals")})


if __name__ == "__main__":
    main()
