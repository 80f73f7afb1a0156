"""Wrappers around the REAL engine for observation and fault injection (every call still reaches vLLM,
except the faults they inject on purpose)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from livekit_qwen_asr.engine import ASREngine, EngineProxy, StepRequest, StepResult


class RecordingEngine(EngineProxy):
    """Delegates to a real engine and records requests/results; lets tests await step completions."""

    def __init__(
        self, inner: ASREngine, fault: Callable[[int, StepRequest], BaseException | None] | None = None
    ):
        self.inner = inner
        self.requests: list[StepRequest] = []
        self.results: list[StepResult] = []
        self.attempts = 0
        self._fault = fault
        self._done = asyncio.Condition()
        self.hang_once: asyncio.Event | None = None
        self.released: list[str] = []

    async def step(self, request: StepRequest) -> StepResult:
        attempt = self.attempts
        self.attempts += 1
        if self.hang_once is not None:
            gate, self.hang_once = self.hang_once, None
            await gate.wait()  # never set: the caller's timeout must fire
        if self._fault is not None and (exc := self._fault(attempt, request)) is not None:
            raise exc
        result = await self.inner.step(request)
        self.requests.append(request)
        self.results.append(result)
        async with self._done:
            self._done.notify_all()
        return result

    def release_stream(self, stream_id: str) -> None:
        self.released.append(stream_id)
        self.inner.release_stream(stream_id)

    async def wait_steps(self, n: int, timeout: float = 120.0) -> None:
        async with asyncio.timeout(timeout):
            async with self._done:
                await self._done.wait_for(lambda: len(self.results) >= n)
