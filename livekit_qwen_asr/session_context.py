"""What an STT stream can learn about the AgentSession it runs in (livekit-agents 1.8.x).

The session opens our stream inside its STT pipeline task, whose context holds the pipeline
(`_STTPipelineContextVar`); the pipeline's node is the agent's bound `stt_node`, and the agent knows
the turn-detection mode. These are private names of livekit-agents (pinned `<2`): every lookup is
guarded, and anything unexpected falls back to "not in a session" (the plugin then endpoints itself).
"""

from __future__ import annotations

from typing import Any

from livekit.agents.utils import is_given

from .log import logger


def _current_pipeline() -> Any | None:
    try:
        from livekit.agents.voice.audio_recognition import _STTPipelineContextVar
    except ImportError:  # another livekit-agents layout: behave as outside a session
        return None
    return _STTPipelineContextVar.get(None)


def session_ends_turns() -> bool | None:
    """None outside an AgentSession's STT pipeline. Inside one: True when the session ends user turns
    itself (its VAD, a turn-detector model, manual or realtime turns) and flushes our stream; False
    when it waits for the STT's own end of speech (`turn_detection="stt"`)."""
    pipeline = _current_pipeline()
    if pipeline is None:
        return None
    try:
        agent = pipeline._stt_node.__self__
        mode = agent.turn_detection
        if not is_given(mode):
            mode = agent.session.turn_detection
    except Exception:  # noqa: BLE001 - private structure changed: assume the session flushes (its default)
        logger.debug("could not read the session's turn detection", exc_info=True)
        return True
    return mode != "stt"


def conversation_reply_text(event: Any) -> str | None:
    """The text of an assistant message from a `ConversationItemAddedEvent`, else None."""
    item = getattr(event, "item", None)
    if getattr(item, "role", None) != "assistant":
        return None
    text = getattr(item, "text_content", None)
    return text if isinstance(text, str) and text.strip() else None
