"""Inference engines behind a small protocol: one step = (prompt, utterance audio) -> generated text.

`VLLMEngine` wraps an in-process vLLM `AsyncLLM`; every stream of the process shares one engine, and
concurrent steps from many streams reach vLLM at once, where continuous batching runs them together.
A remote vLLM server can replace it later by implementing `ASREngine`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from . import spec_decode
from .allocator import allocator_advice
from .cpu_features import bf16_matrix_hardware, cpu_flags
from .errors import (
    EngineError,
    EngineUnavailableError,
    InvalidOptionError,
    RequestRejectedError,
)
from .features import (
    CONV_FRAMES,
    HOP,
    N_FFT,
    TOKENS_PER_WINDOW,
    WINDOW_FRAMES,
    FeatureCache,
    reencoded_seconds,
    self_check,
)
from .log import logger
from .prompt import AUDIO_PLACEHOLDER, chatml_base_prompt
from .streaming import SAMPLE_RATE, TokenCodec

DEFAULT_MODEL = "Qwen/Qwen3-ASR-0.6B"
# KV block on CPU: smaller than vLLM's CPU default (128) so that the prefix cache serves more of each
# step's prompt: a quarter fewer prefill tokens, the same step time on 2 cores, identical outputs in
# float32 (bench/cpu_knobs.py, docs/performance.md); on faster hardware prefill weighs more
CPU_KV_BLOCK_TOKENS = 32
# Speculative decoding's draft tokens per pass on CPU by default: measured faster there, paired with it
# off (docs/performance.md, "CPU settings"); on GPU it stays off until measured.
CPU_SPECULATIVE_TOKENS = 8


@dataclass(frozen=True)
class StepRequest:
    prompt: str
    audio: np.ndarray  # float32, 16 kHz mono: the whole utterance so far
    max_tokens: int
    stream_id: str = ""  # keys per-stream caches (see ASREngine.release_stream); "" = none
    # False sends the audio as one raw item, exactly as the official SDK loop does (the benchmark's
    # baseline); True lets an engine that supports it reuse completed encoder windows (exact).
    reuse_windows: bool = True
    # Text the step will most likely generate first (StepPlan.draft): an engine with speculative
    # decoding verifies it instead of decoding it token by token. Never changes the output.
    draft: str = ""


@dataclass(frozen=True)
class StepResult:
    text: str
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    audio_seconds: float
    started_at: float  # time.monotonic()
    finished_at: float
    audio_items: int = 1
    # audio seconds whose audio tokens were not all served from the prefix cache, i.e. that the audio
    # encoder had to produce (an upper bound: vLLM's encoder cache may still have some of them)
    encoded_seconds: float = 0.0
    # natural-log probability of each generated token (the sampled one, from the model's raw logits),
    # in generation order: one per generated token, each <= 0. Empty when the engine has none (test
    # doubles, other engines). The stt layer turns them into SpeechData.confidence.
    token_logprobs: tuple[float, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()  # the prompt as the engine tokenized it

    @property
    def wall_s(self) -> float:
        return self.finished_at - self.started_at


@dataclass
class EngineStats:
    """Counters for observability and tests (e.g. proving steps of different streams overlapped)."""

    steps: int = 0
    failed_steps: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    audio_seconds: float = 0.0
    encoded_seconds: float = 0.0
    # (stream_id, started_at, finished_at) of recent steps, oldest first
    recent: collections.deque[tuple[str, float, float]] = field(
        default_factory=lambda: collections.deque(maxlen=4096)
    )

    def record(self, stream_id: str, result: StepResult) -> None:
        """Count a finished step."""
        self.steps += 1
        self.prompt_tokens += result.prompt_tokens
        self.cached_tokens += result.cached_tokens
        self.generated_tokens += result.generated_tokens
        self.audio_seconds += result.audio_seconds
        self.encoded_seconds += result.encoded_seconds
        self.recent.append((stream_id, result.started_at, result.finished_at))

    def overlapping_pairs(self) -> int:
        """How many pairs of recent steps from *different* streams ran at the same time."""
        steps = sorted(self.recent, key=lambda s: s[1])
        pairs = 0
        for i, (sid, _start, end) in enumerate(steps):
            for sid2, start2, _end2 in steps[i + 1 :]:
                if start2 >= end:
                    break
                pairs += sid2 != sid
        return pairs


@runtime_checkable
class ASREngine(Protocol):
    """What streams need from an engine. Implementations must allow many concurrent `step` calls."""

    @property
    def model_name(self) -> str: ...

    @property
    def codec(self) -> TokenCodec: ...

    @property
    def stats(self) -> EngineStats: ...

    @property
    def is_synthetic(self) -> bool: ...

    def base_prompt(self, context: str) -> str: ...

    async def step(self, request: StepRequest) -> StepResult: ...

    def release_stream(self, stream_id: str) -> None:
        """Drop what the engine keeps for a stream between steps (called when an utterance ends)."""
        ...

    async def aclose(self) -> None: ...


class EngineProxy:
    """Base for engines that wrap another one (instrumentation, a thread hop, a remote hop): every
    protocol member delegates to `inner`. Closing a proxy leaves the wrapped engine to its owner."""

    inner: ASREngine

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def codec(self) -> TokenCodec:
        return self.inner.codec

    @property
    def stats(self) -> EngineStats:
        return self.inner.stats

    @property
    def is_synthetic(self) -> bool:
        return self.inner.is_synthetic

    def base_prompt(self, context: str) -> str:
        return self.inner.base_prompt(context)

    async def step(self, request: StepRequest) -> StepResult:
        return await self.inner.step(request)

    async def until_ready(self) -> None:
        """Optional hook: wait until the engine can take steps (e.g. while a dead one restarts)."""
        hook = getattr(self.inner, "until_ready", None)
        if hook is not None:
            await hook()

    def release_stream(self, stream_id: str) -> None:
        try:
            inner = self.inner
        except Exception:  # e.g. an engine still loading or failed to start: it holds nothing
            return
        inner.release_stream(stream_id)

    async def aclose(self) -> None:
        pass


@dataclass(frozen=True)
class EngineOptions:
    """Start-up options. `None` means: the platform default noted beside it."""

    model: str = DEFAULT_MODEL  # HF id or local checkpoint directory
    # "auto": the checkpoint's (bf16 for Qwen3-ASR), except float32 on a CPU without bf16 matrix
    # hardware (engine_dtype)
    dtype: str = "auto"
    max_model_len: int = 8192  # prompt + generated tokens; 13 audio tokens per second
    kv_cache_gib: float | None = None  # CPU: 2 GiB; GPU: vLLM's gpu_memory_utilization rule
    # GPU only (CUDA): the fraction of the *whole* GPU's memory this engine process may take (weights,
    # activations, CUDA graphs, KV cache). vLLM's own default (0.9) lets one engine take the GPU, so a
    # second LiveKit job process (each job process loads its own engine) fails to start. Qwen3-ASR-0.6B
    # needs ~1.6 GiB of bf16 weights plus ~1-2 GiB of activations/graphs; 0.3 leaves ~2-4 GiB of KV
    # cache on a 16-24 GiB GPU (~20-35 k tokens: 40+ concurrent 30 s utterances at 13 tokens/s) and
    # lets 3 engine processes share one GPU (3 x 0.3 = 0.9). Use ~0.9 for one engine per GPU, or
    # kv_cache_gib for an absolute KV size.
    gpu_memory_utilization: float = 0.3
    max_num_seqs: int | None = None  # concurrent sequences per batch; vLLM default
    cpu_threads: str | None = None  # CPU only: cores for OMP, e.g. "0-1"; default all cores
    # KV cache block, in tokens (a multiple of 16). The prefix cache reuses whole blocks only, so
    # smaller blocks serve more of each step's prompt from the cache. None: CPU_KV_BLOCK_TOKENS on
    # CPU (32, not vLLM's CPU default of 128), vLLM's default on GPU.
    kv_block_tokens: int | None = None
    enforce_eager: bool | None = None  # default True on CPU (fast start), False on GPU
    enable_prefix_caching: bool = True
    # Exact reuse of completed 8 s encoder windows across steps (features.py); needs prefix caching.
    reuse_windows: bool = True
    # vLLM's multimodal processor cache in the EngineCore process (LRU, GiB). Every step sends a new
    # open-window item (~0.1-0.4 MiB) and the cache keeps each one until full: vLLM's default 4 GiB
    # makes the EngineCore grow for hours before it levels off. 0.25 GiB still holds the reused
    # windows of ~100 concurrent 30 s utterances; items it drops are re-sent, results are unchanged.
    mm_cache_gib: float = 0.25
    # The process-wide engine (get_shared_engine) is restarted this many times when it dies.
    max_restarts: int = 1
    # Speculative decoding with the stream's previous hypothesis as the draft (spec_decode.py): up to
    # this many draft tokens verified per forward pass; 0 turns it off. Greedy outputs are unchanged
    # (float32). None: CPU_SPECULATIVE_TOKENS on CPU, where it is measured faster; off on GPU.
    speculative_tokens: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # more AsyncEngineArgs, as (name, value) pairs

    def __post_init__(self) -> None:
        if not self.model or not isinstance(self.model, str):
            raise InvalidOptionError("model must be a non-empty HF id or path")
        if self.max_model_len < 256:
            raise InvalidOptionError(f"max_model_len must be >= 256, got {self.max_model_len}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise InvalidOptionError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        cache = self.mm_cache_gib
        if isinstance(cache, bool) or not isinstance(cache, int | float) or not cache >= 0:  # NaN too
            raise InvalidOptionError(f"mm_cache_gib must be >= 0, got {self.mm_cache_gib}")
        if self.max_restarts < 0:
            raise InvalidOptionError(f"max_restarts must be >= 0, got {self.max_restarts}")
        spec = self.speculative_tokens
        if spec is not None and (isinstance(spec, bool) or not isinstance(spec, int) or not 0 <= spec <= 64):
            raise InvalidOptionError(f"speculative_tokens must be None or an int in [0, 64], got {spec!r}")
        block = self.kv_block_tokens
        if block is not None and (
            isinstance(block, bool) or not isinstance(block, int) or block < 16 or block % 16
        ):
            raise InvalidOptionError(f"kv_block_tokens must be a positive multiple of 16, got {block!r}")
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, int | float) or not 0 < util <= 1:  # NaN too
            raise InvalidOptionError(f"gpu_memory_utilization must be a fraction in (0, 1], got {util!r}")


class _HFCodec:
    """TokenCodec over a HF tokenizer, used exactly as the official SDK uses `processor.tokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken: treat as CPU
        return False


def _resolve_local_dir(model: str) -> Path | None:
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        return None


def _load_chat_template(model_dir: Path | None) -> str | None:
    if model_dir is None:
        return None
    f = model_dir / "chat_template.json"
    if f.is_file():
        return json.loads(f.read_text()).get("chat_template")
    f = model_dir / "chat_template.jinja"
    return f.read_text() if f.is_file() else None


def render_base_prompt(tokenizer: Any, template: str | None, context: str) -> str:
    """The official SDK's messages through the checkpoint's chat template (ChatML when it has none)."""
    if template is None:
        return chatml_base_prompt(context)
    messages = [
        {"role": "system", "content": context or ""},
        {"role": "user", "content": [{"type": "audio", "audio": ""}]},
    ]
    return tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )


def load_chat_template(model_dir: Path | None) -> str | None:
    return _load_chat_template(model_dir)


def _feature_cache(options: EngineOptions, model_dir: Path | None) -> FeatureCache | None:
    """Per-stream feature state for window reuse, with the checkpoint's own mel filters — only when
    the checkpoint is laid out as features.py assumes and our features are bit-identical here."""
    if not options.reuse_windows:
        return None
    from transformers import WhisperFeatureExtractor

    source = str(model_dir or options.model)
    try:
        fe = WhisperFeatureExtractor.from_pretrained(source)
        pre = json.loads(Path(source, "preprocessor_config.json").read_text()) if model_dir else {}
        config = json.loads(Path(source, "config.json").read_text()) if model_dir else {}
    except Exception as e:
        logger.warning("window reuse disabled: no feature extractor config", extra={"error": str(e)})
        return None
    audio_cfg = config.get("thinker_config", config).get("audio_config", {})
    why = None
    if pre.get("feature_extractor_type", "WhisperFeatureExtractor") != "WhisperFeatureExtractor":
        why = f"feature extractor {pre.get('feature_extractor_type')}"
    elif (fe.n_fft, fe.hop_length, fe.sampling_rate, fe.dither) != (N_FFT, HOP, SAMPLE_RATE, 0.0):
        why = "feature extractor settings differ from Qwen3-ASR's"
    elif (audio_cfg.get("n_window", 50), audio_cfg.get("n_window_infer", 800)) != (
        CONV_FRAMES // 2,
        WINDOW_FRAMES,
    ):
        why = "encoder windows differ from Qwen3-ASR's (n_window 50, n_window_infer 800)"
    else:
        why = self_check(fe.mel_filters, fe)
    if why is not None:
        logger.warning("window reuse disabled, sending raw audio", extra={"reason": why})
        return None
    return FeatureCache(fe.mel_filters)


def synthetic_marker(model_dir: Path | None) -> bool:
    if model_dir is None or not (model_dir / "config.json").is_file():
        return False
    try:
        return bool(json.loads((model_dir / "config.json").read_text()).get("synthetic"))
    except (OSError, ValueError):
        return False


class VLLMEngine:
    """Qwen3-ASR on an in-process vLLM `AsyncLLM`. Create with `await VLLMEngine.start(options)`."""

    # SamplingParams(logprobs=0): vLLM V1 returns the sampled token's logprob (StepResult.token_logprobs)
    _logprobs = True

    def __init__(
        self,
        llm: Any,
        options: EngineOptions,
        model_dir: Path | None,
        startup_s: float,
        passes: spec_decode.PassCounts,  # what the engine's vLLM stat logger adds to
    ) -> None:
        # blocking (tokenizer, chat template, feature extractor and its self-check): start() runs it
        # in a thread together with the AsyncLLM construction
        self._llm = llm
        self._options = options
        self._model_dir = model_dir
        self.startup_s = startup_s
        self._tokenizer = llm.get_tokenizer()
        self._codec = _HFCodec(self._tokenizer)
        self._template = _load_chat_template(model_dir)
        self._stats = EngineStats()
        self._passes = passes
        self._speculative = False
        self._closed = False
        self._core_log: _EngineCoreLog | None = None
        self._synthetic = synthetic_marker(model_dir)
        self._audio_start_id = self._tokenizer.convert_tokens_to_ids("<|audio_start|>")
        self._features = _feature_cache(options, model_dir)
        _warm_logprob_detokenizer(self._tokenizer)
        probe = self.base_prompt("")
        if probe.count(AUDIO_PLACEHOLDER) != 1:
            raise EngineUnavailableError(f"chat template renders no single audio placeholder: {probe!r}")

    @classmethod
    async def start(cls, options: EngineOptions | None = None) -> VLLMEngine:
        """Start vLLM without blocking the running loop: the blocking part (importing vLLM and torch,
        building the config, spawning the EngineCore and waiting for its model load, loading the
        tokenizer and feature extractor: 10-150 s) runs in a worker thread, so the streams, VADs and
        audio pushes this loop serves keep running (and a LiveKit job process keeps answering pings)."""
        options = options or EngineOptions()
        engine, cuda = await _off_loop(
            lambda: cls._build(options), lambda built: built[0]._close_in_background()
        )
        try:
            engine._bind_loop()
            if speculative_tokens(options, cuda=cuda):
                await engine._bind_proposer()
            if engine._features is not None:
                await engine._check_window_reuse()
        except BaseException:  # cancelled (or failed) during the probe: do not leak the EngineCore
            engine._close_in_background()
            raise
        engine._stats = EngineStats()  # the probe's steps are not the caller's
        logger.info(
            "engine ready",
            extra={"model": options.model, "startup_s": round(engine.startup_s, 1), "cuda": cuda},
        )
        return engine

    @classmethod
    def _build(cls, options: EngineOptions) -> tuple[VLLMEngine, bool]:
        """The blocking part of `start` (runs in a worker thread; touches no event loop)."""
        t0 = time.perf_counter()
        cuda = _cuda_available()
        if not cuda and (advice := allocator_advice()):
            logger.warning(advice)
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise EngineUnavailableError(
                "vLLM is not installed: `pip install livekit-qwen-asr[cpu]` (CPU) or `[gpu]`"
            ) from e
        from .vllm_compat import check_vllm

        check_vllm()  # UnsupportedVLLMError naming vllm.__version__ and each missing surface
        fields = getattr(AsyncEngineArgs, "__dataclass_fields__", {})
        reuse = options.reuse_windows and "enable_mm_embeds" in fields
        if options.reuse_windows and not reuse:
            logger.warning("window reuse disabled: this vLLM has no enable_mm_embeds")
        kwargs = _engine_kwargs(
            options, cuda=cuda, kv_env=bool(os.environ.get("VLLM_CPU_KVCACHE_SPACE")), mm_embeds=reuse
        )
        model_dir = _resolve_local_dir(options.model)
        core_log = _EngineCoreLog.create(kwargs, fields)
        try:
            if core_log is not None:
                kwargs["logging_config"] = core_log.config
            try:
                counts = spec_decode.PassCounts()
                # the binding is this engine's own: a later engine here may bind other cores;
                # starts take turns (the environment is process-wide)
                binding = {} if cuda else {OMP_BIND_ENV: omp_binding(options)}
                turns = contextlib.nullcontext() if cuda else _omp_env_lock
                with turns, scoped_environ(binding):
                    llm = AsyncLLM.from_engine_args(
                        AsyncEngineArgs(**kwargs), stat_loggers=[spec_decode.pass_counter_factory(counts)]
                    )
            except Exception as e:
                tail = core_log.tail() if core_log is not None else ""
                raise _map_start_error(e, options, cuda=cuda, child_log=tail) from e
            finally:
                if core_log is not None:
                    core_log.detach_from_this_process()
            try:
                engine = cls(llm, options, model_dir, time.perf_counter() - t0, counts)
            except BaseException:
                _shutdown_llm(llm)
                raise
        except BaseException:
            if core_log is not None:
                core_log.remove()
            raise
        engine._core_log = core_log
        if not reuse:
            engine._features = None
        return engine, cuda

    async def _bind_proposer(self) -> None:
        """Hand the draft proposer in each vLLM worker its model runner (spec_decode.py)."""
        bound = await self._llm.collective_rpc(spec_decode.BIND_METHOD)
        if not bound or not all(bound):
            raise EngineUnavailableError(
                "speculative_tokens: vLLM did not load the previous-text draft proposer "
                f"({spec_decode.PROPOSER}); start without it (speculative_tokens=0)"
            )
        self._speculative = True

    def _bind_loop(self) -> None:
        """Built in a thread, AsyncLLM found no running loop and deferred its output handler (and the
        EngineCore output-socket task) to the first request: start them on this loop now, as building
        it on the loop would have, so an EngineCore death before the first request is noticed."""
        run = getattr(self._llm, "_run_output_handler", None)
        if run is not None:
            run()

    def _close_in_background(self) -> None:
        """Shut down without awaiting (a cancelled or failed start): a daemon thread joins vLLM."""
        if self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        threading.Thread(target=self._shutdown, args=(llm,), name="qwen-asr-shutdown", daemon=True).start()

    def _shutdown(self, llm: Any) -> None:
        try:
            _shutdown_llm(llm)
        finally:
            if self._core_log is not None:
                self._core_log.remove()

    # -- protocol --------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._options.model

    @property
    def options(self) -> EngineOptions:
        return self._options

    @property
    def codec(self) -> TokenCodec:
        return self._codec

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_synthetic(self) -> bool:
        return self._synthetic

    def base_prompt(self, context: str) -> str:
        """The checkpoint's chat template applied to the official SDK's messages."""
        return render_base_prompt(self._tokenizer, self._template, context)

    async def step(self, request: StepRequest) -> StepResult:
        llm = self._llm
        if self._closed or llm is None:
            raise EngineUnavailableError("engine is closed")
        from vllm import SamplingParams

        audio = _checked_audio(request)
        draft = self._codec.encode(request.draft) if self._speculative and request.draft else None
        params = SamplingParams(
            temperature=0.0,
            max_tokens=max(1, int(request.max_tokens)),
            logprobs=0 if self._logprobs else None,  # 0: only the sampled token's; greedy unchanged
            extra_args={spec_decode.DRAFT_KEY: draft} if draft else None,
        )
        started = time.monotonic()  # our feature work counts, as vLLM's does in the raw path
        if self._features is not None and request.reuse_windows and audio.shape[0] >= N_FFT:
            # compute off the event loop: a long utterance's first step does a full STFT
            items = await asyncio.to_thread(self._features.items_for, request.stream_id, audio)
            pads = "<|audio_start|>" + "<|audio_pad|>" * len(items.sizes) + "<|audio_end|>"
            prompt = {
                "prompt": request.prompt.replace(AUDIO_PLACEHOLDER, pads, 1),
                "multi_modal_data": {"audio": items.as_mm_data()},
            }
            item_frames = items.sizes
        else:
            prompt = {"prompt": request.prompt, "multi_modal_data": {"audio": [(audio, SAMPLE_RATE)]}}
            item_frames = (audio.shape[0] // HOP,)
        st = self._stats
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        final = None
        try:
            async for out in llm.generate(
                prompt, params, request_id=f"{request.stream_id}-{uuid.uuid4().hex[:12]}"
            ):
                final = out
        except asyncio.CancelledError:
            raise
        except Exception as e:
            st.failed_steps += 1
            log = self._core_log
            raise _map_vllm_error(e, core_log=log.tail if log is not None else None) from e
        finally:
            st.in_flight -= 1
        finished = time.monotonic()
        if final is None or not final.outputs:
            st.failed_steps += 1
            raise EngineError("vLLM returned no output")
        comp = final.outputs[0]
        result = StepResult(
            text=comp.text,
            prompt_tokens=len(final.prompt_token_ids or ()),
            cached_tokens=int(final.num_cached_tokens or 0),
            generated_tokens=len(comp.token_ids),
            audio_seconds=audio.shape[0] / SAMPLE_RATE,
            started_at=started,
            finished_at=finished,
            audio_items=len(item_frames),
            encoded_seconds=self._encoded_seconds(final, item_frames),
            token_logprobs=_sampled_logprobs(comp),
            prompt_token_ids=tuple(final.prompt_token_ids or ()),
        )
        st.record(request.stream_id, result)
        return result

    async def _check_window_reuse(self) -> None:
        """Start-up probe: this vLLM must take feature items and answer exactly as with raw audio
        (greedy, 10 s of noise: two items). Otherwise reuse is turned off (raw audio every step)."""
        rng = np.random.default_rng(0)
        audio = (rng.standard_normal(10 * SAMPLE_RATE) * 0.05).astype(np.float32)
        prompt = self.base_prompt("")
        try:
            raw = await self.step(StepRequest(prompt, audio, 4, "", reuse_windows=False))
            items = await self.step(StepRequest(prompt, audio, 4, "", reuse_windows=True))
        except Exception as e:
            self._features = None
            logger.warning("window reuse disabled: feature items failed", extra={"error": str(e)})
            return
        if items.text != raw.text or items.audio_items != 2:
            self._features = None
            logger.warning("window reuse disabled: feature items changed the output")

    def _encoded_seconds(self, final: Any, item_frames: tuple[int, ...]) -> float:
        """Seconds of the items whose audio tokens reach past the prefix-cache hit."""
        ids = list(final.prompt_token_ids or ())
        cached = int(final.num_cached_tokens or 0)
        try:
            pos = ids.index(self._audio_start_id) + 1
        except ValueError:
            return sum(item_frames) * HOP / SAMPLE_RATE
        return reencoded_seconds(pos, item_frames, cached)

    @property
    def pass_counts(self) -> spec_decode.PassCounts:
        """vLLM's per-step counts since start (forward passes, drafts, accepted tokens; a copy)."""
        return self._passes.copy()

    @property
    def reuses_windows(self) -> bool:
        """Whether steps send feature items per 8 s window (see EngineOptions.reuse_windows)."""
        return self._features is not None

    def release_stream(self, stream_id: str) -> None:
        if self._features is not None and stream_id:
            self._features.forget(stream_id)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            llm, self._llm = self._llm, None
            # vLLM's shutdown joins the EngineCore process (seconds; up to its shutdown timeout when
            # the process hangs, then a kill): in a thread. It hands its loop-bound parts (sockets,
            # output tasks) back to their loop with call_soon_threadsafe, so this is safe.
            await asyncio.to_thread(self._shutdown, llm)


def _shutdown_llm(llm: Any) -> None:
    try:
        llm.shutdown()
    finally:
        # AsyncLLM.__del__ calls shutdown() again at interpreter exit, when module globals are
        # already torn down, and prints a TypeError; it has nothing left to do after this one.
        llm.shutdown = lambda *args, **kwargs: None


_T = TypeVar("_T")


async def _off_loop(fn: Callable[[], _T], discard: Callable[[_T], None]) -> _T:
    """`fn()` in a worker thread, so the running loop keeps serving meanwhile. A thread cannot be
    cancelled: if the caller is, `fn` still finishes and `discard` then disposes of its result (e.g.
    shuts a started engine down) instead of leaking it."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:

        def dispose(f: asyncio.Future[_T]) -> None:
            if not f.cancelled() and f.exception() is None:
                discard(f.result())

        fut.add_done_callback(dispose)
        raise


def _warm_logprob_detokenizer(tokenizer: Any) -> None:
    """vLLM detokenizes logprob tokens on the event loop and, the first time, serializes the whole
    tokenizer to JSON to find its space marker (1-2 s holding the GIL: a freeze on the first step of
    the first stream). It caches the answer on the tokenizer: compute it now, in the start-up thread."""
    try:
        from vllm.tokenizers.detokenizer_utils import get_leading_space_marker

        get_leading_space_marker(tokenizer)
    except Exception:  # another vLLM version: nothing to warm
        logger.debug("no logprob detokenizer to warm", exc_info=True)


def _sampled_logprobs(comp: Any) -> tuple[float, ...]:
    """The logprob of each generated token, from vLLM's per-position {token_id: Logprob} maps
    (a list or vLLM's FlatLogprobs); () when the request asked for none."""
    per_position = comp.logprobs
    if not per_position:
        return ()
    tokens = list(comp.token_ids)
    if len(per_position) != len(tokens):
        return ()
    out = []
    for position, token in zip(per_position, tokens, strict=True):
        entry = position.get(token) if position is not None else None
        if entry is None:  # not expected from vLLM; no partial confidences
            return ()
        out.append(float(entry.logprob))
    return tuple(out)


# vLLM's log-mel reflect-pads each side by N_FFT / 2 and fails on audio that short: shorter (non-empty)
# audio, e.g. the finish step of a flush right after an utterance started, is padded with silence.
MIN_STEP_SAMPLES = N_FFT


def _checked_audio(request: StepRequest) -> np.ndarray:
    """Reject what would make vLLM fail obscurely (or take its EngineCore down) before it gets there."""
    audio = request.audio
    if not isinstance(request.prompt, str) or request.prompt.count(AUDIO_PLACEHOLDER) != 1:
        raise RequestRejectedError("the prompt must contain exactly one audio placeholder")
    try:
        # a lone surrogate (e.g. "\ud800" from a bad decode of the context or keyterms) fails in
        # vLLM's tokenizer as a wrapped TypeError that looks transient: refuse it here, clearly
        request.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = request.prompt[e.start : e.end]
        raise RequestRejectedError(
            f"the prompt cannot be encoded as UTF-8 (lone surrogate {bad!r} at {e.start}): "
            "fix the context / keyterms text"
        ) from e
    if not isinstance(audio, np.ndarray) or audio.ndim != 1 or audio.dtype != np.float32:
        raise RequestRejectedError("audio must be a 1-D float32 numpy array (16 kHz mono)")
    if audio.shape[0] == 0:
        raise RequestRejectedError("audio is empty")
    if not np.isfinite(audio).all():
        raise RequestRejectedError("audio contains NaN or infinite samples")
    if audio.shape[0] < MIN_STEP_SAMPLES:
        audio = np.concatenate([audio, np.zeros(MIN_STEP_SAMPLES - audio.shape[0], np.float32)])
    return audio


def max_audio_items(options: EngineOptions) -> int:
    """Audio items a request may carry: one per 8 s window of the longest audio that fits."""
    if not options.reuse_windows:
        return 1
    return max(1, math.ceil(options.max_model_len / TOKENS_PER_WINDOW))


def _is_client_error(e: BaseException) -> bool:
    """vLLM's request errors (4xx: VLLMValidationError & co, by class name so vLLM stays a lazy import)
    and input errors (ValueError/TypeError/UnicodeError, e.g. from the tokenizer)."""
    names = {c.__name__ for c in type(e).__mro__}
    if "VLLMClientError" in names:
        return True
    status = getattr(e, "http_status", None)  # GracefulHTTPError: 503 (queue full) is transient
    if "GracefulHTTPError" in names:
        return status is not None and 400 <= int(status) < 500
    return isinstance(e, ValueError | TypeError)  # UnicodeError is a ValueError


def _map_vllm_error(e: Exception, core_log: Callable[[], str] | None = None) -> EngineError:
    name = type(e).__name__
    if name == "EngineDeadError":
        why = _last_error_line(core_log()) if core_log is not None else ""
        return EngineUnavailableError(f"vLLM engine died: {e}" + (f" (EngineCore: {why})" if why else ""))
    if name == "EngineGenerateError" and e.__cause__ is not None:
        # generate() wraps whatever its input/output processing raised: the cause decides
        cause = e.__cause__
        if isinstance(cause, Exception) and _is_client_error(cause):
            return RequestRejectedError(f"vLLM rejected the request: {type(cause).__name__}: {cause}")
        return EngineError(f"vLLM step failed: {type(cause).__name__}: {cause}")
    if _is_client_error(e):
        # input validation (e.g. prompt longer than max_model_len): the same request would fail again
        return RequestRejectedError(f"vLLM rejected the request: {e}")
    return EngineError(f"vLLM step failed: {name}: {e}")


def engine_dtype(options: EngineOptions, *, cuda: bool, flags: set[str] | None = None) -> str:
    """The dtype vLLM runs: `options.dtype`, but "auto" (the checkpoint's, bf16) becomes float32 on a
    CPU without bf16 matrix hardware, where torch's bf16 fallback makes prefill several times slower
    (cpu_features.py; measured side by side, docs/performance.md "CPU settings")."""
    if options.dtype != "auto" or cuda:
        return options.dtype
    if bf16_matrix_hardware(cpu_flags() if flags is None else flags) is False:
        return "float32"
    return options.dtype


def speculative_tokens(options: EngineOptions, *, cuda: bool) -> int:
    """Draft tokens per verification pass for `options` on this device (0: off)."""
    if options.speculative_tokens is not None:
        return options.speculative_tokens
    return 0 if cuda else CPU_SPECULATIVE_TOKENS


OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_omp_env_lock = threading.Lock()


def omp_binding(options: EngineOptions, environ: Mapping[str, str] = os.environ) -> str:
    """The cores a CPU engine's OMP threads bind to: `cpu_threads`, else the caller's
    VLLM_CPU_OMP_THREADS_BIND, else all cores (vLLM's CPU backend would reserve one)."""
    return options.cpu_threads or environ.get(OMP_BIND_ENV) or f"0-{(os.cpu_count() or 1) - 1}"


@contextlib.contextmanager
def scoped_environ(env: Mapping[str, str]) -> Iterator[None]:
    """`env` in this process's environment for the block, then as it was. vLLM spawns its EngineCore
    and worker as fresh interpreters that start with this environment, so variables they read at
    start (e.g. VLLM_CPU_OMP_THREADS_BIND, LD_PRELOAD) can be given to one engine only."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _engine_kwargs(
    options: EngineOptions, *, cuda: bool, kv_env: bool, mm_embeds: bool = False
) -> dict[str, Any]:
    """AsyncEngineArgs for `options` (`kv_env`: VLLM_CPU_KVCACHE_SPACE is set; `mm_embeds`: this
    vLLM takes precomputed feature items)."""
    kwargs: dict[str, Any] = dict(
        model=options.model,
        dtype=engine_dtype(options, cuda=cuda),
        max_model_len=options.max_model_len,
        enable_prefix_caching=options.enable_prefix_caching,
        limit_mm_per_prompt={"audio": max_audio_items(options)},
        enforce_eager=(not cuda) if options.enforce_eager is None else options.enforce_eager,
        mm_processor_cache_gb=options.mm_cache_gib,
    )
    if options.max_num_seqs is not None:
        kwargs["max_num_seqs"] = options.max_num_seqs
    if block := options.kv_block_tokens or (None if cuda else CPU_KV_BLOCK_TOKENS):
        kwargs["block_size"] = block
    if cuda:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        if options.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_gib * 2**30)
    elif not kv_env:
        # on CPU vLLM would size the KV cache from gpu_memory_utilization x host RAM: give it bytes
        kwargs["kv_cache_memory_bytes"] = int((options.kv_cache_gib or 2.0) * 2**30)
    if mm_embeds:
        kwargs["enable_mm_embeds"] = True  # precomputed feature items (features.py)
    if spec := speculative_tokens(options, cuda=cuda):
        kwargs["speculative_config"] = {
            "method": "custom_class",
            "model": spec_decode.PROPOSER,
            "num_speculative_tokens": spec,
        }
        kwargs["worker_extension_cls"] = spec_decode.WORKER_EXTENSION
    kwargs.update(dict(options.extra))
    return kwargs


# vLLM's reasons for "the engine does not fit in the memory it may use" (vLLM 0.32:
# v1/core/kv_cache_utils.py, v1/worker/utils.py, v1/worker/gpu_worker.py, v1/worker/cpu_worker.py),
# raised in the EngineCore process: this one only sees "Engine core initialization failed".
_MEMORY_REASONS = re.compile(
    r"No available memory for the cache blocks"
    r"|KV cache is needed, which is larger than the available KV cache memory"
    r"|less than desired (?:GPU|CPU) memory utilization"
    r"|exceed the desired GPU memory utilization"
    r"|less than the engine's budget"
    r"|Cannot auto-fit max_model_len"
    r"|CUDA out of memory|OutOfMemoryError"
)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b.*$", re.M)


def _last_error_line(text: str) -> str:
    """The last `SomeError: message` line of a log (a traceback's final line), shortened."""
    lines = _EXCEPTION_LINE.findall(text or "")
    return lines[-1].strip()[:500] if lines else ""


def _map_start_error(e: Exception, options: EngineOptions, *, cuda: bool, child_log: str) -> EngineError:
    """A failed vLLM start as a typed error that says why: memory problems name the option to change."""
    if isinstance(e, EngineError):
        return e
    text = f"{child_log}\n{type(e).__name__}: {e}"
    hits = [line.strip() for line in text.splitlines() if _MEMORY_REASONS.search(line)]
    if hits:
        reason = hits[-1][:500]
        if cuda:
            what = f"EngineOptions.gpu_memory_utilization={options.gpu_memory_utilization}"
            if options.kv_cache_gib is not None:
                what += f", kv_cache_gib={options.kv_cache_gib}"
            return EngineUnavailableError(
                f"vLLM cannot fit {options.model!r} in the GPU memory this engine may use "
                f"({what}, max_model_len={options.max_model_len}): raise gpu_memory_utilization (the "
                "fraction of the whole GPU per engine process), lower max_model_len, or run fewer "
                f"engine processes on this GPU. vLLM: {reason}"
            )
        env = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        kv = options.kv_cache_gib if options.kv_cache_gib is not None else 2.0
        what = f"VLLM_CPU_KVCACHE_SPACE={env} GiB" if env else f"EngineOptions.kv_cache_gib={kv}"
        return EngineUnavailableError(
            f"vLLM cannot fit the KV cache for {options.model!r} ({what}, "
            f"max_model_len={options.max_model_len}): raise the KV cache size or lower max_model_len. "
            f"vLLM: {reason}"
        )
    why = _last_error_line(child_log)
    return EngineUnavailableError(
        f"could not start vLLM for {options.model!r}: {e}" + (f" (EngineCore: {why})" if why else "")
    )


class _EngineCoreLog:
    """A file where the EngineCore process also writes its vLLM ERROR records, so a failed start (or a
    death) can say why: this process only gets "Engine core initialization failed. See root cause
    above", the reason is logged in the EngineCore's. vLLM passes its logging config to the EngineCore;
    we pass the default one plus a FileHandler. Not used when the user configures vLLM's logging."""

    _HANDLER = "qwen_asr_enginecore_errors"

    def __init__(self, directory: Path, config: Any) -> None:
        self.directory = directory
        self.path = directory / "errors.log"
        self.config = config
        # the EngineCore may write until it exits: removed by remove() after shutdown, or at exit
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(directory), True)

    @classmethod
    def create(cls, kwargs: dict[str, Any], fields: dict[str, Any]) -> _EngineCoreLog | None:
        if "logging_config" not in fields or {"logging_config", "log_config_file"} & kwargs.keys():
            return None
        try:
            import vllm.envs as envs
            from vllm.config.logging import LoggingConfig
            from vllm.logger import DEFAULT_LOGGING_CONFIG
        except ImportError:
            return None
        if not envs.VLLM_CONFIGURE_LOGGING or envs.VLLM_LOGGING_CONFIG_PATH:
            return None  # the user's own logging setup wins
        import copy
        import logging

        directory = Path(tempfile.mkdtemp(prefix="qwen-asr-enginecore-"))
        try:
            # vLLM's default config, refreshed from the environment as vLLM does, plus our handler
            cfg = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
            level = str(envs.VLLM_LOGGING_LEVEL).upper()
            cfg["handlers"]["vllm"].update(level=level, stream=envs.VLLM_LOGGING_STREAM)
            for formatter in cfg["formatters"].values():
                formatter["log_level"] = level
            numeric = logging.getLevelName(level)
            cfg["loggers"]["vllm"]["level"] = (
                logging.getLevelName(min(numeric, logging.ERROR)) if isinstance(numeric, int) else level
            )
            cfg["handlers"][cls._HANDLER] = {
                "class": "logging.FileHandler",
                "filename": str(directory / "errors.log"),
                "level": "ERROR",
                "delay": True,
                "encoding": "utf-8",
            }
            cfg["loggers"]["vllm"]["handlers"] = [*cfg["loggers"]["vllm"]["handlers"], cls._HANDLER]
            config_file = directory / "logging.json"
            config_file.write_text(json.dumps(cfg))
            return cls(directory, LoggingConfig(pylogging_config_file=str(config_file)))
        except Exception:
            logger.debug("EngineCore error capture unavailable", exc_info=True)
            shutil.rmtree(directory, ignore_errors=True)
            return None

    def detach_from_this_process(self) -> None:
        """vLLM applies the config here too: keep the file to the EngineCore's records."""
        import logging

        vllm_logger = logging.getLogger("vllm")
        for h in list(vllm_logger.handlers):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == self.path:
                vllm_logger.removeHandler(h)
                h.close()

    def tail(self, limit: int = 64 * 1024) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def remove(self) -> None:
        self._finalizer()


# -- one engine per process ----------------------------------------------------------------------
_shared: dict[EngineOptions, asyncio.Task[ASREngine]] = {}


async def get_shared_engine(options: EngineOptions | None = None) -> ASREngine:
    """The process-wide engine for these options, started on first use (concurrent callers share it):
    vLLM in-process, restarted up to `options.max_restarts` times if it dies (supervisor.py).

    A failed start is not cached: the next call tries again.
    """
    from .supervisor import SupervisedEngine

    options = options or EngineOptions()
    task = _shared.get(options)
    if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
        # SupervisedEngine.start -> VLLMEngine.start loads off this loop (streams keep running)
        task = asyncio.ensure_future(SupervisedEngine.start(options))
        _shared[options] = task
    return await asyncio.shield(task)


async def close_shared_engines() -> None:
    for task in list(_shared.values()):
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().aclose()
    _shared.clear()


def options_replace(options: EngineOptions, **changes: Any) -> EngineOptions:
    return dataclasses.replace(options, **changes)
