"""Wrappers around the REAL engine for observation and fault injection (every call still reaches vLLM,
except the faults they inject on purpose)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from livekit_qwen_asr.engine import ASREngine, EngineStats, StepRequest, StepResult


class RecordingEngine:
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

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def codec(self):
        return self.inner.codec

    @property
    def stats(self) -> EngineStats:
        return self.inner.stats

    @property
    def is_synthetic(self) -> bool:
        return self.inner.is_synthetic

    def base_prompt(self, context: str) -> str:
        return self.inner.base_prompt(context)

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

    async def wait_steps(self, n: int, timeout: float = 120.0) -> None:
        async with asyncio.timeout(timeout):
            async with self._done:
                await self._done.wait_for(lambda: len(self.results) >= n)

    async def aclose(self) -> None:  # the shared engine belongs to the test session
        pass
