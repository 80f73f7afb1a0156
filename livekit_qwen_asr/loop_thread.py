"""`LoopThreadEngine`: one engine per process on its own event-loop thread, usable from any loop.

A LiveKit worker loads its engine in `prewarm` (the server's `setup_fnc`), before any event loop
exists, and with the thread executor every job runs its own loop in its own thread; vLLM's `AsyncLLM`
is bound to the loop it was created on. So the engine gets a dedicated loop thread and every stream's
steps are handed to it thread-safely. Used by agent.py and examples/voice_agent.py.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable

from .engine import ASREngine, EngineOptions, EngineProxy, StepRequest, StepResult
from .supervisor import SupervisedEngine

EngineStarter = Callable[[EngineOptions], Awaitable[ASREngine]]


class LoopThreadEngine(EngineProxy):
    """An `ASREngine` whose vLLM engine runs on a dedicated event-loop thread, usable from any loop.

    `shared(options)` starts loading at most once per process; `wait_ready()` blocks until it is up
    (prewarm). `step()` may be awaited from any event loop: it is submitted to the engine's loop with
    `run_coroutine_threadsafe`, and cancelling the caller cancels the step there.

    Started from a thread, vLLM launches its engine-core process with "spawn", which re-imports the
    main module: a script using this class must keep its entry code under `if __name__ == "__main__"`.
    """

    _instances: dict[EngineOptions, LoopThreadEngine] = {}
    _lock = threading.Lock()

    def __init__(self, options: EngineOptions, start: EngineStarter = SupervisedEngine.start) -> None:
        """Start the engine thread and begin loading (`start(options)` runs on the engine's loop)."""
        self.options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwen-asr-engine", daemon=True)
        self._thread.start()
        self._ready: concurrent.futures.Future[ASREngine] = asyncio.run_coroutine_threadsafe(
            start(options), self._loop
        )

    @classmethod
    def shared(cls, options: EngineOptions) -> LoopThreadEngine:
        with cls._lock:
            inst = cls._instances.get(options)
            if inst is None or (inst._ready.done() and inst._ready.exception() is not None):
                inst = cls._instances[options] = cls(options)
                atexit.register(inst.close)
            return inst

    def wait_ready(self, timeout: float | None = None) -> ASREngine:
        return self._ready.result(timeout)

    async def ready(self) -> ASREngine:
        return await asyncio.wrap_future(self._ready)

    @property
    def inner(self) -> ASREngine:
        if not self._ready.done():
            raise RuntimeError("the engine is still loading")
        return self._ready.result()

    # ASREngine
    @property
    def model_name(self) -> str:
        return self.options.model

    async def step(self, request: StepRequest) -> StepResult:
        fut = asyncio.run_coroutine_threadsafe(self.inner.step(request), self._loop)
        return await asyncio.wrap_future(fut)

    async def until_ready(self) -> None:
        await self.ready()
        hook = getattr(self.inner, "until_ready", None)
        if hook is not None:  # e.g. a restart in progress: wait for it on the engine's loop
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(hook(), self._loop))

    async def aclose(self) -> None:
        """Streams and rooms come and go; the engine stays for the process (closed at exit)."""

    def close(self) -> None:
        if self._ready.done() and self._ready.exception() is None:
            done = asyncio.run_coroutine_threadsafe(self._ready.result().aclose(), self._loop)
            try:
                done.result(timeout=30)
            except Exception:  # interpreter exit: best effort
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
