"""Engine start-up time and per-step latency of the rollback streaming loop (one stream, back to back).

    .venv/bin/python bench/engine_latency.py --preset tiny --seconds 30
    .venv/bin/python bench/engine_latency.py --preset 0.6b --seconds 30 --max-new-tokens 16

Feeds the bundled speech (repeated to --seconds) through `StreamingTranscriber` + `VLLMEngine`, one
2 s chunk per step, and reports each step's wall time against its position in the utterance. Random
weights never stop on their own, so every step generates exactly --max-new-tokens tokens; real speech
produces about the K rolled-back tokens plus ~3 tokens per new audio second. Writes JSON under results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from livekit_qwen_asr.engine import EngineOptions, StepRequest, VLLMEngine
from livekit_qwen_asr.samples import bundled_speech_path, read_wav
from livekit_qwen_asr.streaming import StreamingConfig, StreamingTranscriber
from livekit_qwen_asr.synthetic import ensure_checkpoint


async def main(args: argparse.Namespace) -> dict:
    ckpt = ensure_checkpoint(args.preset)
    t0 = time.perf_counter()
    eager = {"auto": None, "on": True, "off": False}[args.eager]
    engine = await VLLMEngine.start(EngineOptions(model=str(ckpt), max_model_len=8192, enforce_eager=eager))
    startup = time.perf_counter() - t0

    speech, _, _ = read_wav(bundled_speech_path())
    reps = int(np.ceil(args.seconds * 16000 / len(speech)))
    audio = np.tile(speech, reps)[: int(args.seconds * 16000)]
    t = StreamingTranscriber(StreamingConfig(), engine.codec, engine.base_prompt)
    t.push_audio(audio)
    steps = []
    # warm-up request (first request pays one-off costs)
    await engine.step(StepRequest(t.prompt_raw, audio[:32000].astype(np.float32) / 32768, 4, "warmup"))
    while (plan := t.next_step()) is not None or (plan := t.finish_step()) is not None:
        r = await engine.step(StepRequest(plan.prompt, plan.audio, args.max_new_tokens, "bench"))
        t.apply(plan, r.text)
        steps.append(
            {
                "audio_s": round(plan.audio_seconds, 3),
                "wall_s": round(r.wall_s, 4),
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "generated_tokens": r.generated_tokens,
            }
        )
        if plan.final:
            break
    await engine.aclose()
    walls = [s["wall_s"] for s in steps]
    out = {
        "preset": args.preset,
        "machine": f"{platform.machine()} cpus={os.cpu_count()}",
        "engine_startup_s": round(startup, 1),
        "max_new_tokens": args.max_new_tokens,
        "enforce_eager": args.eager,
        "audio_seconds": args.seconds,
        "steps": steps,
        "step_wall_p50_s": round(statistics.median(walls), 4),
        "step_wall_max_s": round(max(walls), 4),
        "first_step_s": walls[0],
        "last_streaming_step_s": walls[-2] if len(walls) > 1 else walls[0],
    }
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.6b"])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--eager", default="auto", choices=["auto", "on", "off"], help="vLLM enforce_eager")
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    res = asyncio.run(main(a))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"engine_latency_{a.preset}_eager-{a.eager}.json"
    path.write_text(json.dumps(res, indent=1))
    summary = {k: v for k, v in res.items() if k != "steps"}
    print(json.dumps(summary, indent=1))
    print("per step (audio_s -> wall_s):", [(s["audio_s"], s["wall_s"]) for s in res["steps"]])
    print("wrote", path)
