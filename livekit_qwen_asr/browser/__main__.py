"""Serve the caption page: `python -m livekit_qwen_asr.browser [--port 8080] [--model ID_OR_PATH]`.

Open the printed URL in a browser on this machine, allow the microphone, speak. Every tab is a
participant; all of them share one vLLM engine. Without a model hub the tiny synthetic checkpoint is
used and bannered (random tokens, not a transcription); with the bundled test model (the fallback
when the real model cannot be loaded) the page says what the model is and knows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time

from ..demo import BANNER, resolve_model, trained_model_banner
from ..engine import DEFAULT_MODEL, EngineOptions
from ..stt import STT
from ..supervisor import SupervisedEngine
from ..test_model import is_test_model
from .server import BrowserCaptionServer
from .session import CaptionHub


async def serve(args: argparse.Namespace) -> int:
    model, reason = resolve_model(args.model)
    print(f"starting vLLM engine for {model} ...", flush=True)
    t0 = time.perf_counter()
    # a long-running server: a dead engine is restarted once (supervisor.py)
    engine = await SupervisedEngine.start(EngineOptions(model=model, max_model_len=args.max_model_len))
    print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if engine.is_synthetic:
        print(BANNER.format(reason=reason or f"{model} is a synthetic checkpoint"), flush=True)
    elif is_test_model(model):
        print(trained_model_banner(model, reason), flush=True)
    stt = STT(engine=engine, language=args.language, context=args.context)
    hub = CaptionHub(stt, max_calls=args.max_calls, share_captions=not args.private)
    server = BrowserCaptionServer(hub, args.host, args.port)
    await server.start()
    print(f"serving live captions on {server.url}  (Ctrl-C to stop)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("stopping: finishing open calls ...", flush=True)
    await server.aclose()
    await stt.aclose()
    await engine.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model", default=os.environ.get("QWEN_ASR_MODEL", DEFAULT_MODEL))
    p.add_argument("--language", default=None, help="force a language, e.g. en; default auto-detect")
    p.add_argument("--context", default="", help="context text (names, topic) for the system prompt")
    p.add_argument("--max-calls", type=int, default=16, help="live calls allowed at once")
    p.add_argument("--private", action="store_true", help="each page sees only its own captions")
    p.add_argument("--max-model-len", type=int, default=8192)
    args = p.parse_args(argv)
    if args.max_calls < 1:
        p.error("--max-calls must be >= 1")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
