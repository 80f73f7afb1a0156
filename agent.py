"""LiveKit Agents worker: live captions (Qwen3-ASR on vLLM) for every room it joins.

    lk agent dev                             # development worker, with hot reload (LiveKit CLI)
    python -m livekit.agents start agent.py  # production worker (what `lk agent start` runs)
    python agent.py start                    # the same; `python agent.py dev` for a dev worker
    python agent.py --model /models/Qwen3-ASR-0.6B --language en --endpointing-ms 500 start
    python agent.py --engine-url http://gpu1:8000,http://gpu2:8000 --capacity 40 start  # vLLM servers
    python -m livekit.agents download-files  # fetch $QWEN_ASR_MODEL into the Hugging Face cache

The LiveKit server comes from LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET (or --url /
--api-key / --api-secret after the command). Our options are environment variables (QWEN_ASR_*) or,
with `python agent.py`, flags before or after the command; flags win. See docs/captioner.md.

`server` below is the module-level `AgentServer` the LiveKit CLI discovers in this file.

Every room the worker joins gets a `RoomCaptioner`: each remote participant's microphone is
transcribed on its own stream and published as `lk.transcription` text streams.

One engine per worker process, loaded in `prewarm`, shared by every room of that process. By default
jobs run as threads of the worker process (`QWEN_ASR_EXECUTOR=thread`), so ALL rooms share one engine
and their steps batch together; the engine lives on its own event-loop thread (`LoopThreadEngine`).
`process` runs each job in its own process (one engine per process: only sensible when several
engines fit, e.g. on CPU hosts with spare cores).

With `--engine-url` (QWEN_ASR_BASE_URL) the worker loads no model: every job's STT sends its steps to
those vLLM servers (scripts/serve.sh), and jobs run in LiveKit's default process executor.
`--capacity N` makes the worker report its load as streams / N, so LiveKit stops sending it jobs at N
(docs/deployment.md).
"""

from __future__ import annotations

import sys

from livekit.agents import AgentServer, AutoSubscribe, JobContext, JobProcess

from livekit_qwen_asr.captioner import RoomCaptioner
from livekit_qwen_asr.loop_thread import LoopThreadEngine
from livekit_qwen_asr.worker import WorkerSettings, logger, run_script


def prewarm(proc: JobProcess) -> None:
    """Load the engine before any job arrives (once per process; job threads share it). With a
    remote engine (--engine-url) there is nothing to load: each job's STT connects to the server."""
    settings = WorkerSettings.from_env()
    proc.userdata["qwen_asr_settings"] = settings
    proc.userdata["qwen_asr_engine"] = settings.load_engine()


async def entrypoint(ctx: JobContext) -> None:
    settings: WorkerSettings = ctx.proc.userdata.get("qwen_asr_settings") or WorkerSettings.from_env()
    engine: LoopThreadEngine | None = ctx.proc.userdata.get("qwen_asr_engine")
    if engine is None and not settings.remote:  # prewarm did not run (e.g. a custom server)
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


def make_server(settings: WorkerSettings) -> AgentServer:
    server = AgentServer(setup_fnc=prewarm, **settings.server_options())
    server.rtc_session(entrypoint)
    return server


# Built at import from the environment: `python -m livekit.agents` / `lk agent` import this file and
# run it; `python agent.py` exports its flags first, then hands over to the same CLI (run_script).
server = make_server(WorkerSettings.from_env())


def main(argv: list[str] | None = None) -> int:
    return run_script(__file__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
