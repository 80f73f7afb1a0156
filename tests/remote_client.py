"""A LiveKit job process's view of a shared vLLM server, for tests/test_remote_engine.py: two streams
of one `STT(base_url=...)`, started when the parent writes a line to stdin (so several such processes
start together). Prints two JSON lines: which of torch / vLLM / transformers got imported, then each
stream's finals, every step's (start, end) in CLOCK_MONOTONIC seconds, which all processes of a
machine share, and whether the engine sent encoder windows (remote_windows.py) or used the chat path.

    python -m tests.remote_client URL API_KEY AUDIO.npy
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from livekit import rtc
from livekit.agents import stt

from livekit_qwen_asr import STT


async def run_stream(plugin: STT, audio: np.ndarray) -> list[str]:
    stream = plugin.stream()
    for i in range(0, len(audio), 1600):  # 100 ms frames
        piece = audio[i : i + 1600]
        stream.push_frame(rtc.AudioFrame(piece.tobytes(), 16000, 1, len(piece)))
    stream.end_input()
    events = [ev async for ev in stream]
    return [e.alternatives[0].text for e in events if e.type == stt.SpeechEventType.FINAL_TRANSCRIPT]


async def main(url: str, api_key: str, audio_path: str) -> None:
    audio = np.load(audio_path).astype(np.int16)
    plugin = STT(base_url=url, api_key=api_key, vad=None)
    await plugin.ensure_engine()
    print("ready", flush=True)
    sys.stdin.readline()  # the parent's go: every client starts its streams now
    finals = await asyncio.gather(run_stream(plugin, audio), run_stream(plugin, audio[::-1].copy()))
    steps = [(start, end) for _sid, start, end in plugin.engine.stats.recent]
    windows = getattr(plugin.engine, "reuses_windows", None)
    await plugin.aclose()
    print(json.dumps(sorted(m for m in ("torch", "vllm", "transformers") if m in sys.modules)))
    print(json.dumps({"finals": finals, "steps": steps, "reuses_windows": windows}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
