"""Qwen3-ASR plugin for LiveKit Agents: streaming speech-to-text on vLLM, in process.

    from livekit.plugins import qwen_asr

    session = AgentSession(stt=qwen_asr.STT(language="en"), ...)

The public import path, in the `livekit.plugins` namespace where livekit-agents looks for plugins
(`python -m livekit.agents download-files` fetches our model). The implementation lives in the
`livekit_qwen_asr` package; this module re-exports its API, so both paths name the same objects and
the plugin is registered once.
"""

from livekit_qwen_asr import (
    DEFAULT_MODEL,
    STT,
    ASREngine,
    EngineError,
    EngineFailedError,
    EngineOptions,
    EngineStats,
    EngineTimeoutError,
    EngineUnavailableError,
    Hypothesis,
    InvalidAudioError,
    InvalidOptionError,
    LoopThreadEngine,
    ModelDownloadError,
    QwenASRError,
    QwenASRPlugin,
    RequestRejectedError,
    SpeechStream,
    StepPlan,
    StepRequest,
    StepResult,
    StreamingConfig,
    StreamingTranscriber,
    STTOptions,
    SupervisedEngine,
    TooManyStreamsError,
    UnsupportedLanguageError,
    UnsupportedVLLMError,
    VLLMEngine,
    __version__,
    download_model,
)

__all__ = [  # explicit, for type checkers; tests/test_packaging.py checks it equals the package's
    "DEFAULT_MODEL",
    "STT",
    "__version__",
    "download_model",
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
]
