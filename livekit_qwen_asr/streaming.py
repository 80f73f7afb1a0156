"""Rollback-prefix streaming decoding for one audio stream — pure logic, no asyncio, no I/O.

The algorithm is the official Qwen3-ASR one (`qwen_asr/inference/qwen3_asr.py`,
`streaming_transcribe` / `finish_streaming_transcribe`): audio is consumed in chunks; each step sees
all audio of the utterance so far and the prompt `base + prefix`, where prefix is the previous raw
decode minus its last K tokens (K grows while the decoded prefix contains U+FFFD), and no prefix for
the first N chunks. The finish step flushes a tail shorter than a chunk.

What this module adds (whisper_streaming-style split between hypothesis state and I/O):
- steps are *planned* (`next_step`) and *applied* (`apply`) separately, so an async driver can run the
  model in between while more audio arrives, retry a failed step, or coalesce several chunks;
- every applied step returns a `Hypothesis`: full interim text, the *stable* text (what the next
  step's prefix keeps), the parsed language; `language X<asr_text>` never reaches the text fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import InvalidAudioError, InvalidOptionError, StaleStepError
from .prompt import chatml_base_prompt, forced_language_suffix, normalize_language, parse_output

SAMPLE_RATE = 16_000
REPLACEMENT_CHAR = "\ufffd"


class TokenCodec(Protocol):
    """The model tokenizer, as the rollback needs it (a HF tokenizer satisfies this)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class StreamingConfig:
    """Official defaults. `language` None = auto-detect; `context` is free text for the system turn."""

    chunk_size_sec: float = 2.0
    unfixed_chunk_num: int = 2
    unfixed_token_num: int = 5
    context: str = ""
    language: str | None = None

    def __post_init__(self) -> None:
        validate_streaming_options(self.chunk_size_sec, self.unfixed_chunk_num, self.unfixed_token_num)
        object.__setattr__(self, "language", normalize_language(self.language))
        if not isinstance(self.context, str):
            raise InvalidOptionError(f"context must be a string, got {type(self.context).__name__}")

    @property
    def chunk_samples(self) -> int:
        return max(1, int(round(self.chunk_size_sec * SAMPLE_RATE)))


