"""A voice agent that hears through Qwen3-ASR: `AgentSession` with our STT, turn detection and
preemptive generation fed by our preflight transcripts.

    export LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python -m livekit.agents start examples/voice_agent.py --dev   # the module-level `server` below
    python examples/voice_agent.py dev                             # the same (or: start)

The STT streams partial text while the user talks. One VAD decides: the session's VAD and turn
detector own turn-taking and flush our stream at end of speech (the final follows); the plugin sees it
runs inside such a session and starts no VAD of its own (docs/usage.md, "Who ends an utterance").
Its PREFLIGHT_TRANSCRIPT (the full text, sent when the turn may be ending) lets the session start the
LLM reply before the turn is confirmed (`preemptive_generation`); the agent's replies and the session's
keyterms reach the recognizer as context.

The LLM and TTS go through LiveKit Inference (VOICE_AGENT_LLM / VOICE_AGENT_TTS, model strings as
AgentSession accepts them). The engine is loaded once per worker process in prewarm and shared by all
sessions of that process (`qwen_asr.LoopThreadEngine`, as in agent.py); with QWEN_ASR_BASE_URL (or
`--engine-url`) the steps go to vLLM servers instead, nothing is loaded, and each session runs in
LiveKit's default process executor:

    python examples/voice_agent.py --engine-url http://127.0.0.1:8000 --capacity 20 start
"""

from __future__ import annotations

import os
import sys

from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    JobProcess,
    inference,
)

from livekit_qwen_asr.worker import WorkerSettings, run_script


def _settings() -> WorkerSettings:
    return WorkerSettings.from_env()


class Assistant(Agent):
    def __init__(self) -> None:
        super().__init__(
            instructions="You are a helpful voice assistant. Answer briefly, in plain spoken sentences."
        )


def prewarm(proc: JobProcess) -> None:
    settings = _settings()
    proc.userdata["vad"] = inference.VAD()
    proc.userdata["qwen_asr_engine"] = settings.load_engine()  # None with a remote engine


async def entrypoint(ctx: JobContext) -> None:
    settings = _settings()
    stt = settings.make_stt(ctx.proc.userdata["qwen_asr_engine"])
    ctx.add_shutdown_callback(stt.aclose)  # closes its server connection (remote engine)
    session = AgentSession(
        stt=stt,
        vad=ctx.proc.userdata["vad"],
        llm=os.environ.get("VOICE_AGENT_LLM", "openai/gpt-4.1-mini"),
        tts=os.environ.get("VOICE_AGENT_TTS", "cartesia/sonic-3"),
        turn_handling={
            "turn_detection": inference.TurnDetector(),
            "preemptive_generation": {"enabled": True},
        },
    )
    await session.start(agent=Assistant(), room=ctx.room)  # connects the job to the room
    await session.generate_reply(instructions="Greet the user and offer your help.")


def make_server(settings: WorkerSettings) -> AgentServer:
    server = AgentServer(setup_fnc=prewarm, **settings.server_options())
    server.rtc_session(entrypoint)
    return server


# the module-level AgentServer `lk agent` / `python -m livekit.agents start` discover in this file
server = make_server(_settings())


def main(argv: list[str] | None = None) -> int:
    return run_script(__file__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
