"""Background tasks owned by an object: kept referenced until done, failures logged, awaitable."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from .log import logger


class OwnedTasks:
    def __init__(self, owner: str) -> None:
        self._owner = owner  # for the log line of a failed task
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    @property
    def pending(self) -> int:
        return sum(not t.done() for t in self._tasks)

    async def wait(self) -> None:
        """Until every task, including ones spawned meanwhile, has finished."""
        while pending := [t for t in self._tasks if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("%s task failed", self._owner, exc_info=exc, extra={"task": task.get_name()})
