"""Probe for exact reuse (issue #6): audio split into 8 s encoder-window items vs one re-fed item.

    .venv/bin/python bench/window_items_probe.py --seconds 120 [--preset tiny]

For every step of the official rollback loop (2 s chunks, the re-feed loop's own prefixes) the same
prompt is sent twice: once with the utterance audio as ONE item (official), once split into the
completed 8 s windows + the open window, each its own `<|audio_pad|>` (StepRequest.audio_items). It
reports whether the greedy outputs are identical, the prompt tokens served from vLLM's prefix cache
for each variant, and wall times. It also measures how far per-item log-mel features drift from the
whole-clip log-mel near item edges (WhisperFeatureExtractor, as vLLM's processor uses).
Writes JSON under results/. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

from livekit_qwen_asr.engine import EngineOptions, StepRequest, VLLMEngine
from livekit_qwen_asr.samples import bundled_speech_path, read_wav
from livekit_qwen_asr.streaming import StreamingConfig, StreamingTranscriber
from livekit_qwen_asr.synthetic import ensure_checkpoint

SR = 16000
WINDOW = 8 * SR


def split_windows(audio: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(audio[i : i + WINDOW] for i in range(0, audio.shape[0], WINDOW))


def mel_edge_drift(audio: np.ndarray, ckpt: Path) -> dict:
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(str(ckpt))

    def mel(x: np.ndarray) -> np.ndarray:
        f = fe(x, sampling_rate=SR, return_tensors="np", padding=False, truncation=False)
        return f["input_features"][0]

    whole = mel(audio)
    parts = np.concatenate([mel(x) for x in split_windows(audio)], axis=1)
    n = min(whole.shape[1], parts.shape[1])
    diff = np.abs(whole[:, :n] - parts[:, :n]).max(axis=0)
    edges = [k * 800 for k in range(1, audio.shape[0] // WINDOW + 1) if k * 800 < n]
    near = sorted({j for e in edges for j in range(e - 3, e + 3) if 0 <= j < n})
    far = np.setdiff1d(np.arange(n), near)
    return {
        "frames_whole": int(whole.shape[1]),
        "frames_items": int(parts.shape[1]),
        "max_abs_diff_near_edges": float(diff[near].max()) if near else 0.0,
        "max_abs_diff_elsewhere": float(diff[far].max()) if far.size else 0.0,
        "frames_differing_gt_1e-4": int((diff > 1e-4).sum()),
    }


async def main(args: argparse.Namespace) -> dict:
    ckpt = ensure_checkpoint(args.preset)
    engine = await VLLMEngine.start(EngineOptions(model=str(ckpt), max_model_len=8192, max_audio_items=64))
    speech, _, _ = read_wav(bundled_speech_path())
    audio16 = np.tile(speech, int(np.ceil(args.seconds * SR / len(speech))))[: int(args.seconds * SR)]
    audio = audio16.astype(np.float32) / 32768
    t = StreamingTranscriber(StreamingConfig(), engine.codec, engine.base_prompt)
    t.push_audio(audio)
    steps = []
    while (plan := t.next_step()) is not None:
        one = await engine.step(StepRequest(plan.prompt, plan.audio, args.max_new_tokens, "one"))
        items = split_windows(plan.audio)
        split = await engine.step(
            StepRequest(plan.prompt, plan.audio, args.max_new_tokens, "split", audio_items=items)
        )
        t.apply(plan, one.text)
        steps.append(
            {
                "audio_s": plan.audio_seconds,
                "items": len(items),
                "same_output": one.text == split.text,
                "prompt_tokens": [one.prompt_tokens, split.prompt_tokens],
                "cached_tokens": [one.cached_tokens, split.cached_tokens],
                "wall_s": [round(one.wall_s, 4), round(split.wall_s, 4)],
            }
        )
        print(steps[-1], flush=True)
    await engine.aclose()
    return {
        "preset": args.preset,
        "seconds": args.seconds,
        "max_new_tokens": args.max_new_tokens,
        "steps_identical": sum(s["same_output"] for s in steps),
        "steps": steps,
        "mel_edge_drift_16s": mel_edge_drift(audio[: 16 * SR], ckpt),
        "mel_edge_drift_all": mel_edge_drift(audio, ckpt),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.6b"])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    res = asyncio.run(main(a))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"window_items_probe_{a.preset}.json"
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "steps"}, indent=1))
    print("wrote", path)
