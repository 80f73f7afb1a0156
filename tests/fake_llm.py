"""A recording stand-in for an LLM (no LLM can run here): every `chat()` is a reply generation the
session started; it answers one fixed sentence. Mimics livekit-agents 1.8.9's `llm.LLM` /
`llm.LLMStream` API exactly (the abstract `chat` / `_run` and the `ChatChunk` it sends)."""

from __future__ import annotations

import time
import uuid

from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions, llm
from livekit.agents.types import NOT_GIVEN, NotGivenOr


class RecordingLLM(llm.LLM):
    def __init__(self, reply: str) -> None:
        super().__init__()
        self.reply = reply
        self.calls: list[tuple[float, str]] = []  # (time, last user message text) per generation

    @property
    def model(self) -> str:
        return "recording-llm"

    @property
    def provider(self) -> str:
        return "test"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict] = NOT_GIVEN,
    ) -> llm.LLMStream:
        users = [m for m in chat_ctx.messages() if m.role == "user"]
        self.calls.append((time.monotonic(), users[-1].text_content or "" if users else ""))
        return _ReplyStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _ReplyStream(llm.LLMStream):
    async def _run(self) -> None:
        assert isinstance(self._llm, RecordingLLM)
        delta = llm.ChoiceDelta(role="assistant", content=self._llm.reply)
        self._event_ch.send_nowait(llm.ChatChunk(id=uuid.uuid4().hex, delta=delta))
