"""Utterance-final delay: wall time from the end of speech (its last sample pushed, paced at real time)
to the FINAL_TRANSCRIPT event, through the real plugin path (VAD endpointing + engine finish step).

    .venv/bin/python bench/final_delay.py --preset tiny [--endpointing-ms 500] [--streams 1]

Audio: the bundled speech, then 2 s of silence, repeated --utterances times, as 48 kHz stereo 20 ms
frames paced at real time. The delay includes `endpointing_ms` of silence by design. Writes JSON
under results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np
from livekit.agents import stt as lk_stt

from livekit_qwen_asr import STT
from livekit_qwen_asr.engine import EngineOptions, VLLMEngine
from livekit_qwen_asr.samples import bundled_speech_path, iter_frames, read_wav, upsample_to_stereo
from livekit_qwen_asr.synthetic import ensure_checkpoint

SR = 16000


async def one_stream(plugin: STT, speech: np.ndarray, utterances: int, gap_s: float) -> list[float]:
    pause = np.zeros(int(gap_s * SR), np.int16)
    audio = np.concatenate([np.concatenate([speech, pause]) for _ in range(utterances)])
    frames = list(iter_frames(upsample_to_stereo(audio), 48000, 2, (20.0,)))
    speech_ends = [(k * (len(speech) + len(pause)) + len(speech)) / SR for k in range(utterances)]
    stream = plugin.stream()
    pushed_at: dict[int, float] = {}
    t0 = time.perf_counter()

    async def feed() -> None:
        for i, f in enumerate(frames):
            stream.push_frame(f)
            pushed_at[i] = time.perf_counter()
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.perf_counter()))
        stream.end_input()

    feeder = asyncio.create_task(feed())
    finals: list[tuple[float, float]] = []  # (wall time, audio end_time)
    async for ev in stream:
        if ev.type == lk_stt.SpeechEventType.FINAL_TRANSCRIPT:
            finals.append((time.perf_counter(), ev.alternatives[0].end_time))
    await feeder
    delays = []
    for end_s in speech_ends:
        # the FINAL of the utterance covering this speech end; its wall time minus the push time of the
        # frame holding the last speech sample
        match = [w for w, e in finals if e >= end_s - 0.5]
        if match:
            delays.append(match[0] - pushed_at[int(end_s / 0.02)])
    return delays


async def main(args: argparse.Namespace) -> dict:
    ckpt = ensure_checkpoint(args.preset)
    engine = await VLLMEngine.start(EngineOptions(model=str(ckpt), max_model_len=8192))
    speech, _, _ = read_wav(bundled_speech_path())
    plugin = STT(engine=engine, endpointing_ms=args.endpointing_ms, max_new_tokens=args.max_new_tokens)
    results = await asyncio.gather(
        *[one_stream(plugin, speech, args.utterances, args.gap) for _ in range(args.streams)]
    )
    await engine.aclose()
    delays = [d for r in results for d in r]
    return {
        "preset": args.preset,
        "streams": args.streams,
        "endpointing_ms": args.endpointing_ms,
        "max_new_tokens": args.max_new_tokens,
        "utterances_measured": len(delays),
        "final_delay_s": [round(d, 3) for d in delays],
        "final_delay_mean_s": round(statistics.mean(delays), 3) if delays else None,
        "final_delay_max_s": round(max(delays), 3) if delays else None,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.6b"])
    ap.add_argument("--endpointing-ms", type=int, default=500)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--utterances", type=int, default=3)
    ap.add_argument("--gap", type=float, default=2.0)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    res = asyncio.run(main(a))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"final_delay_{a.preset}_{a.streams}streams.json"
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print("wrote", path)
