"""livekit-qwen-asr: streaming Qwen3-ASR speech-to-text for LiveKit Agents, on vLLM."""

from livekit.agents import Plugin

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
from .log import logger
from .streaming import Hypothesis, StepPlan, StreamingConfig, StreamingTranscriber
from .stt import STT, SpeechStream, STTOptions
from .supervisor import SupervisedEngine
from .version import __version__

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
    "QwenASRError",
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
    "VLLMEngine",
    "__version__",
]


class QwenASRPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(QwenASRPlugin())
