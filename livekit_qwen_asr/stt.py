"""LiveKit Agents STT plugin: Qwen3-ASR on a shared vLLM engine with rollback-prefix streaming.

Layout follows livekit-plugins-deepgram: an options dataclass, `STT` (options, engine, offline
`recognize`) and `SpeechStream` (one per audio track). The streaming logic itself lives in
`streaming.StreamingTranscriber` (pure) and the model call in `engine` (vLLM).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from livekit import rtc
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    APIConnectionError,
    APIConnectOptions,
    APIStatusError,
    APITimeoutError,
    stt,
    utils,
)
from livekit.agents import vad as lk_vad
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.utils import AudioBuffer, is_given

from . import load
from .audio import AudioNormalizer, frames_to_16k_mono
from .endpointing import Action, EndpointingConfig, Finish, Pause, Push, Resume, Segmenter, Start
from .engine import (
    DEFAULT_MODEL,
    ASREngine,
    EngineOptions,
    RequestRejectedError,
    StepRequest,
    StepResult,
    get_shared_engine,
)
from .errors import EngineError, InvalidAudioError, InvalidOptionError, TooManyStreamsError
from .log import logger
from .prompt import language_code, normalize_language, sanitize_user_text
from .remote import parse_base_urls
from .session_context import conversation_reply_text, session_ends_turns
from .streaming import SAMPLE_RATE, Hypothesis, StepPlan, StreamingConfig, StreamingTranscriber

SYNTHETIC_LABEL = "[synthetic model: not a transcription]"
MAX_PIECE = SAMPLE_RATE // 2  # input samples handed to the segmenter at a time
VAD_WINDOW = 512  # samples per silero VAD inference at 16 kHz (livekit.local_inference.VAD_WINDOW_SAMPLES)


@dataclass(frozen=True)
class STTOptions:
    language: str | None = None  # canonical Qwen3-ASR name; None = auto-detect
    context: str = ""
    keyterms: tuple[str, ...] = ()
    interim_results: bool = True
    chunk_size_sec: float = 2.0
    unfixed_chunk_num: int = 2
    unfixed_token_num: int = 5
    max_new_tokens: int = 64
    endpointing_ms: int = 500
    max_utterance_sec: float = 30.0
    carry_context: bool = False
    carry_context_chars: int = 200

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InvalidOptionError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise InvalidOptionError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.context, str):
            raise InvalidOptionError(f"context must be a str, got {type(self.context).__name__}")
        _check_encodable("context", self.context)
        if isinstance(self.keyterms, str | bytes) or not isinstance(self.keyterms, tuple):
            raise InvalidOptionError("keyterms must be a list of strings, not one string")
        for term in self.keyterms:
            if not isinstance(term, str):
                raise InvalidOptionError(f"keyterms must be strings, got {type(term).__name__}: {term!r}")
            _check_encodable("keyterm", term)
        if isinstance(self.carry_context_chars, bool) or not isinstance(self.carry_context_chars, int):
            raise InvalidOptionError(f"carry_context_chars must be an int, got {self.carry_context_chars!r}")
        if self.carry_context_chars < 0:
            raise InvalidOptionError(f"carry_context_chars must be >= 0, got {self.carry_context_chars}")
        mus = self.max_utterance_sec
        if isinstance(mus, bool) or not isinstance(mus, int | float):
            raise InvalidOptionError(f"max_utterance_sec must be a number, got {mus!r}")
        # validates chunk / rollback / endpointing options and the language
        object.__setattr__(self, "language", normalize_language(self.language))
        self.streaming_config()
        self.endpointing_config()

    def endpointing_config(self) -> EndpointingConfig:
        cut_search = min(4.0, self.max_utterance_sec / 2) if self.max_utterance_sec >= 2 else 1.0
        return EndpointingConfig(
            endpointing_ms=self.endpointing_ms,
            max_utterance_sec=self.max_utterance_sec,
            cut_search_sec=cut_search,
        )

    def prompt_context(self) -> str:
        """The system-turn text: sanitised context, then the keyterms, one line."""
        context = sanitize_user_text(self.context).strip()
        terms = [t for t in (sanitize_user_text(k).strip() for k in self.keyterms) if t]
        if terms:
            context = f"{context}\n{', '.join(terms)}" if context else ", ".join(terms)
        return context

    def streaming_config(self) -> StreamingConfig:
        return StreamingConfig(
            chunk_size_sec=self.chunk_size_sec,
            unfixed_chunk_num=self.unfixed_chunk_num,
            unfixed_token_num=self.unfixed_token_num,
            context=self.prompt_context(),
            language=self.language,
        )


def _check_encodable(name: str, text: str) -> None:
    """Text the tokenizer cannot encode (a lone surrogate) would fail every step: refuse it up front."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"{e.reason} at index {e.start}"
        raise InvalidOptionError(f"{name} is not valid Unicode text ({where})") from None


