"""The caption page in a real browser: Debian's headless Chromium, its fake microphone playing a speech
WAV, WebRTC to our aiortc server on 127.0.0.1, the real STT + VAD + vLLM engine (tiny synthetic
checkpoint). Two tabs = two participants; a tab closed mid-utterance still delivers its final to the
other; a reload ends the old call and starts a new one; closing the last tab leaves nothing behind.

Artifacts (test-artifacts/browser/, or $LKQ_TEST_ARTIFACTS/browser/): a screenshot of the page with
captions and timings.json (page load -> connected / first interim / first final, in ms).
Not skipped when Chromium is missing: it fails and says how to install it (.ci/run installs it)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from livekit_qwen_asr.browser import BrowserCaptionServer, CaptionHub
from livekit_qwen_asr.browser.headless import HeadlessChromium, find_chromium, write_fake_mic_wav
from livekit_qwen_asr.stt import STT

from .engine_wrappers import RecordingEngine

pytestmark = pytest.mark.timeout(300)

ARTIFACTS = (
    Path(os.environ.get("LKQ_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")) / "browser"
)


def _lines_of(label: str, *, final: bool | None = None) -> str:
    cls = ".line" + {True: ".final", False: ".interim", None: ""}[final]
    return (
        f"[...document.querySelectorAll('#captions {cls}')]"
        f".filter(e => e.querySelector('.speaker').textContent.startsWith({json.dumps(label)}))"
    )


async def test_real_browser_tabs_get_captions(engine, speech16k, tmp_path):
    find_chromium()  # a clear error (not a skip) when Chromium is missing
    rec = RecordingEngine(engine)
    hub = CaptionHub(STT(engine=rec), finish_timeout=60)
    server = BrowserCaptionServer(hub, "127.0.0.1", 0)
    await server.start()
    wav = write_fake_mic_wav(tmp_path / "mic.wav", speech16k[: 10 * 16000], lead_silence_s=1.0)
    try:
        async with HeadlessChromium(wav) as browser:
            # tab A: its own interim appears (marked "(you)", styled as interim), replaced in place
            a = await browser.open(server.url + "?autostart=1&label=tab-a")
            await a.wait_for(f"{_lines_of('tab-a (you)', final=False)}.length > 0", timeout=90)
            call_a = await a.evaluate("window.captionStats.call")
            assert list(hub.calls) == [call_a] and hub.calls[call_a].label == "tab-a"
            banner = await a.evaluate("document.getElementById('banner').textContent")
            assert "Synthetic model" in banner  # random weights are never passed off as transcription

            # tab B joins: a second participant on the same engine; A's page shows B's captions
            b = await browser.open(server.url + "?autostart=1&label=tab-b")
            await a.wait_for(f"{_lines_of('tab-b')}.length > 0", timeout=90)
            (call_b,) = set(hub.calls) - {call_a}
            stream_b = hub.calls[call_b].stream_id

            # B's tab is closed mid-utterance: its final still reaches A's page, and B is freed
            await b.close()
            ended_b = await hub.wait_call_ended(call_b)
            assert ended_b is not None and ended_b.finals >= 1
            await a.wait_for(f"{_lines_of('tab-b', final=True)}.length > 0", timeout=30)
            assert await a.evaluate(f"{_lines_of('tab-b', final=False)}.length") == 0
            assert stream_b in rec.released
            assert {hub.calls[call_a].stream_id, stream_b} <= {r.stream_id for r in rec.requests}

            # A's own utterance ends with the speech (VAD): a final line; one line per segment
            await a.wait_for(f"{_lines_of('tab-a', final=True)}.length > 0", timeout=90)
            stats = await a.evaluate("window.captionStats")
            lines_a = await a.evaluate(f"{_lines_of('tab-a')}.length")
            # interims are redrawn in place: one line per segment, however many interims it had
            assert lines_a == stats["segments"] and stats["interims"] > stats["segments"]
            shot = await a.screenshot(ARTIFACTS / "captions.png")
            assert shot.stat().st_size > 10_000

            # reload: the old call ends (the page's beacon), the page starts a new one
            await a.reload()
            ended_a = await hub.wait_call_ended(call_a)
            assert ended_a is not None and ended_a.end_reason == "hung up"
            await a.wait_for("window.captionStats.call && window.captionStats.state === 'live'", timeout=30)
            new_call = await a.evaluate("window.captionStats.call")
            assert new_call != call_a and list(hub.calls) == [new_call]

            # the last tab closes: nothing is left
            await a.close()
            await hub.wait_call_ended(new_call)
            await hub.wait_idle()
            assert hub.calls == {} and hub.pending_tasks == 0
            assert hub.stats.calls_started == hub.stats.calls_ended == 3
            assert hub.stats.stream_errors == 0 and hub.stats.finish_timeouts == 0
            version = browser.version
    finally:
        await server.aclose()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    timings = {
        "browser": version,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "note": "ms since navigation; fake mic: 1 s silence, then speech; tiny synthetic model, CPU",
        "connected_ms": stats["connectedMs"],
        "first_interim_ms": stats["firstInterimMs"],
        "first_final_ms": stats["firstFinalMs"],
    }
    (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=1))
    print("browser timings:", timings)
    assert 0 < stats["connectedMs"] < stats["firstInterimMs"] < stats["firstFinalMs"]
