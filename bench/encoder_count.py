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


class EncoderProbe:
    """Encoder seconds logged since the previous call (None: not instrumented)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._offset = 0

    def __call__(self) -> float | None:
        if self.path is None or not self.path.exists():
            return None
        with self.path.open() as f:
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        return sum(int(x) for x in text.split()) / FRAMES_PER_SECOND


_install()
