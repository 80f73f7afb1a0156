"""livekit-qwen-asr: streaming Qwen3-ASR speech-to-text for LiveKit Agents, on vLLM.

The implementation package; `livekit.plugins.qwen_asr` is the public LiveKit plugin import path and
re-exports this API. Importing either registers the plugin with livekit-agents (once).
"""

from .engine import DEFAULT_MODEL, ASREngine, EngineOptions, EngineStats, StepRequest, StepResult, VLLMEngine
from .errors import (
    EngineError,
    EngineFailedError,
    EngineTimeoutError,
    EngineUnavailableError,
    InvalidAudioError,
    InvalidOptionError,
    QwenASRError,
    RequestRejectedError,
    TooManyStreamsError,
    UnsupportedLanguageError,
)
from .loop_thread import LoopThreadEngine
from .plugin import ModelDownloadError, QwenASRPlugin, download_model, register_plugin
from .streaming import Hypothesis, StepPlan, StreamingConfig, StreamingTranscriber
from .stt import STT, SpeechStream, STTOptions
from .supervisor import SupervisedEngine
from .version import __version__
from .vllm_compat import UnsupportedVLLMError

__all__ = [
    "DEFAULT_MODEL",
    "STT",
    "ASREngine",
    "EngineError",
    "EngineFailedError",
    "EngineOptions",
    "EngineStats",
    "EngineTimeoutError",
    "EngineUnavailableError",
    "Hypothesis",
    "InvalidAudioError",
    "InvalidOptionError",
    "LoopThreadEngine",
    "ModelDownloadError",
    "QwenASRError",
    "QwenASRPlugin",
    "RequestRejectedError",
    "STTOptions",
    "SpeechStream",
    "StepPlan",
    "StepRequest",
    "StepResult",
    "StreamingConfig",
    "StreamingTranscriber",
    "SupervisedEngine",
    "TooManyStreamsError",
    "UnsupportedLanguageError",
    "UnsupportedVLLMError",
    "VLLMEngine",
    "__version__",
    "download_model",
]


register_plugin()
