"""LiveKit Agents worker: live captions (Qwen3-ASR on vLLM) for every room it joins.

    python agent.py dev                      # development worker (hot reload, debug logs)
    python agent.py start                    # production worker
    python agent.py --model /models/Qwen3-ASR-0.6B --language en --endpointing-ms 500 start

The LiveKit server comes from LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET (or the livekit CLI's
--url / --api-key / --api-secret). Our options can be given as flags (before or after the command) or
as environment variables; flags win. See docs/captioner.md.

Every room the worker joins gets a `RoomCaptioner`: each remote participant's microphone is
transcribed on its own stream and published as `lk.transcription` text streams.

One engine per worker process, loaded in `prewarm`, shared by every room of that process. By default
jobs run as threads of the worker process (`--executor thread`), so ALL rooms share one engine and
their steps batch together. vLLM's AsyncLLM is bound to the event loop it was created on, while
prewarm runs before any loop exists and each job thread runs its own loop: so the engine lives on a
dedicated event-loop thread (`LoopThreadEngine`) and every stream's steps are handed to it
thread-safely. `--executor process` runs each job in its own process (one engine per process: only
sensible when several engines fit, e.g. on CPU hosts with spare cores).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import concurrent.futures
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from livekit.agents import AgentServer, AutoSubscribe, JobContext, JobExecutorType, JobProcess, cli

from livekit_qwen_asr import STT, ASREngine, EngineOptions, StepRequest, StepResult
from livekit_qwen_asr.captioner import RoomCaptioner
from livekit_qwen_asr.engine import DEFAULT_MODEL, EngineProxy
from livekit_qwen_asr.supervisor import SupervisedEngine

logger = logging.getLogger("qwen-asr-captioner")


# -- settings (flags -> env -> defaults) ---------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    language: str | None = None
    context: str = ""
    endpointing_ms: int = 500
    max_utterance_sec: float = 30.0
    executor: str = "thread"
    load_timeout: float = 900.0

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            model=env.get("QWEN_ASR_MODEL") or DEFAULT_MODEL,
            language=env.get("QWEN_ASR_LANGUAGE") or None,
            context=env.get("QWEN_ASR_CONTEXT", ""),
            endpointing_ms=int(env.get("QWEN_ASR_ENDPOINTING_MS") or 500),
            max_utterance_sec=float(env.get("QWEN_ASR_MAX_UTTERANCE_SEC") or 30.0),
            executor=env.get("QWEN_ASR_EXECUTOR") or "thread",
            load_timeout=float(env.get("QWEN_ASR_LOAD_TIMEOUT") or 900.0),
        )

    @property
    def executor_type(self) -> JobExecutorType:
        return JobExecutorType.THREAD if self.executor == "thread" else JobExecutorType.PROCESS

    def engine_options(self) -> EngineOptions:
        return EngineOptions(model=self.model)

    def make_stt(self, engine) -> STT:
        return STT(
            engine=engine,
            language=self.language,
            context=self.context,
            endpointing_ms=self.endpointing_ms,
            max_utterance_sec=self.max_utterance_sec,
        )


_FLAGS = (  # flag, env var, type, help
    ("--model", "QWEN_ASR_MODEL", str, f"HF id or local checkpoint dir (default {DEFAULT_MODEL})"),
    ("--language", "QWEN_ASR_LANGUAGE", str, "force a language (en, English, zh-CN...); default: detect"),
    ("--context", "QWEN_ASR_CONTEXT", str, "context text for the model: topic, names, spellings"),
    ("--endpointing-ms", "QWEN_ASR_ENDPOINTING_MS", int, "silence that ends an utterance (default 500)"),
    ("--max-utterance-sec", "QWEN_ASR_MAX_UTTERANCE_SEC", float, "longest utterance before a cut (30)"),
    ("--executor", "QWEN_ASR_EXECUTOR", str, "thread (default: all rooms share one engine) | process"),
    ("--load-timeout", "QWEN_ASR_LOAD_TIMEOUT", float, "seconds allowed for loading the engine (900)"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agent.py",
        add_help=False,
        allow_abbrev=False,
        description="Qwen3-ASR captioner options (flags or environment variables; flags win). "
        "The worker commands and LiveKit options follow.",
    )
    for flag, env, typ, text in _FLAGS:
        p.add_argument(flag, type=typ, default=None, help=f"{text} [env {env}]")
    return p


def apply_cli(argv: list[str]) -> list[str]:
    """Take our flags out of `argv` (anywhere), export them as env vars (job processes and threads
    read settings from the environment), and return the rest for the LiveKit CLI."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    for flag, env, _typ, _text in _FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            os.environ[env] = str(value)
    settings = Settings.from_env()
    if settings.executor not in ("thread", "process"):
        parser.error(f"--executor must be thread or process, got {settings.executor!r}")
    if "-h" in rest or "--help" in rest or not rest:
        parser.print_help()
        print()
    return rest


# -- one engine per process, on its own event loop -------------------------------------------------
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


# -- the worker ------------------------------------------------------------------------------------
def prewarm(proc: JobProcess) -> None:
    """Load the engine before any job arrives (once per process; job threads share it)."""
    settings = Settings.from_env()
    engine = LoopThreadEngine.shared(settings.engine_options())
    engine.wait_ready(settings.load_timeout)
    proc.userdata["qwen_asr_settings"] = settings
    proc.userdata["qwen_asr_engine"] = engine


async def entrypoint(ctx: JobContext) -> None:
    settings: Settings = ctx.proc.userdata.get("qwen_asr_settings") or Settings.from_env()
    engine: LoopThreadEngine | None = ctx.proc.userdata.get("qwen_asr_engine")
    if engine is None:  # prewarm did not run (e.g. a custom server): load now, once per process
        engine = LoopThreadEngine.shared(settings.engine_options())
        await engine.ready()
    stt = settings.make_stt(engine)
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    captioner = RoomCaptioner(ctx.room, stt)
    captioner.start()
    logger.info("captioning room %s", ctx.room.name, extra={"model": settings.model})

    async def shutdown(reason: str) -> None:
        await captioner.aclose()
        await stt.aclose()
        logger.info("room %s closed (%s): %s", ctx.room.name, reason, captioner.stats)

    ctx.add_shutdown_callback(shutdown)


def make_server(settings: Settings) -> AgentServer:
    server = AgentServer(
        setup_fnc=prewarm,
        job_executor_type=settings.executor_type,
        initialize_process_timeout=settings.load_timeout,
    )
    server.rtc_session(entrypoint)
    return server


def main(argv: list[str] | None = None) -> None:
    rest = apply_cli(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *rest]
    cli.run_app(make_server(Settings.from_env()))


if __name__ == "__main__":
    main()
