"""The meeting captioner alone: join a LiveKit room and caption every participant's microphone.

    export LIVEKIT_URL=wss://my-project.livekit.cloud
    export LIVEKIT_TOKEN=...                  # a token for this participant, or instead:
    export LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...   # mint one for --room / --identity
    python examples/meeting_captions.py --room standup --model Qwen/Qwen3-ASR-0.6B --language en

Captions go to the room as `lk.transcription` text streams (LiveKit clients show them like agent
transcriptions) and are printed here. Ctrl-C leaves the room after publishing the pending finals.
No agent worker is involved: this is a plain `rtc.Room` client (see agent.py for the worker).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from livekit import api, rtc

from livekit_qwen_asr import STT
from livekit_qwen_asr.captioner import Caption, RoomCaptioner
from livekit_qwen_asr.engine import DEFAULT_MODEL, close_shared_engines


def _token(args: argparse.Namespace) -> str:
    if args.token:
        return args.token
    key, secret = os.environ.get("LIVEKIT_API_KEY"), os.environ.get("LIVEKIT_API_SECRET")
    if not (key and secret and args.room):
        raise SystemExit("need LIVEKIT_TOKEN, or LIVEKIT_API_KEY + LIVEKIT_API_SECRET + --room")
    grants = api.VideoGrants(room_join=True, room=args.room, can_subscribe=True, can_publish_data=True)
    return api.AccessToken(key, secret).with_identity(args.identity).with_grants(grants).to_jwt()


def _print_caption(c: Caption) -> None:
    if c.final:
        print(f"[{c.participant_identity}] {c.text}", flush=True)


async def run(args: argparse.Namespace) -> None:
    stt = STT(
        model=args.model,
        language=args.language,
        context=args.context,
        endpointing_ms=args.endpointing_ms,
    )
    print("loading the engine...", flush=True)
    await stt.ensure_engine()  # before joining, so the first words are not waiting on it

    room = rtc.Room()
    stop = asyncio.Event()
    room.on("disconnected", lambda *_: stop.set())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    await room.connect(args.url, _token(args), rtc.RoomOptions(auto_subscribe=True))
    captioner = RoomCaptioner(room, stt)
    captioner.on("caption", _print_caption)
    captioner.start()
    print(
        f"captioning room {room.name!r} as {room.local_participant.identity!r}; Ctrl-C to leave", flush=True
    )
    try:
        await stop.wait()
    finally:
        await captioner.aclose()  # pending finals are published before leaving
        await room.disconnect()
        await stt.aclose()
        await close_shared_engines()
        print(captioner.stats, flush=True)


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=env("LIVEKIT_URL"), help="LiveKit server URL [env LIVEKIT_URL]")
    p.add_argument("--token", default=env("LIVEKIT_TOKEN"), help="access token [env LIVEKIT_TOKEN]")
    p.add_argument("--room", default=env("LIVEKIT_ROOM"), help="room (to mint a token) [env LIVEKIT_ROOM]")
    p.add_argument("--identity", default="captioner", help="identity (to mint a token)")
    p.add_argument("--model", default=env("QWEN_ASR_MODEL") or DEFAULT_MODEL, help="[env QWEN_ASR_MODEL]")
    p.add_argument("--language", default=env("QWEN_ASR_LANGUAGE") or None, help="[env QWEN_ASR_LANGUAGE]")
    p.add_argument("--context", default=env("QWEN_ASR_CONTEXT", ""), help="[env QWEN_ASR_CONTEXT]")
    p.add_argument(
        "--endpointing-ms", type=int, default=int(env("QWEN_ASR_ENDPOINTING_MS") or 500),
        help="silence that ends an utterance [env QWEN_ASR_ENDPOINTING_MS]",
    )  # fmt: skip
    args = p.parse_args(argv)
    if not args.url:
        p.error("--url or LIVEKIT_URL is required")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