def as_keyterms(value: object) -> tuple[str, ...]:
    """`keyterms` as given by a user: a list/tuple of strings. One string is refused (it would
    otherwise become one keyterm per character)."""
    if isinstance(value, str | bytes):
        raise InvalidOptionError(
            f"keyterms must be a list of strings, not one string: use keyterms=[{value!r}]"
        )
    if not isinstance(value, Iterable):
        raise InvalidOptionError(f"keyterms must be a list of strings, got {type(value).__name__}")
    return tuple(value)  # element types are checked by STTOptions


def step_confidence(result: StepResult) -> float:
    """Geometric-mean probability of the tokens one step generated (0.0 when it reported none)."""
    logprobs = getattr(result, "token_logprobs", ())
    if not logprobs:
        return 0.0
    return float(math.exp(sum(logprobs) / len(logprobs)))


def step_token_budget(plan: StepPlan, max_new_tokens: int) -> int:
    """Generation cap for one step. With a prefix, a step re-writes the K rolled-back tokens and the
    new audio's words (max_new_tokens covers that); without one it writes the whole utterance so far,
    so allow ~8 tokens per second of audio (fast speech is ~4-5)."""
    if plan.prefix:
        return max_new_tokens
    return max(max_new_tokens, int(math.ceil(plan.audio_seconds * 8)) + 16)


