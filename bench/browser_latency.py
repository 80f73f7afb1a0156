"""Caption page latency in a real browser: page load -> connected -> first interim -> first final.

    .venv/bin/python -m bench.browser_latency [--runs 5] [--model PATH] [--chunk-size-sec 2.0]

Each run opens a fresh tab of the caption page in headless Chromium (fake microphone: --lead-silence
seconds of silence, then the bundled speech), served by `livekit_qwen_asr.browser` on the real engine,
and reads the page's own timestamps (ms since navigation): microphone granted, WebRTC connected, first
interim and first final of its own call shown in the DOM. "after speech" subtracts the microphone time
and the lead silence (the fake device starts playing when the microphone opens). Default model: the
tiny synthetic checkpoint (its text is random tokens; the timing path is real). Writes JSON to
results/browser-latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from livekit_qwen_asr.browser import BrowserCaptionServer, CaptionHub
from livekit_qwen_asr.browser.headless import HeadlessChromium, write_fake_mic_wav
from livekit_qwen_asr.engine import EngineOptions, VLLMEngine
from livekit_qwen_asr.samples import bundled_speech_path, read_wav
from livekit_qwen_asr.stt import STT
from livekit_qwen_asr.synthetic import ensure_checkpoint

KEYS = ("micMs", "connectedMs", "firstInterimMs", "firstFinalMs")


async def run(args: argparse.Namespace) -> dict:
    model = args.model or str(ensure_checkpoint("tiny"))
    engine = await VLLMEngine.start(EngineOptions(model=model, max_model_len=4096))
    hub = CaptionHub(STT(engine=engine, chunk_size_sec=args.chunk_size_sec), finish_timeout=60)
    server = BrowserCaptionServer(hub, "127.0.0.1", 0)
    await server.start()
    speech, rate, channels = read_wav(bundled_speech_path())
    assert rate == 16000 and channels == 1
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = write_fake_mic_wav(Path(tmp) / "mic.wav", speech, args.lead_silence)
        async with HeadlessChromium(wav) as browser:
            for i in range(args.runs):
                page = await browser.open(server.url + f"?autostart=1&label=run-{i}")
                await page.wait_for("window.captionStats.firstFinalMs !== null", timeout=120)
                stats = await page.evaluate("window.captionStats")
                await page.close()
                await hub.wait_call_ended(stats["call"])
                row = {k: stats[k] for k in KEYS}
                row["interimAfterSpeechMs"] = (
                    stats["firstInterimMs"] - stats["micMs"] - 1000 * args.lead_silence
                )
                runs.append(row)
                print(f"run {i}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()), flush=True)
            version = browser.version
    await server.aclose()
    await engine.aclose()
    summary = {
        k: {
            "median": statistics.median(r[k] for r in runs),
            "min": min(r[k] for r in runs),
            "max": max(r[k] for r in runs),
        }
        for k in (*KEYS, "interimAfterSpeechMs")
    }
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "browser": version,
        "model": model,
        "synthetic": engine.is_synthetic,
        "chunk_size_sec": args.chunk_size_sec,
        "lead_silence_s": args.lead_silence,
        "runs": runs,
        "summary_ms": summary,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--model", default=None, help="checkpoint dir (default: tiny synthetic)")
    p.add_argument("--chunk-size-sec", type=float, default=2.0)
    p.add_argument("--lead-silence", type=float, default=1.0)
    p.add_argument("--out", default="results/browser-latency.json")
    args = p.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary_ms"], indent=1))


if __name__ == "__main__":
    main()
