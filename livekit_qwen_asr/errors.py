"""Typed errors. Input/option errors subclass ValueError; engine errors say whether a retry can help."""

from __future__ import annotations


class QwenASRError(Exception):
    """Base class of every error raised by livekit-qwen-asr."""


class InvalidOptionError(QwenASRError, ValueError):
    """An option is out of range or of the wrong type (e.g. chunk_size_sec <= 0)."""


class UnsupportedLanguageError(InvalidOptionError):
    """The forced language is not one Qwen3-ASR supports."""


class InvalidAudioError(QwenASRError, ValueError):
    """Audio that cannot be transcribed: NaN/inf samples, a bad sample rate or channel count."""


class TooManyStreamsError(QwenASRError, RuntimeError):
    """`STT.stream()` refused: `max_streams` streams of this STT are still open."""


class StaleStepError(QwenASRError, RuntimeError):
    """A step plan was applied after the stream state it was planned from had changed."""


class EngineError(QwenASRError):
    """The inference engine failed a step. `retryable` tells whether the same step may succeed later."""

    retryable: bool = True


class EngineUnavailableError(EngineError):
    """The engine could not be started or has died."""


class EngineFailedError(EngineUnavailableError):
    """The engine died and was not (or could not be) restarted: a retry cannot help."""

    retryable = False


class EngineTimeoutError(EngineError):
    """A step did not finish within the allowed time."""


class RequestRejectedError(EngineError):
    """The engine refused the request itself (e.g. prompt longer than max_model_len): do not retry."""

    retryable = False