class STT(stt.STT):
    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        language: str | None = None,
        context: str = "",
        keyterms: list[str] | tuple[str, ...] = (),
        interim_results: bool = True,
        chunk_size_sec: float = 2.0,
        unfixed_chunk_num: int = 2,
        unfixed_token_num: int = 5,
        max_new_tokens: int = 64,
        vad: NotGivenOr[lk_vad.VAD | None] = NOT_GIVEN,
        endpointing_ms: int = 500,
        max_utterance_sec: float = 30.0,
        carry_context: bool = False,
        carry_context_chars: int = 200,
        engine: ASREngine | None = None,
        engine_options: EngineOptions | None = None,
        max_streams: int | None = None,
        base_url: str | list[str] | None = None,
        api_key: str | None = None,
    ) -> None:
        """Streaming Qwen3-ASR.

        Args:
            model: HF id or local checkpoint dir (ignored when `engine` or `engine_options` is given).
            language: force a language ("English", "en", "zh-CN"...); None detects it per utterance.
            context: free text for the system turn (topic, names); ChatML tokens are stripped.
            keyterms: words to bias towards, appended to the context.
            interim_results: emit INTERIM_TRANSCRIPT after every step.
            chunk_size_sec / unfixed_chunk_num / unfixed_token_num: the official streaming options.
            max_new_tokens: generation cap of a streaming step.
            vad: VAD for endpointing; default the bundled silero `livekit.agents.inference.VAD()`;
                None disables endpointing (utterances then end only on flush or the length limit).
            endpointing_ms: silence that ends an utterance (FINAL follows); 0 disables endpointing.
            max_utterance_sec: longer utterances are cut between words and continued (no word lost).
            carry_context: give each utterance the previous final as context (last
                `carry_context_chars` characters).
            engine: an already started engine to share (else the process-wide vLLM engine).
            engine_options: start-up options of the process-wide engine.
            max_streams: open streams allowed at once; `stream()` beyond it raises
                TooManyStreamsError (None: no limit). A stream counts until it is closed or its
                input has ended and its last event was delivered.
            base_url: a vLLM OpenAI-compatible server (`scripts/serve.sh`, `vllm serve`) to run the
                steps on instead of an in-process engine (env QWEN_ASR_BASE_URL); needs no torch/vLLM.
                Several servers: a list or a comma-separated string (each stream keeps one; see
                docs/deployment.md).
            api_key: that server's API key (env QWEN_ASR_API_KEY).
        """
        super().__init__(
            capabilities=stt.STTCapabilities(
                streaming=True,
                interim_results=interim_results,
                aligned_transcript=False,
                offline_recognize=True,
                keyterms=True,
                chat_context=True,  # the agent's last reply becomes recognition context (docs/usage.md)
                manual_flush=True,
            )
        )
        self._opts = STTOptions(
            language=language,
            context=context,
            keyterms=as_keyterms(keyterms),
            interim_results=interim_results,
            chunk_size_sec=chunk_size_sec,
            unfixed_chunk_num=unfixed_chunk_num,
            unfixed_token_num=unfixed_token_num,
            max_new_tokens=max_new_tokens,
            endpointing_ms=endpointing_ms,
            max_utterance_sec=max_utterance_sec,
            carry_context=carry_context,
            carry_context_chars=carry_context_chars,
        )
        # One endpointing owner per setup: an explicit `vad` (or None) is used as given; by default the
        # plugin runs the bundled VAD itself, except inside an AgentSession that ends turns on its own
        # VAD / turn detector (it then flushes our stream): see `stream()`.
        self._vad_given = is_given(vad)
        self._vad: lk_vad.VAD | None = vad if is_given(vad) else None
        self._reply_context = ""
        self._engine = engine
        self._engine_options = engine_options or EngineOptions(model=model)
        if base_url and engine is not None:
            raise InvalidOptionError("pass engine= or base_url=, not both")
        urls = base_url or os.environ.get("QWEN_ASR_BASE_URL") or None
        self._base_url = parse_base_urls(urls) if urls and engine is None else None
        self._owns_engine = False
        self._api_key = api_key or os.environ.get("QWEN_ASR_API_KEY") or None
        self._engine_lock = asyncio.Lock()
        self._session_keyterms: tuple[str, ...] = ()
        self._streams: weakref.WeakSet[SpeechStream] = weakref.WeakSet()
        if max_streams is not None and (not isinstance(max_streams, int) or max_streams < 1):
            raise InvalidOptionError(f"max_streams must be None or an int >= 1, got {max_streams!r}")
        self._max_streams = max_streams
        self._open: set[SpeechStream] = set()

    @property
    def model(self) -> str:
        return self._engine.model_name if self._engine is not None else self._engine_options.model

    @property
    def provider(self) -> str:
        return "Qwen3-ASR (vLLM)"

    @property
    def options(self) -> STTOptions:
        return self._opts

    @property
    def engine(self) -> ASREngine | None:
        return self._engine

    @property
    def vad(self) -> lk_vad.VAD | None:
        """The VAD this STT's own endpointing uses (the bundled silero one is loaded on first use)."""
        if not self._vad_given and self._vad is None and self._opts.endpointing_ms > 0:
            from livekit.agents import inference

            self._vad = inference.VAD()
        return self._vad

    def _stream_vad(self) -> lk_vad.VAD | None:
        if not self._vad_given and session_ends_turns():
            return None  # the session's VAD / turn detector owns endpointing and flushes us
        return self.vad

    def _effective_opts(self, language: NotGivenOr[str | None] = NOT_GIVEN) -> STTOptions:
        """The user's options with the session's keyterms merged in (and a per-call language)."""
        changes: dict[str, object] = {}
        if self._session_keyterms:
            changes["keyterms"] = tuple(dict.fromkeys(self._opts.keyterms + self._session_keyterms))
        if is_given(language):
            changes["language"] = language
        return dataclasses.replace(self._opts, **changes) if changes else self._opts  # type: ignore[arg-type]

    async def ensure_engine(self) -> ASREngine:
        """The engine, starting the process-wide one on first use (30-60 s on CPU)."""
        async with self._engine_lock:
            if self._engine is None:
                try:
                    if self._base_url:
                        from .remote import VLLMServerEngine

                        self._engine = await VLLMServerEngine.start(self._base_url, api_key=self._api_key)
                        self._owns_engine = True
                    else:
                        self._engine = await get_shared_engine(self._engine_options)
                except RequestRejectedError as e:  # e.g. 401: a wrong API key; a retry cannot help
                    raise APIStatusError(
                        f"Qwen3-ASR engine refused: {e}", status_code=e.status_code, retryable=False
                    ) from e
                except EngineError as e:
                    msg = f"Qwen3-ASR engine unavailable: {e}"
                    raise APIConnectionError(msg, retryable=e.retryable) from e
        return self._engine

    def prewarm(self) -> None:
        """Start loading the engine in the background (call from a running event loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self.ensure_engine())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failure resurfaces on use

    def stream(
        self,
        *,
        language: NotGivenOr[str | None] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> SpeechStream:
        if self._max_streams is not None and len(self._open) >= self._max_streams:
            raise TooManyStreamsError(
                f"{len(self._open)} streams are open (max_streams={self._max_streams}): close one first"
            )
        opts = self._effective_opts(language)
        s = SpeechStream(stt=self, opts=opts, conn_options=conn_options, vad=self._stream_vad())
        if self._reply_context:
            s.set_reply_context(self._reply_context)
        self._streams.add(s)
        self._open.add(s)
        load.stream_opened()  # the worker's load (load.worker_load_fnc) counts it until it ends
        s._task.add_done_callback(lambda _: (self._open.discard(s), load.stream_closed()))
        return s

    @property
    def open_streams(self) -> int:
        """Streams of this STT still running (what `max_streams` counts)."""
        return len(self._open)

    def update_options(
        self,
        *,
        language: NotGivenOr[str | None] = NOT_GIVEN,
        context: NotGivenOr[str] = NOT_GIVEN,
        keyterms: NotGivenOr[list[str] | tuple[str, ...]] = NOT_GIVEN,
        interim_results: NotGivenOr[bool] = NOT_GIVEN,
        chunk_size_sec: NotGivenOr[float] = NOT_GIVEN,
        unfixed_chunk_num: NotGivenOr[int] = NOT_GIVEN,
        unfixed_token_num: NotGivenOr[int] = NOT_GIVEN,
        max_new_tokens: NotGivenOr[int] = NOT_GIVEN,
        endpointing_ms: NotGivenOr[int] = NOT_GIVEN,
        max_utterance_sec: NotGivenOr[float] = NOT_GIVEN,
        carry_context: NotGivenOr[bool] = NOT_GIVEN,
        carry_context_chars: NotGivenOr[int] = NOT_GIVEN,
    ) -> None:
        """Change options for new and live streams (live streams apply them at the next utterance)."""
        changes = {k: v for k, v in locals().items() if k != "self" and is_given(v)}
        if "keyterms" in changes:
            changes["keyterms"] = as_keyterms(changes["keyterms"])
        self._opts = dataclasses.replace(self._opts, **changes)  # validates
        if "keyterms" in changes:
            changes["keyterms"] = self._effective_opts().keyterms
        for s in self._streams:
            s.update_options(**changes)

    def _update_session_keyterms(self, keyterms: list[str]) -> None:
        """AgentSession's keyterms (set before it opens a stream, and on changes): merged with the
        user's for new and live streams."""
        terms = as_keyterms(keyterms)
        dataclasses.replace(self._opts, keyterms=terms)  # validates them before they reach a stream
        self._session_keyterms = terms
        merged = self._effective_opts().keyterms
        for s in self._streams:
            s.update_options(keyterms=merged)

    def _push_conversation_item(self, ev: object) -> None:
        """AgentSession's conversation items (we declare `chat_context`): the agent's latest reply
        becomes recognition context for the next utterances (what the user answers usually echoes it)."""
        text = conversation_reply_text(ev)
        if text is None:
            return
        self._reply_context = sanitize_user_text(text)[-self._opts.carry_context_chars :].strip()
        for s in self._streams:
            s.set_reply_context(self._reply_context)

    async def _recognize_impl(
        self,
        buffer: AudioBuffer,
        *,
        language: NotGivenOr[str | None] = NOT_GIVEN,
        conn_options: APIConnectOptions,
    ) -> stt.SpeechEvent:
        """Offline: one pass over the whole buffer (the official non-streaming prompt, no prefix)."""
        opts = self._effective_opts(language)
        audio = frames_to_16k_mono(buffer)
        engine = await self.ensure_engine()
        t = StreamingTranscriber(opts.streaming_config(), engine.codec, engine.base_prompt)
        t.push_audio(audio)
        plan = t.finish_step()
        request_id = _new_id("RQ")
        if plan is not None:
            # one pass over a long buffer can outlast a streaming step's timeout: allow 1 s per audio second
            timeout = max(conn_options.timeout, plan.audio_seconds)
            # a single pass has nothing to reuse: one raw item, no per-stream feature cache
            try:
                result = await _run_step(engine, plan, opts, request_id, timeout, reuse_windows=False)
            finally:
                engine.release_stream(request_id)  # a remote engine pinned a server to it
            t.apply(plan, result.text)
            confidence = step_confidence(result)
        else:
            confidence = 0.0
        hyp = t.finalize()
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=request_id,
            alternatives=[_speech_data(hyp, opts, 0.0, engine.is_synthetic, confidence=confidence)],
        )

    async def aclose(self) -> None:
        for s in list(self._streams):
            await s.aclose()
        if self._owns_engine and self._engine is not None:  # a server connection it opened itself
            async with self._engine_lock:
                engine, self._engine = self._engine, None
                await engine.aclose()  # type: ignore[attr-defined]


