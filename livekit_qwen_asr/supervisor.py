"""A dead engine is restarted, a bounded number of times; then a clear, non-retryable error.

`SupervisedEngine` wraps whatever `start()` returns (the in-process vLLM engine by default). When a
step finds the engine dead (vLLM's EngineCore process gone: `EngineUnavailableError`), that step
fails with a retryable error, the engine is restarted in the background (old one shut down first),
and every step — the framework's retries of the failed ones included — waits for the new engine.
After `max_restarts` restarts, the next death (or a restart that fails) makes every step fail with
`EngineFailedError` (retryable = False), so streams stop with a clear message instead of retrying.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .engine import ASREngine, EngineOptions, EngineProxy, StepRequest, StepResult, VLLMEngine
from .errors import EngineFailedError, EngineUnavailableError
from .log import logger


class SupervisedEngine(EngineProxy):
    def __init__(
        self, start: Callable[[], Awaitable[ASREngine]], inner: ASREngine, *, max_restarts: int = 1
    ) -> None:
        if max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        self.inner = inner
        self.restarts = 0
        self.max_restarts = max_restarts
        self._start = start
        self._restart_task: asyncio.Task[None] | None = None
        self._fatal: EngineFailedError | None = None
        self._closed = False

    @classmethod
    async def start(
        cls, options: EngineOptions | None = None, *, max_restarts: int | None = None
    ) -> SupervisedEngine:
        """The in-process vLLM engine for `options`, restarted with the same options when it dies
        (`max_restarts` times; default `options.max_restarts`). Starts and restarts load the engine
        off the event loop (VLLMEngine.start), so the streams it serves keep running meanwhile."""
        options = options or EngineOptions()
        restarts = options.max_restarts if max_restarts is None else max_restarts
        return cls(lambda: VLLMEngine.start(options), await VLLMEngine.start(options), max_restarts=restarts)

    @property
    def state(self) -> str:
        """ "running", "restarting" or "failed"."""
        if self._fatal is not None:
            return "failed"
        return "restarting" if self._restart_task is not None else "running"

    async def step(self, request: StepRequest) -> StepResult:
        inner = await self._ready()
        try:
            return await inner.step(request)
        except EngineUnavailableError as e:
            if self._closed or isinstance(e, EngineFailedError):
                raise
            self._on_death(inner, e)
            if self._fatal is not None:
                raise self._fatal from e
            raise EngineUnavailableError(
                f"{e} (restarting the engine: restart {self.restarts} of {self.max_restarts})"
            ) from e

    async def until_ready(self) -> None:
        """Wait while the engine restarts; raises EngineFailedError once it cannot be restarted."""
        await self._ready()

    async def _ready(self) -> ASREngine:
        if self._closed:
            raise EngineUnavailableError("engine is closed")
        if self._restart_task is not None:
            await asyncio.shield(self._restart_task)
        if self._fatal is not None:
            raise self._fatal
        return self.inner

    def _on_death(self, dead: ASREngine, error: Exception) -> None:
        if dead is not self.inner or self._restart_task is not None or self._fatal is not None:
            return  # another step already reported this death
        if self.restarts >= self.max_restarts:
            self._fatal = EngineFailedError(
                f"the engine died again after {self.restarts} restart(s); not restarting: {error}"
            )
            logger.error("engine died; restart budget spent", extra={"restarts": self.restarts})
            return
        self.restarts += 1
        logger.error("engine died; restarting it", extra={"restart": self.restarts, "error": str(error)})
        self._restart_task = asyncio.get_running_loop().create_task(
            self._restart(dead), name="engine.restart"
        )

    async def _restart(self, dead: ASREngine) -> None:
        try:
            try:
                await dead.aclose()  # joins the dead EngineCore: VLLMEngine does it in a thread
            except Exception:
                logger.warning("closing the dead engine failed", exc_info=True)
            try:
                self.inner = await self._start()
                logger.info("engine restarted", extra={"restart": self.restarts})
            except Exception as e:
                self._fatal = EngineFailedError(f"the engine died and could not be restarted: {e}")
                logger.error("engine restart failed", exc_info=True)
        finally:
            self._restart_task = None

    async def aclose(self) -> None:
        """The supervisor owns its engine: closing it closes the engine."""
        self._closed = True
        if self._restart_task is not None:
            await asyncio.gather(self._restart_task, return_exceptions=True)
        await self.inner.aclose()
