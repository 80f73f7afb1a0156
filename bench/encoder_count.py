"""Counts the audio encoder's real work inside vLLM's EngineCore process (benchmark instrumentation).

vLLM runs the model in a child process started with `spawn`, which re-imports the parent's main
module. A benchmark script imports this module at top level, so the child patches
`Qwen3ASRForConditionalGeneration._process_audio_input` too and appends, per encoder call, the mel
frames of each item it encodes to the file named by `LKQ_ENCODER_LOG`. Items served from vLLM's
prefix or encoder cache never reach the encoder and are not counted.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "LKQ_ENCODER_LOG"
FRAMES_PER_SECOND = 100


def _install() -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    from vllm.model_executor.models import qwen3_asr

    cls = qwen3_asr.Qwen3ASRForConditionalGeneration
    if getattr(cls, "_lkq_counted", False):
        return
    original = cls._process_audio_input

    def counted(self, audio_input):
        frames = [int(x) for x in audio_input["audio_feature_lengths"].reshape(-1).tolist()]
        with open(path, "a") as f:
            f.write(" ".join(map(str, frames)) + "\n")
        return original(self, audio_input)

    cls._process_audio_input = counted
    cls._lkq_counted = True


def start_log(path: Path) -> None:
    """Call before the engine starts: the EngineCore child inherits the variable."""
    path.write_text("")
    os.environ[ENV] = str(path)


def encoded_seconds(path: Path) -> float:
    """Audio seconds the encoder has processed since `start_log` (or the last `reset`)."""
    if not path.exists():
        return 0.0
    total = sum(int(x) for line in path.read_text().split() for x in [line])
    return total / FRAMES_PER_SECOND


def reset(path: Path) -> None:
    path.write_text("")


_install()