async def _run_step(
    engine: ASREngine,
    plan: StepPlan,
    opts: STTOptions,
    stream_id: str,
    timeout: float,
    reuse_windows: bool = True,
) -> StepResult:
    """One engine step with LiveKit error mapping, so the framework's retry logic applies."""
    budget = step_token_budget(plan, opts.max_new_tokens)
    request = StepRequest(
        plan.prompt, plan.audio, budget, stream_id, reuse_windows=reuse_windows, draft=plan.draft
    )
    # `timeout` is for a step on an otherwise idle engine. Steps in flight share the engine (one
    # batch), so a step that starts beside k others may take (k + 1) x as long: under load, steps
    # slow down instead of timing out and being retried (a retry redoes the work: load grows).
    sharing = 1 + max(0, engine.stats.in_flight)
    limit = timeout * sharing
    try:
        async with asyncio.timeout(limit):
            return await engine.step(request)
    except TimeoutError as e:
        raise APITimeoutError(
            f"Qwen3-ASR step exceeded {limit:.1f} s ({sharing} step(s) sharing the engine)"
        ) from e
    except RequestRejectedError as e:
        raise APIStatusError(str(e), status_code=e.status_code, retryable=False) from e
    except EngineError as e:
        raise APIConnectionError(str(e), retryable=e.retryable) from e