def validate_streaming_options(chunk_size_sec: float, unfixed_chunk_num: int, unfixed_token_num: int) -> None:
    if isinstance(chunk_size_sec, bool) or not isinstance(chunk_size_sec, int | float | np.number):
        raise InvalidOptionError(f"chunk_size_sec must be a number, got {chunk_size_sec!r}")
    chunk = float(chunk_size_sec)
    if not np.isfinite(chunk) or chunk <= 0:
        raise InvalidOptionError(f"chunk_size_sec must be a finite number > 0, got {chunk_size_sec!r}")
    if chunk * SAMPLE_RATE < 160:
        raise InvalidOptionError(f"chunk_size_sec must be at least 0.01 s, got {chunk_size_sec!r}")
    for name, value in (("unfixed_chunk_num", unfixed_chunk_num), ("unfixed_token_num", unfixed_token_num)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise InvalidOptionError(f"{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class StepPlan:
    """One model call: the prompt and the utterance audio it covers. Produced by `next_step`."""

    prompt: str
    prefix: str
    audio: np.ndarray  # float32, 16 kHz mono: the whole utterance up to the end of this step
    new_samples: int  # pending samples this step consumes (0 for a finish step cut before them)
    new_chunks: int  # chunk count this step advances (0 for a finish step)
    final: bool
    seq: int  # state version the plan was made from
    # The previous decode's text after `prefix` (all of it when there is no prefix): what this step
    # will most likely write first. Engines may verify it as a speculative draft; it never changes
    # the output.
    draft: str = ""

    @property
    def audio_seconds(self) -> float:
        return self.audio.shape[0] / SAMPLE_RATE


@dataclass(frozen=True)
class Hypothesis:
    """The transcript after a step. `text` is replaceable; `stable_text` is what the next prefix keeps."""

    text: str
    stable_text: str
    language: str
    raw: str
    final: bool
    audio_seconds: float  # utterance audio covered


@dataclass
class _UtteranceState:
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    raw_decoded: str = ""
    chunk_id: int = 0
    steps: int = 0


class StreamingTranscriber:
    """State of one stream's current utterance. Not thread-safe; drive it from one task.

    Usage: `push_audio(pcm)`; while `step_ready()`: `plan = next_step()`, run the model on
    `plan.prompt` + `plan.audio`, `apply(plan, generated_text)`. At the end of an utterance:
    `plan = finish_step()` (None when there is no tail), apply it, then `finalize()` and `reset()`.
    """

    def __init__(
        self,
        config: StreamingConfig,
        codec: TokenCodec,
        base_prompt: Callable[[str], str] = chatml_base_prompt,
    ) -> None:
        self._codec = codec
        self._base_prompt_fn = base_prompt
        self._state = _UtteranceState()
        self._seq = 0
        self._last: Hypothesis | None = None
        self.configure(config)

    # -- configuration -------------------------------------------------------------------------
    @property
    def config(self) -> StreamingConfig:
        return self._config

    def configure(self, config: StreamingConfig) -> None:
        """Change options. Takes effect from the next step; audio already buffered is kept."""
        self._config = config
        self._prompt_raw = self._base_prompt_fn(config.context) + forced_language_suffix(config.language)

    @property
    def prompt_raw(self) -> str:
        return self._prompt_raw

    # -- audio ---------------------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray) -> None:
        """Buffer 16 kHz mono samples (float in [-1, 1] or int16). Empty input is a no-op."""
        x = np.asarray(pcm)
        if x.size == 0:
            return
        if x.ndim != 1:
            raise InvalidAudioError(f"expected 1-D mono samples, got shape {x.shape}")
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        elif np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32, copy=False)
            if not np.isfinite(x).all():
                raise InvalidAudioError("audio contains NaN or infinite samples")
        else:
            raise InvalidAudioError(f"unsupported sample dtype {x.dtype}; use float32 or int16")
        self._state.pending = np.concatenate([self._state.pending, x])

    @property
    def pending_samples(self) -> int:
        return int(self._state.pending.shape[0])

    @property
    def utterance_samples(self) -> int:
        """Samples already consumed by steps of this utterance."""
        return int(self._state.audio.shape[0])

    @property
    def steps_done(self) -> int:
        return self._state.steps

    @property
    def last(self) -> Hypothesis | None:
        return self._last

    def step_ready(self) -> bool:
        return self.pending_samples >= self._config.chunk_samples

    # -- planning ------------------------------------------------------------------------------
    def next_step(self, max_chunks: int | None = 1) -> StepPlan | None:
        """Plan a streaming step over whole pending chunks (all of them when max_chunks is None).

        A driver that fell behind passes None, so one step covers all audio that arrived meanwhile.
        """
        cs = self._config.chunk_samples
        n = self.pending_samples // cs
        if max_chunks is not None:
            n = min(n, max_chunks)
        if n <= 0:
            return None
        st = self._state
        take = n * cs
        audio = np.concatenate([st.audio, st.pending[:take]])
        prefix = "" if st.chunk_id < self._config.unfixed_chunk_num else self._rollback(st.raw_decoded)
        draft = _draft(st.raw_decoded, prefix)
        return StepPlan(self._prompt_raw + prefix, prefix, audio, take, n, False, self._seq, draft)

    def finish_step(self, end: int | None = None) -> StepPlan | None:
        """Plan the finish step over the utterance audio up to `end` (utterance-relative sample; default:
        everything pending, i.e. a tail shorter than a chunk, or more when the driver fell behind).

        Audio after `end` is carried into the next utterance (see `reset`). When `end` falls inside
        audio a step already consumed, that step's decode may contain words spoken after `end`, so the
        finish step then decodes without a prefix. None when nothing is pending and no cut is asked.
        """
        st = self._state
        total = st.audio.shape[0] + st.pending.shape[0]
        end = total if end is None else min(max(int(end), 0), total)
        if end == st.audio.shape[0]:
            return None  # nothing new: the last hypothesis already covers exactly this audio
        audio = np.concatenate([st.audio, st.pending])[:end]
        if st.chunk_id < self._config.unfixed_chunk_num or end < st.audio.shape[0]:
            prefix = ""
        else:
            prefix = self._rollback(st.raw_decoded, finish=True)
        return StepPlan(
            self._prompt_raw + prefix,
            prefix,
            audio,
            max(0, end - st.audio.shape[0]),
            0,
            True,
            self._seq,
            _draft(st.raw_decoded, prefix),
        )

    def _rollback(self, raw: str, finish: bool = False) -> str:
        """Previous decode minus its last K tokens, cut back further while it ends in a broken
        multi-byte character (U+FFFD). The finish step keeps at least one token, as the official SDK
        does (`max(1, ...)`); unlike the SDK it also applies the U+FFFD guard there."""
        ids = self._codec.encode(raw)
        k = self._config.unfixed_token_num
        end = max(1 if finish else 0, len(ids) - k)
        while True:
            prefix = self._codec.decode(ids[:end]) if end > 0 else ""
            if REPLACEMENT_CHAR not in prefix or end == 0:
                return prefix if REPLACEMENT_CHAR not in prefix else ""
            end -= 1

    # -- applying ------------------------------------------------------------------------------
    def apply(self, plan: StepPlan, generated_text: str) -> Hypothesis:
        """Commit a step's model output and return the new hypothesis."""
        if plan.seq != self._seq:
            raise StaleStepError("the stream state changed since this step was planned")
        st = self._state
        # audio past the plan's end (arrived meanwhile, or cut off by a finish step) stays pending
        full = np.concatenate([st.audio, st.pending])
        st.audio = plan.audio
        st.pending = full[plan.audio.shape[0] :]
        st.chunk_id += plan.new_chunks if not plan.final else 1
        st.steps += 1
        st.raw_decoded = plan.prefix + (generated_text or "")
        self._seq += 1
        lang, text = parse_output(st.raw_decoded, self._config.language)
        if plan.final:
            stable = text
        elif st.chunk_id < self._config.unfixed_chunk_num:
            stable = ""
        else:
            stable = parse_output(self._rollback(st.raw_decoded), self._config.language)[1]
        self._last = Hypothesis(text, stable, lang, st.raw_decoded, plan.final, plan.audio_seconds)
        return self._last

    def finalize(self) -> Hypothesis:
        """The utterance's final hypothesis (after the finish step, if there was one)."""
        last = self._last
        if last is None:
            return Hypothesis(
                "", "", self._config.language or "", "", True, self.utterance_samples / SAMPLE_RATE
            )
        if last.final:
            return last
        return Hypothesis(last.text, last.text, last.language, last.raw, True, last.audio_seconds)

    def reset(self) -> None:
        """Start a new utterance. Audio no step consumed yet (none after a finish step) carries over."""
        self._state = _UtteranceState(pending=self._state.pending)
        self._last = None
        self._seq += 1


def _draft(raw: str, prefix: str) -> str:
    """The previous decode after the prefix the step's prompt keeps of it (empty if it no longer
    starts with it, e.g. after a U+FFFD cut)."""
    return raw[len(prefix) :] if raw.startswith(prefix) else ""
