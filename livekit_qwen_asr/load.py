"""How busy a worker is, for LiveKit's dispatcher: `AgentServer(load_fnc=...)` from the streams this
process transcribes, against a configured capacity.

LiveKit's default load is the host's CPU use, which says nothing about an inference engine that runs on
a GPU or on another machine (a vLLM server): a worker would take jobs until its streams' steps time
out. Here the load is `max(open streams, running jobs) / capacity`:

- streams: every `STT.stream()` of this process that is still running (jobs run as threads of the
  worker process, or the worker itself transcribes);
- jobs: with LiveKit's process executor each job runs in a process of its own, whose streams this
  process cannot see; every running job counts as at least one stream (a voice agent's session has
  exactly one), so a worker never reports less load than it has jobs.

At `load >= load_threshold` LiveKit marks the worker full and stops sending it jobs; `worker_load_fnc`
is meant for `load_threshold=1.0`, so `capacity` streams fill a worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .errors import InvalidOptionError

_lock = threading.Lock()
_open = 0


def stream_opened() -> None:
    global _open
    with _lock:
        _open += 1


def stream_closed() -> None:
    global _open
    with _lock:
        _open = max(0, _open - 1)


def open_streams() -> int:
    """`STT.stream()`s of every STT in this process that are still running."""
    return _open


def worker_load_fnc(capacity: int) -> Callable[[Any], float]:
    """A `load_fnc` for `AgentServer`: `max(open streams, running jobs) / capacity`, at most 1."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise InvalidOptionError(f"capacity must be an int >= 1 (streams per worker), got {capacity!r}")

    def load(server: Any) -> float:
        # called in a thread of LiveKit's executor; both counts are plain reads
        jobs = len(server.active_jobs) if getattr(server, "_proc_pool", None) is not None else 0
        return min(1.0, max(open_streams(), jobs) / capacity)

    return load
