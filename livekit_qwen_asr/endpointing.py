"""Utterance segmentation — pure logic, no asyncio, no I/O.

- `Endpointer` turns per-window speech probabilities (from the bundled silero VAD's INFERENCE_DONE
  events, which carry exact sample positions) into utterance boundaries: onset after `min_speech_ms`
  of speech, end after `endpointing_ms` of silence. Positions are absolute 16 kHz sample indices.
- `AudioTimeline` keeps the stream's recent audio addressable by absolute position, so audio can be
  routed to the transcriber once the VAD has judged it (silence never reaches the model).
- `choose_cut` picks where to split an utterance that reached the maximum length: a quiet 20 ms frame
  in a search window whose surrounding 100 ms is quietest, so the cut falls between words where the
  audio shows a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidOptionError

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class EndpointingConfig:
    endpointing_ms: int = 500  # silence that ends an utterance; 0 = no VAD endpointing (flush only)
    activation_threshold: float = 0.5  # speech probability that counts as speech
    deactivation_threshold: float = 0.35  # below this, silence (hysteresis)
    min_speech_ms: int = 100  # speech needed before an utterance starts
    padding_ms: int = 300  # audio kept before the onset and after the last speech
    pause_ms: int = 200  # silence inside an utterance that may end the turn (PREFLIGHT cue); gaps
    # between words are shorter, so they are no pause
    max_utterance_sec: float = 30.0  # longer utterances are cut (between words) and continued
    cut_search_sec: float = 4.0  # the forced cut looks for a gap between words in this window

    def __post_init__(self) -> None:
        for name in ("endpointing_ms", "min_speech_ms", "padding_ms", "pause_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) or v < 0:
                raise InvalidOptionError(f"{name} must be a number >= 0, got {v!r}")
        if not 0.0 < self.deactivation_threshold <= self.activation_threshold < 1.0:
            raise InvalidOptionError("need 0 < deactivation_threshold <= activation_threshold < 1")
        if not (np.isfinite(self.max_utterance_sec) and self.max_utterance_sec >= 2.0):
            raise InvalidOptionError(f"max_utterance_sec must be >= 2, got {self.max_utterance_sec!r}")
        if not 0.2 <= self.cut_search_sec < self.max_utterance_sec:
            raise InvalidOptionError("cut_search_sec must be >= 0.2 and < max_utterance_sec")

    @property
    def enabled(self) -> bool:
        return self.endpointing_ms > 0

    def samples(self, ms: float) -> int:
        return int(round(ms * SAMPLE_RATE / 1000))

    @property
    def max_utterance_samples(self) -> int:
        return int(self.max_utterance_sec * SAMPLE_RATE)


@dataclass(frozen=True)
class Boundary:
    kind: str  # "start" | "end"
    sample: int  # start: first sample of the utterance (onset - padding); end: where speech + padding ends


class Endpointer:
    """Speech/silence state over VAD windows. `update` returns the boundaries crossed by one window."""

    def __init__(self, config: EndpointingConfig) -> None:
        self.config = config
        self.speaking = False
        self._pos = 0
        self._speech_run = 0
        self._run_onset = 0
        self._silence_run = 0
        self.last_speech_end = 0

    def reset(self) -> None:
        """Back to silence, keeping the position: after a flush, speech needs a new onset."""
        self.speaking = False
        self._speech_run = 0
        self._silence_run = 0

    @property
    def position(self) -> int:
        """End of the last window judged."""
        return self._pos

    @property
    def pausing(self) -> bool:
        """Speaking, in a silence run of at least `pause_ms` (capped at half of `endpointing_ms`)
        that has not yet ended the utterance."""
        cfg = self.config
        pause = min(cfg.pause_ms, cfg.endpointing_ms / 2)
        return self.speaking and self._silence_run > 0 and self._silence_run >= cfg.samples(pause)

    def hold_point(self) -> int:
        """While speaking: how far audio may be routed now. During a silence run, audio past the last
        speech + padding is held back; it is routed only if speech resumes."""
        if not self.speaking or self._silence_run == 0:
            return self._pos
        return min(self._pos, self.last_speech_end + self.config.samples(self.config.padding_ms))

    def update(self, end_sample: int, probability: float) -> list[Boundary]:
        cfg = self.config
        start = self._pos
        window = max(0, end_sample - start)
        self._pos = max(self._pos, end_sample)
        out: list[Boundary] = []
        if not self.speaking:
            if probability >= cfg.activation_threshold:
                if self._speech_run == 0:
                    self._run_onset = start
                self._speech_run += window
                if self._speech_run >= cfg.samples(cfg.min_speech_ms):
                    self.speaking = True
                    self._silence_run = 0
                    self.last_speech_end = end_sample
                    out.append(Boundary("start", max(0, self._run_onset - cfg.samples(cfg.padding_ms))))
            else:
                self._speech_run = 0
        else:
            if probability < cfg.deactivation_threshold:
                self._silence_run += window
                if self._silence_run >= cfg.samples(cfg.endpointing_ms):
                    self.speaking = False
                    self._speech_run = 0
                    end = min(self._pos, self.last_speech_end + cfg.samples(cfg.padding_ms))
                    out.append(Boundary("end", end))
            else:
                self._silence_run = 0
                self.last_speech_end = end_sample
        return out


class AudioTimeline:
    """Int16 audio addressed by absolute sample position; old audio can be dropped from the front."""

    def __init__(self) -> None:
        self._buf = np.zeros(0, np.int16)
        self._base = 0

    @property
    def start(self) -> int:
        return self._base

    @property
    def end(self) -> int:
        return self._base + self._buf.shape[0]

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._buf = np.concatenate([self._buf, samples.astype(np.int16, copy=False)])

    def slice(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self._base), min(b, self.end)
        if b <= a:
            return np.zeros(0, np.int16)
        return self._buf[a - self._base : b - self._base]

    def drop_before(self, pos: int) -> None:
        n = min(max(0, pos - self._base), self._buf.shape[0])
        if n:
            self._buf = self._buf[n:].copy()
            self._base += n


def choose_cut(
    audio: np.ndarray,
    lo: int,
    hi: int,
    frame: int = 320,
    hop: int = 160,
    context: int = 1600,
    quiet_share: float = 0.1,
) -> int:
    """Index in [lo, hi] between words: among the quietest `quiet_share` of the `frame`-sample windows
    (RMS), the centre of the one whose `context` samples around it are quietest (then the quieter
    frame, then the later one).

    A stop consonant's closure inside a word ("par|ty") is as quiet over 20 ms as a gap between words,
    but the 100 ms around a closure are loud: by the quietest 20 ms alone, far more forced cuts fell
    inside a word in pause-free speech (bench/forced_cuts.py; docs/fidelity.md has the counts).
    """
    lo, hi = max(0, lo), min(hi, audio.shape[0])
    if hi - lo < frame:
        return hi
    x = audio[lo:hi].astype(np.float64)
    sq = np.concatenate([[0.0], np.cumsum(x * x)])
    centres = np.arange(0, x.shape[0] - frame + 1, hop) + frame // 2
    energy = sq[centres + frame - frame // 2] - sq[centres - frame // 2]
    a = np.clip(centres - context // 2, 0, x.shape[0])
    b = np.clip(centres + context // 2, 0, x.shape[0])
    around = (sq[b] - sq[a]) / np.maximum(b - a, 1)
    quiet = np.argsort(energy, kind="stable")[: max(1, int(np.ceil(quiet_share * energy.shape[0])))]
    # quietest context first, then the quieter frame, then the latest
    best = quiet[np.lexsort((-quiet, energy[quiet], around[quiet]))[0]]
    return lo + int(centres[best])


@dataclass(frozen=True)
class Push:
    """Feed these samples to the current utterance's transcriber."""

    samples: np.ndarray


