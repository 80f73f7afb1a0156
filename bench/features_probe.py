"""Probe for exact reuse (issue #6): whole-utterance log-mel features as precomputed 8 s items.

    .venv/bin/python bench/features_probe.py

Sends the same prompt three ways for 18 s and then 20 s of speech, and compares greedy tokens:
  A  raw audio, one item (what the official loop does);
  B  our whole-clip WhisperFeatureExtractor features, one precomputed item;
  C  the same whole-clip features split into 800-frame (8 s encoder window) items, one
     `<|audio_pad|>` each — completed windows keep their content hash between steps.
Precomputed items need the engine arg `enable_mm_embeds=True` and the dict fields
`input_audio_features` [128, frames], `audio_feature_lengths` [items] and `feature_attention_mask`
[items, 800]; a dict missing a field kills vLLM's EngineCore (validate before sending).
A measurement, not a test.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import torch
from transformers import WhisperFeatureExtractor
from vllm import SamplingParams

from livekit_qwen_asr.engine import EngineOptions, VLLMEngine
from livekit_qwen_asr.samples import bundled_speech_path, read_wav
from livekit_qwen_asr.synthetic import ensure_checkpoint

SR = 16000
WINDOW_FRAMES = 800  # n_window_infer: the encoder's attention window (8 s of 10 ms frames)
ONE_PAD = "<|audio_start|><|audio_pad|><|audio_end|>"


def feature_items(feats: torch.Tensor, window: int | None) -> dict[str, torch.Tensor]:
    n = feats.shape[1]
    sizes = [n] if window is None else [min(window, n - i) for i in range(0, n, window)]
    width = max(sizes)
    mask = torch.stack(
        [
            torch.cat([torch.ones(s, dtype=torch.long), torch.zeros(width - s, dtype=torch.long)])
            for s in sizes
        ]
    )
    return {
        "input_audio_features": feats,
        "audio_feature_lengths": torch.tensor(sizes),
        "feature_attention_mask": mask,
    }


async def generate(llm, prompt: str, mm: dict, rid: str) -> tuple[list[int], int, int]:
    final = None
    async for out in llm.generate(
        {"prompt": prompt, "multi_modal_data": mm},
        SamplingParams(temperature=0, max_tokens=16),
        request_id=rid,
    ):
        final = out
    return list(final.outputs[0].token_ids), final.num_cached_tokens or 0, len(final.prompt_token_ids)


async def main() -> None:
    ckpt = ensure_checkpoint("tiny")
    opts = EngineOptions(
        model=str(ckpt), max_model_len=8192, max_audio_items=8, extra=(("enable_mm_embeds", True),)
    )
    engine = await VLLMEngine.start(opts)
    llm = engine._llm
    speech, _, _ = read_wav(bundled_speech_path())
    audio = np.tile(speech, 2)[: 20 * SR].astype(np.float32) / 32768
    fe = WhisperFeatureExtractor.from_pretrained(str(ckpt))
    base = engine.base_prompt("")
    for seconds in (18, 20):
        a = audio[: seconds * SR]
        feats = fe(a, sampling_rate=SR, return_tensors="pt", padding=False, truncation=False)[
            "input_features"
        ][0]
        raw = await generate(llm, base, {"audio": [(a, SR)]}, f"A{seconds}")
        whole = await generate(llm, base, {"audio": feature_items(feats, None)}, f"B{seconds}")
        items = feature_items(feats, WINDOW_FRAMES)
        pads = "<|audio_start|>" + "<|audio_pad|>" * len(items["audio_feature_lengths"]) + "<|audio_end|>"
        split = await generate(llm, base.replace(ONE_PAD, pads), {"audio": items}, f"C{seconds}")
        for name, r in (
            ("A raw audio, 1 item", raw),
            ("B whole-clip features, 1 item", whole),
            ("C features, 8 s items", split),
        ):
            same = r[0] == raw[0]
            print(f"{seconds:>3} s  {name:32s} same tokens as A: {same}  cached {r[1]:4d} / {r[2]} prompt")
    await engine.aclose()


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    asyncio.run(main())
