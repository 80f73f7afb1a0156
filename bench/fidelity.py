"""Fidelity harness for users with real weights: streaming vs offline WER on your own recordings.

    python -m bench.fidelity DATA_DIR [--model Qwen/Qwen3-ASR-0.6B] [--out results/fidelity]

DATA_DIR holds `name.wav` (16-bit PCM, any rate, mono or stereo) with `name.txt` (reference text).
For each file:
  - streaming: our rollback streaming (2 s chunks, the plugin's defaults), one chunk per step back to
    back (the hypotheses a real-time stream that keeps up would show), a forced cut every
    --max-utterance seconds as the plugin makes on speech without pauses; finals concatenated;
  - offline: one request over the whole file (no prefix), as a batch transcription would.
Reports final WER of each (jiwer, lower-cased, punctuation removed), the streaming-minus-offline gap,
the unstable partial word ratio (a word shown at position i of an interim is unstable when the next
hypothesis of the utterance does not show the same word there — positional, so an inserted word
makes the words after it count too; ratio = unstable / words shown in interims), step latency
p50/p95 and the real-time factor. Writes report.json.

With `name.words.json` beside a file ([[word, start_s, end_s], ...], as training.heldout writes) it
also reports latency on a simulated real-time clock: a step starts when its chunk's audio has arrived
and the previous step is done, and takes its measured time, so each hypothesis has the moment a live
stream would show it. Per reference word: from the word's end to the first hypothesis that has it
right (aligned with difflib against the reference words; words never right are counted apart); per
utterance: from the end of speech to the final, with the input ending at the end of the file (the
plugin's endpointing adds its silence threshold to that).

The fixed cut every --max-utterance seconds can split a word, which the plugin avoids (it cuts at
the quietest point, and real speech has pauses its VAD ends utterances at): on recordings longer
than that, part of the gap comes from the cut. Offline needs the file in one request: up to about
8 minutes at max_model_len 8192.

With a synthetic checkpoint (--preset tiny|0.6b) the numbers are meaningless (random weights); that
mode only exercises the pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from livekit import rtc

from livekit_qwen_asr.audio import frames_to_16k_mono
from livekit_qwen_asr.engine import ASREngine, RequestRejectedError, StepRequest
from livekit_qwen_asr.prompt import parse_output
from livekit_qwen_asr.samples import read_wav
from livekit_qwen_asr.streaming import SAMPLE_RATE, StreamingConfig, StreamingTranscriber
from livekit_qwen_asr.stt import step_token_budget

_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def unstable_words(hypotheses: list[str]) -> tuple[int, int]:
    """(unstable, shown) over interims: word i of hypothesis k is unstable when hypothesis k+1 (the
    last one is the final) has a different word, or none, at position i."""
    words = [normalize(h).split() for h in hypotheses]
    unstable = shown = 0
    for cur, nxt in zip(words, words[1:], strict=False):
        shown += len(cur)
        unstable += sum(1 for i, w in enumerate(cur) if i >= len(nxt) or nxt[i] != w)
    return unstable, shown


@dataclass
class FileResult:
    name: str
    audio_s: float
    reference: str
    streaming: str = ""
    offline: str = ""
    step_latencies: list[float] = field(default_factory=list)
    unstable: int = 0
    shown: int = 0
    streaming_wall_s: float = 0.0
    offline_wall_s: float = 0.0
    words: list[tuple[str, float, float]] | None = None  # reference words with start/end seconds
    word_latencies: list[float] = field(default_factory=list)  # word end -> first right, seconds
    never_right: int = 0  # timed reference words no hypothesis had right
    final_latency_s: float | None = None  # end of speech -> the last final, seconds


def first_right_times(ref_words: list[str], timeline: list[tuple[float, str]]) -> list[float | None]:
    """For each reference word, the first time a hypothesis (time, text) has it right: aligned with
    difflib's matching blocks of the normalised words, so a word inserted or dropped earlier does not
    make every later word wrong."""
    ref = [normalize(w) for w in ref_words]
    first: list[float | None] = [None] * len(ref)
    for t, text in timeline:
        sm = difflib.SequenceMatcher(a=ref, b=normalize(text).split(), autojunk=False)
        for block in sm.get_matching_blocks():
            for i in range(block.a, block.a + block.size):
                if first[i] is None:
                    first[i] = t
    return first


def load_audio(path: Path) -> np.ndarray:
    """Any-rate, any-channel WAV -> 16 kHz mono float32, with the plugin's own conversion."""
    data, rate, channels = read_wav(path)
    return frames_to_16k_mono(rtc.AudioFrame(data.tobytes(), rate, channels, data.shape[0] // channels))


async def transcribe_streaming(
    engine: ASREngine, audio: np.ndarray, res: FileResult, max_utterance_s: float, name: str
) -> None:
    config = StreamingConfig()
    t = StreamingTranscriber(config, engine.codec, engine.base_prompt)
    finals: list[str] = []
    cut = int(max_utterance_s * SAMPLE_RATE)
    started = time.perf_counter()
    clock = 0.0  # simulated real time (s) at which the engine is free again
    timeline: list[tuple[float, str]] = []  # (when a live stream shows it, finals so far + hypothesis)
    for start in range(0, audio.shape[0], cut):
        segment = audio[start : start + cut]
        t.push_audio(segment)
        hyps: list[str] = []  # every hypothesis the utterance showed, the final last
        ended = False
        done_before = " ".join(f.strip() for f in finals if f.strip())
        while (plan := t.next_step()) is not None or (plan := t.finish_step()) is not None:
            budget = step_token_budget(plan, 64)
            r = await engine.step(StepRequest(plan.prompt, plan.audio, budget, name, draft=plan.draft))
            hyps.append(t.apply(plan, r.text).text)
            res.step_latencies.append(r.wall_s)
            # a chunk's step can start once its audio has arrived (the final's once the input ended)
            arrived = (start + (segment.shape[0] if plan.final else plan.audio.shape[0])) / SAMPLE_RATE
            clock = max(clock, arrived) + r.wall_s
            timeline.append((clock, f"{done_before} {hyps[-1]}"))
            if plan.final:
                ended = True
                break
        final = t.finalize().text
        if not ended:
            hyps.append(final)
            timeline.append((clock, f"{done_before} {final}"))
        u, s = unstable_words(hyps)
        res.unstable += u
        res.shown += s
        finals.append(final)
        t.reset()
        engine.release_stream(name)
    res.streaming = " ".join(f.strip() for f in finals if f.strip())
    res.streaming_wall_s = time.perf_counter() - started
    if res.words:
        firsts = first_right_times([w for w, _, _ in res.words], timeline)
        for (_, _, end), when in zip(res.words, firsts, strict=True):
            if when is None:
                res.never_right += 1
            else:
                res.word_latencies.append(when - end)
        res.final_latency_s = timeline[-1][0] - res.words[-1][2]


async def transcribe_offline(engine: ASREngine, audio: np.ndarray, res: FileResult) -> None:
    started = time.perf_counter()
    cap = int(math.ceil(audio.shape[0] / SAMPLE_RATE * 8)) + 16
    try:
        r = await engine.step(StepRequest(engine.base_prompt(""), audio, cap, "", reuse_windows=False))
    except RequestRejectedError as e:
        raise ValueError(
            f"{res.name}: {res.audio_s:.0f} s is too long for one offline request (13 audio tokens per "
            "second + the transcript must fit max_model_len, 8192 here: about 8 min); split the file"
        ) from e
    res.offline = parse_output(r.text)[1]
    res.offline_wall_s = time.perf_counter() - started


def wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    pairs = [(normalize(r), normalize(h)) for r, h in zip(refs, hyps, strict=True) if normalize(r)]
    if not pairs:
        raise ValueError("no non-empty reference text")
    return float(jiwer.wer([p[0] for p in pairs], [p[1] or "<empty>" for p in pairs]))


def dataset(folder: Path) -> list[tuple[Path, str, list | None]]:
    """(wav, reference text, timed words or None) per recording."""
    items = []
    for wav in sorted(folder.glob("*.wav")):
        txt = wav.with_suffix(".txt")
        if not txt.is_file():
            raise FileNotFoundError(f"{wav.name}: no reference {txt.name}")
        timed = wav.with_suffix(".words.json")
        words = [tuple(w) for w in json.loads(timed.read_text())] if timed.is_file() else None
        items.append((wav, txt.read_text(encoding="utf-8").strip(), words))
    if not items:
        raise FileNotFoundError(f"no .wav files in {folder}")
    return items


async def evaluate(engine: ASREngine, folder: Path, max_utterance_s: float = 30.0) -> dict:
    results = []
    for i, (wav, ref, words) in enumerate(dataset(folder)):
        audio = load_audio(wav)
        res = FileResult(wav.stem, audio.shape[0] / SAMPLE_RATE, ref, words=words)
        await transcribe_streaming(engine, audio, res, max_utterance_s, f"fidelity-{i}")
        await transcribe_offline(engine, audio, res)
        results.append(res)
    refs = [r.reference for r in results]
    w_stream = wer(refs, [r.streaming for r in results])
    w_off = wer(refs, [r.offline for r in results])
    lat = [x for r in results for x in r.step_latencies]
    audio_s = sum(r.audio_s for r in results)
    shown = sum(r.shown for r in results)
    word_lat = [x for r in results for x in r.word_latencies]
    timed = len(word_lat) + sum(r.never_right for r in results)
    final_lat = [r.final_latency_s for r in results if r.final_latency_s is not None]
    return {
        "model": engine.model_name,
        "synthetic": engine.is_synthetic,
        "files": len(results),
        "audio_s": audio_s,
        "wer_streaming": w_stream,
        "wer_offline": w_off,
        "wer_gap": w_stream - w_off,
        "unstable_partial_word_ratio": (sum(r.unstable for r in results) / shown) if shown else 0.0,
        "step_latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
        "step_latency_p95_s": float(np.percentile(lat, 95)) if lat else None,
        "timed_words": timed,
        "word_first_right_p50_s": float(np.percentile(word_lat, 50)) if word_lat else None,
        "word_first_right_p95_s": float(np.percentile(word_lat, 95)) if word_lat else None,
        "words_never_right_ratio": (timed - len(word_lat)) / timed if timed else None,
        "speech_end_to_final_p50_s": float(np.percentile(final_lat, 50)) if final_lat else None,
        "speech_end_to_final_p95_s": float(np.percentile(final_lat, 95)) if final_lat else None,
        "streaming_rtf": sum(r.streaming_wall_s for r in results) / audio_s,
        "offline_rtf": sum(r.offline_wall_s for r in results) / audio_s,
        "per_file": [r.__dict__ for r in results],
    }


async def amain(args: argparse.Namespace) -> dict:
    from livekit_qwen_asr.engine import EngineOptions, VLLMEngine
    from livekit_qwen_asr.synthetic import ensure_checkpoint

    model = str(ensure_checkpoint(args.preset)) if args.preset else args.model
    engine = await VLLMEngine.start(EngineOptions(model=model, max_model_len=8192))
    try:
        report = await evaluate(engine, args.data, args.max_utterance)
    finally:
        await engine.aclose()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    label = " (SYNTHETIC weights: numbers meaningless)" if report["synthetic"] else ""
    print(
        f"{report['files']} files, {report['audio_s']:.0f} s{label}\n"
        f"WER streaming {report['wer_streaming']:.2%}  offline {report['wer_offline']:.2%}  "
        f"gap {report['wer_gap']:+.2%}\nunstable partial words {report['unstable_partial_word_ratio']:.1%}  "
        f"step p50 {report['step_latency_p50_s']:.2f} s p95 {report['step_latency_p95_s']:.2f} s  "
        f"RTF streaming {report['streaming_rtf']:.2f} offline {report['offline_rtf']:.2f}\n"
        f"wrote {args.out / 'report.json'}"
    )
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="folder of name.wav + name.txt")
    ap.add_argument("--model", default="Qwen/Qwen3-ASR-0.6B", help="HF id or local checkpoint")
    ap.add_argument("--preset", choices=["tiny", "0.6b"], help="use a synthetic checkpoint instead")
    ap.add_argument("--max-utterance", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=Path("results/fidelity"))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    asyncio.run(amain(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
