"""Browser WebRTC calls without a LiveKit server: a page captures the microphone, an aiortc peer in
our server receives it, one STT stream per call on the shared engine, captions back over a data
channel to every open page. `python -m livekit_qwen_asr.browser` serves it; see docs/browser.md.

Needs the `browser` extra (aiortc).
"""

from .frames import av_frame_to_rtc
from .server import BrowserCaptionServer, create_app
from .session import CallInfo, CaptionHub

__all__ = ["BrowserCaptionServer", "CallInfo", "CaptionHub", "av_frame_to_rtc", "create_app"]
