"""Drive a real headless Chromium with a fake microphone (a WAV file), over the DevTools protocol.

Used by the browser test and `bench/browser_latency.py`; handy to check the page on a machine with no
display or microphone. Chromium plays the WAV as every tab's microphone (once, then silence, with
`loop=False`). Flags: headless, no sandbox (containers run as root), loopback WebRTC allowed (the
server's ICE offers 127.0.0.1 only), no network services, no background throttling of tabs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class ChromiumNotFoundError(RuntimeError):
    """No Chromium binary on PATH (Debian: apt-get install chromium)."""


class DevToolsError(RuntimeError):
    """A DevTools command failed or a page script threw."""


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES):
        if name and (path := shutil.which(name)):
            return path
    raise ChromiumNotFoundError("no chromium on PATH (apt-get install chromium, or set CHROMIUM=...)")


def write_fake_mic_wav(path: str | Path, speech16k: np.ndarray, lead_silence_s: float = 1.0) -> Path:
    """A 16 kHz mono s16 WAV for Chromium's fake microphone: silence first (the page connects
    meanwhile), then the speech."""
    from ..samples import write_wav

    pcm = np.concatenate([np.zeros(int(lead_silence_s * 16000), np.int16), np.asarray(speech16k, np.int16)])
    return write_wav(path, pcm)


def chromium_flags(fake_mic_wav: str | Path, user_data_dir: str | Path, *, loop: bool = False) -> list[str]:
    wav = str(Path(fake_mic_wav).resolve()) + ("" if loop else "%noloop")
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
        "--disable-backgrounding-occluded-windows",
        "--allow-loopback-in-peer-connection",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--window-size=1100,800",
        f"--user-data-dir={user_data_dir}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
    ]


class Page:
    """One tab, attached through the browser's DevTools connection (flat session)."""

    def __init__(self, browser: HeadlessChromium, target_id: str, session_id: str) -> None:
        self._browser = browser
        self.target_id = target_id
        self.session_id = session_id

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._browser.send(method, session_id=self.session_id, **params)

    async def evaluate(self, expression: str, *, timeout: float = 60.0) -> Any:
        """Evaluate JS (promises awaited) and return its JSON value."""
        async with asyncio.timeout(timeout):
            res = await self.send(
                "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
            )
        if "exceptionDetails" in res:
            details = res["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise DevToolsError(f"page script failed: {text}")
        return res.get("result", {}).get("value")

    async def wait_for(self, js_condition: str, *, timeout: float = 60.0) -> Any:
        """Resolve when `js_condition` (an expression) is truthy: checked now and on every DOM change,
        so no polling interval; fails after `timeout` s with the condition's text."""
        ms = int(timeout * 1000)
        script = f"""new Promise((resolve, reject) => {{
            const check = () => {{ try {{ return ({js_condition}); }} catch (e) {{ return null; }} }};
            const now = check();
            if (now) return resolve(now);
            const obs = new MutationObserver(() => {{
                const v = check();
                if (v) {{ obs.disconnect(); clearTimeout(timer); resolve(v); }}
            }});
            const timer = setTimeout(() => {{ obs.disconnect();
                reject(new Error("timed out waiting for: " + {json.dumps(js_condition)})); }}, {ms});
            obs.observe(document, {{subtree: true, childList: true, characterData: true, attributes: true}});
        }})"""
        return await self.evaluate(script, timeout=timeout + 5)

    async def screenshot(self, path: str | Path) -> Path:
        res = await self.send("Page.captureScreenshot", format="png")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(res["data"]))
        return out

    async def navigate(self, url: str, *, timeout: float = 30.0) -> None:
        """Load `url` and return after its load event (scripts have run)."""
        loaded = self._browser.expect_event("Page.loadEventFired", self.session_id)
        await self.send("Page.navigate", url=url)
        async with asyncio.timeout(timeout):
            await loaded

    async def reload(self, *, timeout: float = 30.0) -> None:
        """Reload (the old document gets pagehide) and return after the new load event."""
        loaded = self._browser.expect_event("Page.loadEventFired", self.session_id)
        await self.send("Page.reload", ignoreCache=True)
        async with asyncio.timeout(timeout):
            await loaded

    async def close(self) -> None:
        """Close the tab as a user would (the page gets pagehide)."""
        await self._browser.send("Target.closeTarget", targetId=self.target_id)


