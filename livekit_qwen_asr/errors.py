"""Typed errors. Input/option errors subclass ValueError; engine errors say whether a retry can help.

Errors that can reach an `AgentSession` are also livekit-agents `APIError`s, the only type the
framework handles: its STT pipeline recreates a stream that failed with an `APIError` and stops its
STT for the rest of the session on anything else.
"""

from __future__ import annotations

from livekit.agents import APIStatusError


class QwenASRError(Exception):
    """Base class of every error raised by livekit-qwen-asr."""


class InvalidOptionError(QwenASRError, ValueError):
    """An option is out of range or of the wrong type (e.g. chunk_size_sec <= 0)."""


class UnsupportedLanguageError(InvalidOptionError):
    """The forced language is not one Qwen3-ASR supports."""


class InvalidAudioError(QwenASRError, APIStatusError, ValueError):
    """Audio that cannot be transcribed: NaN/inf samples, a bad sample rate or channel count.

    An `APIStatusError` (400). `push_frame` raises it to a direct caller; inside an AgentSession the
    stream drops the bad frame and fails its current run with it as a *retryable* error instead, so
    the framework reports it (an `error` event) and resumes the same stream: no other audio is lost.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        APIStatusError.__init__(self, message, status_code=400)
        self.retryable = retryable  # APIStatusError makes every 400 non-retryable; see above


class TooManyStreamsError(QwenASRError, APIStatusError, RuntimeError):
    """`STT.stream()` refused: `max_streams` streams of this STT are still open.

    An `APIStatusError` (429, retryable): an AgentSession's STT pipeline recreates the stream after
    its reconnect interval, so the session's STT resumes once a stream is closed."""

    def __init__(self, message: str) -> None:
        APIStatusError.__init__(self, message, status_code=429, retryable=True)


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
    """The engine refused the request itself (e.g. prompt longer than max_model_len, or a remote
    server's 401 for a wrong API key): do not retry. `status_code`: the HTTP status (400 in-process)."""

    retryable = False

    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code