async def _until_ready(engine: ASREngine) -> None:
    hook = getattr(engine, "until_ready", None)
    if hook is None:
        return
    try:
        await hook()
    except EngineError as e:
        raise APIConnectionError(str(e), retryable=e.retryable) from e


def _speech_data(
    hyp: Hypothesis,
    opts: STTOptions,
    start_time: float,
    synthetic: bool,
    text: str | None = None,
    confidence: float = 0.0,
):
    lang = hyp.language or opts.language or ""
    return stt.SpeechData(
        language=language_code(lang) or lang,
        text=hyp.text if text is None else text,
        start_time=start_time,
        end_time=start_time + hyp.audio_seconds,
        confidence=confidence,
        metadata={"stable_text": hyp.stable_text, "synthetic_model": synthetic, "note": SYNTHETIC_LABEL}
        if synthetic
        else {"stable_text": hyp.stable_text},
    )


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass
class _Utterance:
    request_id: str
    start_sample: int  # stream-level 16 kHz sample where this utterance's audio starts
    speaking: bool = False
    last_interim: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    confidence: float = 0.0  # of the step that produced the latest text (step_confidence)
    last_preflight: str = ""
    pausing: bool = False  # the endpointer is in a silence run: the turn may be ending
    last_hyp: Hypothesis | None = None


@dataclass(frozen=True)
class _InputError:
    """A bad frame pushed inside an AgentSession: the run loop raises it (retryable) when it gets here."""

    error: InvalidAudioError


