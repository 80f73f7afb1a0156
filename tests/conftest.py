"""Shared fixtures: one tiny synthetic checkpoint and ONE real vLLM engine for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from livekit_qwen_asr.synthetic import ensure_checkpoint

    return ensure_checkpoint("tiny")


@pytest.fixture(scope="session")
def qwen_codec(tiny_checkpoint: Path):
    """The real Qwen tokenizer of the synthetic checkpoint (HF fast tokenizer)."""
    from transformers import AutoTokenizer

    from livekit_qwen_asr.engine import _HFCodec

    return _HFCodec(AutoTokenizer.from_pretrained(str(tiny_checkpoint)))


@pytest.fixture(scope="session")
async def engine(tiny_checkpoint: Path):
    """A real vLLM AsyncLLM engine on the tiny checkpoint, shared by every integration test."""
    from livekit_qwen_asr.engine import EngineOptions, VLLMEngine

    eng = await VLLMEngine.start(
        EngineOptions(
            model=str(tiny_checkpoint),
            max_model_len=4096,
            kv_cache_gib=1,
            dtype="float32",
            mm_cache_gib=0.03,  # small enough for test_reliability_runs to fill it in a minute
        )
    )
    yield eng
    await eng.aclose()


@pytest.fixture(scope="session")
def speech16k() -> np.ndarray:
    from livekit_qwen_asr.samples import bundled_speech_path, read_wav

    data, rate, channels = read_wav(bundled_speech_path())
    assert rate == 16000 and channels == 1
    return data