class HeadlessChromium:
    """`async with HeadlessChromium(wav) as browser: page = await browser.open(url)`."""

    def __init__(self, fake_mic_wav: str | Path, *, loop_audio: bool = False, binary: str | None = None):
        self._wav = Path(fake_mic_wav)
        self._loop = loop_audio
        self._binary = binary
        self._proc: asyncio.subprocess.Process | None = None
        self._dir: str | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._event_waiters: list[tuple[str, str | None, asyncio.Future[dict[str, Any]]]] = []
        self._next_id = 0
        self.version = ""

    async def __aenter__(self) -> HeadlessChromium:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self, timeout: float = 60.0) -> None:
        if not self._wav.is_file():
            raise FileNotFoundError(self._wav)
        binary = self._binary or find_chromium()
        self._dir = tempfile.mkdtemp(prefix="lkq-chromium-")
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            *chromium_flags(self._wav, self._dir, loop=self._loop),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # a tcmalloc preloaded for vLLM (scripts/preload.sh) is not meant for Chromium
            env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
        )
        ws_url = await self._devtools_url(timeout)
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(ws_url, max_msg_size=0)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.version = (await self.send("Browser.getVersion")).get("product", "")

    async def _devtools_url(self, timeout: float) -> str:
        """Chromium prints `DevTools listening on ws://...` on stderr once it is ready."""
        assert self._proc is not None and self._proc.stderr is not None
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self._proc.stderr.readline()
                if not raw:
                    raise RuntimeError("chromium exited during start-up:\n" + "".join(lines[-20:]))
                line = raw.decode(errors="replace")
                lines.append(line)
                if m := re.search(r"DevTools listening on (ws://\S+)", line):
                    self._drain = asyncio.get_running_loop().create_task(self._drain_stderr())
                    return m.group(1)

    async def _drain_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while await self._proc.stderr.readline():
            pass  # keep the pipe from filling up

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "method" in data:  # an event
                for waiter in [w for w in self._event_waiters if w[0] == data["method"]]:
                    if waiter[1] in (None, data.get("sessionId")):
                        self._event_waiters.remove(waiter)
                        if not waiter[2].done():
                            waiter[2].set_result(data.get("params", {}))
                continue
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                if "error" in data:
                    fut.set_exception(DevToolsError(f"{data['error'].get('message')}"))
                else:
                    fut.set_result(data.get("result", {}))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(DevToolsError("the DevTools connection closed"))

    async def send(self, method: str, *, session_id: str | None = None, **params: Any) -> dict[str, Any]:
        assert self._ws is not None, "start() first"
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session_id is not None:
            msg["sessionId"] = session_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = fut
        await self._ws.send_str(json.dumps(msg))
        return await fut

    def expect_event(self, method: str, session_id: str | None = None) -> asyncio.Future[dict[str, Any]]:
        """A future for the next `method` event (of `session_id`); create it before the command."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._event_waiters.append((method, session_id, fut))
        return fut

    async def open(self, url: str) -> Page:
        """A new tab showing `url`; returns after the page's load event."""
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        page = Page(self, target["targetId"], attached["sessionId"])
        await page.send("Page.enable")
        await page.navigate(url)
        return page

    async def aclose(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.send("Browser.close")
            await self._ws.close()
            self._ws = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._proc is not None:
            try:
                async with asyncio.timeout(10):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
            self._proc = None
        if self._drain is not None:
            await self._drain  # ends with the process's stderr
            self._drain = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