class SpeechStream(stt.RecognizeStream):
    """One audio track. Frames of any rate/channel count in; events out.

    Frames are downmixed and resampled to 16 kHz mono in `push_frame` (the base class never downmixes).
    A `Segmenter` routes the audio into utterances: with a VAD, only speech reaches the model and
    `endpointing_ms` of silence ends an utterance; `flush()` / `end_input()` end one explicitly; an
    utterance reaching `max_utterance_sec` is cut between words and continued. Within an utterance a
    step runs whenever a whole chunk is pending; a step still running when the next chunk is due makes
    the next step cover all audio that arrived meanwhile. Each utterance ends with its finish step,
    FINAL_TRANSCRIPT, END_OF_SPEECH and RECOGNITION_USAGE. Stream state lives on the object, so the
    framework's retry of `_run` loses no audio.
    """

    def __init__(
        self,
        *,
        stt: STT,
        opts: STTOptions,
        conn_options: APIConnectOptions,
        vad: lk_vad.VAD | None = None,
    ) -> None:
        super().__init__(stt=stt, conn_options=conn_options)
        self._stt_ref = stt
        self._vad = vad
        self._in_session = session_ends_turns() is not None
        self._reply_context = ""
        self._opts = opts
        self._next_opts: STTOptions | None = None
        self._stream_id = _new_id("QS")
        self._normalizer = AudioNormalizer()
        self._segmenter = Segmenter(opts.endpointing_config(), use_vad=vad is not None)
        self._vad_stream: lk_vad.VADStream | None = None
        self._vad_drained = asyncio.Event()
        self._vad_progress = asyncio.Condition()
        self._transcriber: StreamingTranscriber | None = None
        self._engine: ASREngine | None = None
        self._utt = _Utterance(_new_id("SG"), 0)
        self._pending_finish: Finish | None = None  # a finish that must complete (redone on retry)
        self._carry_context = ""
        self._route_lock = asyncio.Lock()
        self._step_lock = asyncio.Lock()
        self._audio_ready = asyncio.Event()
        self._user_offset = 0.0

    # The base class adds the duration of failed runs to `_start_time_offset` (for providers whose
    # clock restarts per connection). Our clock is the audio itself and never restarts, so times are
    # audio position + the offset the user set.
    @property
    def start_time_offset(self) -> float:
        return self._user_offset

    @start_time_offset.setter
    def start_time_offset(self, value: float) -> None:
        if value < 0:
            raise ValueError("start_time_offset must be non-negative")
        self._user_offset = value

    @property
    def stream_id(self) -> str:
        return self._stream_id

    @property
    def uses_own_vad(self) -> bool:
        """Whether this stream's own VAD ends utterances (False: only flushes and the length limit)."""
        return self._segmenter.use_vad

    def set_reply_context(self, text: str) -> None:
        """The agent's last reply, used as context from the next utterance on."""
        self._reply_context = text
        if self._transcriber is not None and self._idle():
            self._apply_next_opts()

    def update_options(self, **changes: object) -> None:
        base = self._next_opts or self._opts
        self._next_opts = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
        if self._transcriber is not None and self._idle():
            self._apply_next_opts()

    def _idle(self) -> bool:
        t = self._transcriber
        return t is None or (t.utterance_samples == 0 and t.pending_samples == 0)

    def _apply_next_opts(self) -> None:
        if self._next_opts is not None:
            self._opts, self._next_opts = self._next_opts, None
            self._segmenter.config = self._segmenter.endpointer.config = self._opts.endpointing_config()
        if self._transcriber is not None:
            config = self._opts.streaming_config()
            extra = [c for c in (self._reply_context, self._carry_context) if c]
            if extra:
                context = "\n".join([config.context, *extra] if config.context else extra)
                config = dataclasses.replace(config, context=context)
            self._transcriber.configure(config)

    # -- input -----------------------------------------------------------------------------------
    def push_frame(self, frame: rtc.AudioFrame) -> None:
        """Queue audio of any sample rate and channel count (converted to 16 kHz mono here).

        Raises InvalidAudioError for a frame with a non-positive rate or channel count or a data size
        that does not match its header. A rate change mid-stream is handled (resampler restarted).
        """
        self._check_input_not_ended()
        self._check_not_closed()
        try:
            if not isinstance(frame, rtc.AudioFrame):
                raise InvalidAudioError(f"push_frame expects rtc.AudioFrame, got {type(frame).__name__}")
            samples = self._normalizer.push(frame)
        except InvalidAudioError as e:
            if not self._in_session:
                raise
            # The session's audio forwarder would die on this exception and leave the stream deaf:
            # drop the frame and fail the current run with a retryable error instead (reported as an
            # `error` event; the framework re-runs the stream with all its other audio).
            logger.warning("dropped an invalid audio frame: %s", e.message, extra={"stream": self._stream_id})
            self._input_ch.send_nowait(_InputError(InvalidAudioError(e.message, retryable=True)))  # type: ignore[arg-type]
            return
        if samples.size:
            self._input_ch.send_nowait(samples)  # type: ignore[arg-type]

    def flush(self) -> None:
        """End the current utterance: its final transcript follows; later audio starts a new one."""
        self._check_input_not_ended()
        self._check_not_closed()
        tail = self._normalizer.flush()
        if tail.size:
            self._input_ch.send_nowait(tail)  # type: ignore[arg-type]
        self._input_ch.send_nowait(self._FlushSentinel())

    async def aclose(self) -> None:
        await super().aclose()
        if self._vad_stream is not None:
            await self._vad_stream.aclose()
        if self._engine is not None:
            try:
                self._engine.release_stream(self._stream_id)
            except Exception:  # e.g. an engine that failed to start: nothing was cached
                logger.debug("release_stream failed", exc_info=True)

    # -- run loop --------------------------------------------------------------------------------
    async def _run(self) -> None:
        engine = await self._stt_ref.ensure_engine()
        await _until_ready(engine)  # a retry after the engine died resumes once it is back
        self._engine = engine
        if self._transcriber is None:
            self._apply_next_opts()
            self._transcriber = StreamingTranscriber(
                self._opts.streaming_config(), engine.codec, engine.base_prompt
            )
            self._apply_next_opts()  # context that arrived before the stream ran (the agent's reply)
            if self._segmenter.use_vad and self._vad is not None:
                self._vad_stream = self._vad.stream()
        if self._pending_finish is not None:  # a retry after a failed finish step
            async with self._route_lock:
                await self._finish_utterance(self._pending_finish)
        self._audio_ready.set()  # audio buffered before a retry is stepped at once
        tasks = [
            asyncio.create_task(self._read_input(), name="qwen_asr.read_input"),
            asyncio.create_task(self._step_loop(), name="qwen_asr.step_loop"),
        ]
        if self._vad_stream is not None:
            tasks.append(asyncio.create_task(self._vad_loop(), name="qwen_asr.vad_loop"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            await utils.aio.cancel_and_wait(*tasks)

    async def _read_input(self) -> None:
        async for item in self._input_ch:
            if isinstance(item, _InputError):
                raise item.error
            if isinstance(item, self._FlushSentinel):
                await self._wait_vad_judged(self._segmenter.timeline.end)
                async with self._route_lock:
                    await self._execute(self._segmenter.on_flush())
            else:
                # a huge frame (e.g. minutes of audio in one push) goes through in short pieces, so the
                # length limit cuts it like streamed audio instead of after one oversized push
                for start in range(0, len(item), MAX_PIECE):  # type: ignore[arg-type]
                    piece = item[start : start + MAX_PIECE]  # type: ignore[index]
                    if self._vad_stream is not None:
                        frame = rtc.AudioFrame(piece.tobytes(), SAMPLE_RATE, 1, len(piece))
                        self._vad_stream.push_frame(frame)
                    async with self._route_lock:
                        await self._execute(self._segmenter.on_audio(piece))
        # end of input: let the VAD judge every sample, then end the last utterance
        if self._vad_stream is not None:
            self._vad_stream.end_input()
            await self._vad_drained.wait()
        async with self._route_lock:
            await self._execute(self._segmenter.on_flush())

    async def _vad_loop(self) -> None:
        assert self._vad_stream is not None
        async for ev in self._vad_stream:
            if ev.type == lk_vad.VADEventType.INFERENCE_DONE:
                async with self._route_lock:
                    await self._execute(self._segmenter.on_vad(ev.samples_index, ev.probability))
                async with self._vad_progress:
                    self._vad_progress.notify_all()
        self._vad_drained.set()
        async with self._vad_progress:
            self._vad_progress.notify_all()

    async def _wait_vad_judged(self, position: int) -> None:
        """Wait until the VAD has judged every whole window before `position` (it runs behind the
        audio), so a flush applies to exactly the audio pushed before it."""
        if self._vad_stream is None:
            return
        target = position - position % VAD_WINDOW
        async with self._vad_progress:
            await self._vad_progress.wait_for(
                lambda: self._segmenter.endpointer.position >= target or self._vad_drained.is_set()
            )

    async def _execute(self, actions: list[Action]) -> None:
        """Carry out the segmenter's decisions in order (caller holds the route lock)."""
        t = self._transcriber
        assert t is not None
        for action in actions:
            if isinstance(action, Push):
                t.push_audio(action.samples)
                self._audio_ready.set()
                cut = self._segmenter.cut_due(t.utterance_samples)
                if cut is not None:
                    await self._finish_utterance(cut)
            elif isinstance(action, Start):
                self._utt = _Utterance(_new_id("SG"), action.sample)
                self._ensure_speaking()
            elif isinstance(action, Pause):
                self._utt.pausing = True
                self._preflight(self._utt.last_hyp)
            elif isinstance(action, Resume):
                self._utt.pausing = False
            else:
                await self._finish_utterance(action)

    async def _step_loop(self) -> None:
        t = self._transcriber
        assert t is not None
        while True:
            await self._audio_ready.wait()
            self._audio_ready.clear()
            while t.step_ready():
                async with self._step_lock:
                    plan = t.next_step(max_chunks=None)  # coalesce if we fell behind
                    if plan is None:
                        break
                    result = await self._step(plan)
                    self._emit_step(t.apply(plan, result.text))

    async def _step(self, plan: StepPlan) -> StepResult:
        assert self._engine is not None
        result = await _run_step(self._engine, plan, self._opts, self._stream_id, self._conn_options.timeout)
        self._utt.prompt_tokens += result.prompt_tokens
        self._utt.generated_tokens += result.generated_tokens
        self._utt.confidence = step_confidence(result)
        return result

    async def _finish_utterance(self, finish: Finish) -> None:
        """Finish step (up to `finish.sample`), FINAL + END_OF_SPEECH + usage, then a fresh utterance."""
        t = self._transcriber
        assert t is not None
        self._pending_finish = finish
        async with self._step_lock:
            utt = self._utt
            if finish.reason != "max_length":
                # the turn ends here (flush / endpoint): preflight the newest text, after any step that
                # was in flight, so no interim follows it before the final
                self._preflight(utt.last_hyp)
            plan = t.finish_step(finish.sample - utt.start_sample)
            if plan is not None:
                result = await self._step(plan)
                t.apply(plan, result.text)
            final = t.finalize()
            if final.text or utt.speaking:
                self._ensure_speaking()
                self._send(stt.SpeechEventType.FINAL_TRANSCRIPT, final)
                self._send(stt.SpeechEventType.END_OF_SPEECH)
            audio_s = t.utterance_samples / SAMPLE_RATE
            if audio_s > 0:
                usage = stt.RecognitionUsage(
                    audio_duration=audio_s, input_tokens=utt.prompt_tokens, output_tokens=utt.generated_tokens
                )
                self._event_ch.send_nowait(
                    stt.SpeechEvent(
                        type=stt.SpeechEventType.RECOGNITION_USAGE,
                        request_id=utt.request_id,
                        recognition_usage=usage,
                    )
                )
            t.reset()  # audio after a forced cut stays pending: it opens the next utterance
            self._engine.release_stream(self._stream_id)  # the utterance's feature cache
            self._utt = _Utterance(_new_id("SG"), finish.sample)
            if finish.reason == "max_length":
                self._ensure_speaking()  # speech goes on without a pause
            if self._opts.carry_context and final.text:
                self._carry_context = sanitize_user_text(final.text)[
                    -self._opts.carry_context_chars :
                ].strip()
            self._pending_finish = None
            self._apply_next_opts()
            logger.debug(
                "utterance finished",
                extra={"stream": self._stream_id, "reason": finish.reason, "audio_s": round(audio_s, 2)},
            )

    # -- events ----------------------------------------------------------------------------------
    def _ensure_speaking(self) -> None:
        if not self._utt.speaking:
            self._utt.speaking = True
            self._event_ch.send_nowait(
                stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH, request_id=self._utt.request_id)
            )

    def _emit_step(self, hyp: Hypothesis) -> None:
        utt = self._utt
        utt.last_hyp = hyp
        if hyp.text:
            self._ensure_speaking()
        if self._opts.interim_results and hyp.text and hyp.text != utt.last_interim:
            utt.last_interim = hyp.text
            self._send(stt.SpeechEventType.INTERIM_TRANSCRIPT, hyp)
        if utt.pausing:
            self._preflight(hyp)  # still in the pause: the new text is the turn's likely end

    def _preflight(self, hyp: Hypothesis | None) -> None:
        """PREFLIGHT_TRANSCRIPT = "the turn is likely ending with this text": the full current text,
        sent when the endpointer sees a silence begin (`pause_ms`, shorter than `endpointing_ms`), after
        each step that changes the text during such a pause, and when the utterance ends (a flush or
        the endpoint) just before its finish step, unless that text was already preflighted. In
        livekit-agents it starts a preemptive LLM reply that a later, different interim cancels, so it
        is never sent mid-speech; the reply is used when the final equals it."""
        utt = self._utt
        if hyp is None or not hyp.text or hyp.text == utt.last_preflight:
            return
        utt.last_preflight = hyp.text
        self._send(stt.SpeechEventType.PREFLIGHT_TRANSCRIPT, hyp)

    def _send(
        self, kind: stt.SpeechEventType, hyp: Hypothesis | None = None, text: str | None = None
    ) -> None:
        alts = []
        if hyp is not None:
            start = self._utt.start_sample / SAMPLE_RATE + self.start_time_offset
            synthetic = bool(self._engine is not None and self._engine.is_synthetic)
            alts = [_speech_data(hyp, self._opts, start, synthetic, text, self._utt.confidence)]
        self._event_ch.send_nowait(
            stt.SpeechEvent(type=kind, request_id=self._utt.request_id, alternatives=alts)
        )