@dataclass(frozen=True)
class Start:
    """An utterance begins at this absolute sample (VAD onset minus padding)."""

    sample: int


@dataclass(frozen=True)
class Finish:
    """Finish the current utterance at this absolute sample. Audio after it (a forced cut) is carried
    into the next utterance, which starts exactly there."""

    sample: int
    reason: str  # "endpoint" | "max_length" | "flush"


@dataclass(frozen=True)
class Pause:
    """A silence began inside the utterance (shorter than `endpointing_ms` so far): the turn may end."""

    sample: int


@dataclass(frozen=True)
class Resume:
    """Speech resumed after a `Pause` (the utterance goes on)."""

    sample: int


Action = Push | Start | Finish | Pause | Resume


class Segmenter:
    """Routes a stream's audio into utterances — pure: callers execute the returned actions in order.

    With a VAD (`use_vad`), audio waits in the timeline until the VAD has judged it: speech (from the
    onset minus padding) is pushed to the transcriber, silence between utterances never is. Without a
    VAD everything is pushed and only `flush` or the length limit end an utterance. In both modes an
    utterance longer than `max_utterance_sec` is cut at the quietest gap (`choose_cut`) of the last
    `cut_search_sec`; the audio after the cut starts the next utterance (no sample lost or repeated).
    """

    def __init__(self, config: EndpointingConfig, use_vad: bool) -> None:
        self.config = config
        self.use_vad = use_vad and config.enabled
        self.timeline = AudioTimeline()
        self.endpointer = Endpointer(config)
        self.in_utterance = not self.use_vad
        self.utterance_start = 0  # absolute sample where the current utterance's audio starts
        self.routed = 0  # audio before this position has been decided (pushed or dropped)
        self._floor = 0  # no utterance may start before the end of the previous one

    def on_audio(self, samples: np.ndarray) -> list[Action]:
        self.timeline.append(samples)
        if self.use_vad:
            return []
        return self._route_to(self.timeline.end)

    def on_vad(self, end_sample: int, probability: float) -> list[Action]:
        if not self.use_vad:
            return []
        out: list[Action] = []
        was_pausing = self.in_utterance and self.endpointer.pausing
        for b in self.endpointer.update(end_sample, probability):
            if b.kind == "start" and not self.in_utterance:
                at = max(b.sample, self._floor, self.timeline.start)
                self.in_utterance = True
                self.utterance_start = self.routed = at
                out.append(Start(at))
            elif b.kind == "end" and self.in_utterance:
                out += self._route_to(max(b.sample, self.routed))
                out.append(self._finish(self.routed, "endpoint"))
                self.in_utterance = False
        if self.in_utterance:
            out += self._route_to(self.endpointer.hold_point())
            pausing = self.endpointer.pausing
            if pausing and not was_pausing:
                out.append(Pause(end_sample))
            elif was_pausing and not pausing:
                out.append(Resume(end_sample))
        else:
            self.routed = max(self.routed, min(self.endpointer.position, self.timeline.end))
            self._trim()
        return out

    def on_flush(self) -> list[Action]:
        """End the current utterance now with every sample received so far (a user/framework flush).

        With a VAD, call it once the VAD has judged the audio received before the flush. Afterwards
        the VAD must see a new onset: audio after a flush never joins the flushed utterance.
        """
        if not self.in_utterance:
            return []
        out = self._route_to(self.timeline.end)
        out.append(self._finish(self.routed, "flush"))
        self.in_utterance = not self.use_vad
        self.endpointer.reset()
        return out

    def cut_due(self, consumed: int) -> Finish | None:
        """A forced cut when the utterance reached the maximum length. `consumed`: utterance samples
        already decoded by streaming steps; a cut at or after it keeps the rollback prefix valid."""
        cfg = self.config
        length = self.routed - self.utterance_start
        if not self.in_utterance or length < cfg.max_utterance_samples:
            return None
        limit = self.utterance_start + cfg.max_utterance_samples
        search = int(cfg.cut_search_sec * SAMPLE_RATE)
        lo = max(self.utterance_start + consumed, limit - search)
        if limit - lo < SAMPLE_RATE // 2:  # too little undecoded audio to choose from: search it all
            lo = limit - search
        audio = self.timeline.slice(lo, limit)
        cut = lo + choose_cut(audio, 0, audio.shape[0])
        return self._finish(max(cut, self.utterance_start + 1), "max_length")

    def _route_to(self, pos: int) -> list[Action]:
        pos = min(pos, self.timeline.end)
        out: list[Action] = []
        if self.in_utterance and pos > self.routed:
            out.append(Push(self.timeline.slice(self.routed, pos).copy()))
        self.routed = max(self.routed, pos)
        self._trim()
        return out

    def _finish(self, sample: int, reason: str) -> Finish:
        self._floor = sample
        self.utterance_start = sample
        self._trim()
        return Finish(sample, reason)

    def _trim(self) -> None:
        cfg = self.config
        if self.in_utterance:
            keep = self.utterance_start  # the forced cut may look back over the whole utterance
        else:  # keep enough before the judged position for an onset minus padding
            keep = self.routed - cfg.samples(cfg.padding_ms + cfg.min_speech_ms) - SAMPLE_RATE // 2
        self.timeline.drop_before(min(keep, self.routed))
