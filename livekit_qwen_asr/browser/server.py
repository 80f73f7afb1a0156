"""HTTP signalling and the caption page (aiohttp).

Routes:
  GET  /            the caption page (web/index.html); `?autostart=1&label=NAME` starts a call at once
  GET  /static/...  its script and style sheet
  POST /offer       {"sdp", "type": "offer", "label"} -> {"sdp", "type": "answer", "call"}; 400 for a bad
                    offer, 503 when `max_calls` are live or the server is closing (JSON {"error"})
  POST /hangup      {"call"} -> {"ended": bool}; what the page sends (as a beacon) when it closes
  GET  /api/state   live calls, ended calls, counters (JSON)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from ..log import logger
from .ice import restrict_to_loopback
from .session import CallRejectedError, CaptionHub

WEB_DIR = Path(__file__).parent / "web"
HUB_KEY = web.AppKey("hub", CaptionHub)
MAX_OFFER_BYTES = 64 * 1024


def create_app(hub: CaptionHub) -> web.Application:
    """The aiohttp application for `hub` (closing the app ends every call, finals delivered first)."""
    app = web.Application(client_max_size=MAX_OFFER_BYTES)
    app[HUB_KEY] = hub
    app.router.add_get("/", _index)
    app.router.add_static("/static/", WEB_DIR, show_index=False)
    app.router.add_post("/offer", _offer)
    app.router.add_post("/hangup", _hangup)
    app.router.add_get("/api/state", _state)

    async def _close_hub(app: web.Application) -> None:
        await app[HUB_KEY].aclose()

    app.on_shutdown.append(_close_hub)
    return app


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _error(400, f"the body must be JSON: {e}") from e
    if not isinstance(body, dict):
        raise _error(400, "the body must be a JSON object")
    return body


def _error(status: int, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 503: web.HTTPServiceUnavailable}.get(status, web.HTTPBadRequest)
    return cls(text=json.dumps({"error": message}), content_type="application/json")


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-store"})


async def _offer(request: web.Request) -> web.Response:
    body = await _json_body(request)
    hub = request.app[HUB_KEY]
    try:
        info, answer = await hub.open_call(body.get("sdp"), body.get("type"), body.get("label", ""))
    except CallRejectedError as e:
        logger.warning("browser offer rejected: %s", e)
        raise _error(e.status, str(e)) from e
    return web.json_response({**answer, "call": info.id, "speaker": info.label})


async def _hangup(request: web.Request) -> web.Response:
    body = await _json_body(request)
    task = request.app[HUB_KEY].hang_up(str(body.get("call", "")))
    return web.json_response({"ended": task is not None})


async def _state(request: web.Request) -> web.Response:
    return web.json_response(request.app[HUB_KEY].snapshot())


class BrowserCaptionServer:
    """Serve `create_app(hub)` on host:port (port 0 = any free port) until `aclose()`."""

    def __init__(self, hub: CaptionHub, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.hub = hub
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> None:
        if self.host in ("127.0.0.1", "localhost"):
            restrict_to_loopback()  # a loopback page: ICE must offer 127.0.0.1 (see ice.py)
        self._runner = web.AppRunner(create_app(self.hub), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # on_shutdown ends every call first
            self._runner = None
