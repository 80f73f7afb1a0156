"""Pure segmentation logic: endpointer, segmenter routing, forced cuts (no model, no asyncio)."""

from __future__ import annotations

import numpy as np
import pytest

from livekit_qwen_asr.endpointing import (
    Endpointer,
    EndpointingConfig,
    Finish,
    Push,
    Segmenter,
    Start,
    choose_cut,
)
from livekit_qwen_asr.errors import InvalidOptionError

SR = 16000
WIN = 512  # the silero VAD window at 16 kHz


def run_vad(seg: Segmenter, probs: list[float], audio: np.ndarray | None = None) -> list:
    """Feed audio and one probability per 512-sample window, like the VAD's INFERENCE_DONE events."""
    audio = np.zeros(len(probs) * WIN, np.int16) if audio is None else audio
    actions = []
    for i, p in enumerate(probs):
        actions += seg.on_audio(audio[i * WIN : (i + 1) * WIN])
        actions += seg.on_vad((i + 1) * WIN, p)
    return actions


def windows(seconds: float) -> int:
    return int(round(seconds * SR / WIN))


def test_endpointer_needs_min_speech_and_min_silence():
    ep = Endpointer(EndpointingConfig(endpointing_ms=500, min_speech_ms=100, padding_ms=0))
    assert ep.update(WIN, 0.9) == []  # 32 ms of speech is not enough
    assert ep.update(2 * WIN, 0.1) == []  # a blip resets the run
    out = []
    for i in range(3, 3 + windows(0.2)):
        out += ep.update(i * WIN, 0.9)
    assert [b.kind for b in out] == ["start"] and out[0].sample == 2 * WIN
    pos = (3 + windows(0.2)) * WIN
    out = []
    for k in range(windows(0.4)):
        out += ep.update(pos + (k + 1) * WIN, 0.4)  # between thresholds: still speech (hysteresis)
    assert out == [] and ep.speaking
    pos += windows(0.4) * WIN
    for k in range(windows(0.6)):
        out += ep.update(pos + (k + 1) * WIN, 0.05)
    assert [b.kind for b in out] == ["end"] and out[0].sample == pos  # last speech end (+0 padding)


def test_segmenter_pushes_speech_only_and_counts_utterances():
    cfg = EndpointingConfig(endpointing_ms=500, padding_ms=200)
    seg = Segmenter(cfg, use_vad=True)
    pattern = [0.0] * windows(1.0) + [0.9] * windows(2.0) + [0.0] * windows(1.2) + [0.9] * windows(1.5)
    pattern += [0.0] * windows(1.0)
    audio = (np.arange(len(pattern) * WIN) % 30000).astype(np.int16)  # position-coded samples
    actions = run_vad(seg, pattern, audio)
    kinds = [type(a).__name__ for a in actions]
    assert kinds.count("Start") == 2 and kinds.count("Finish") == 2
    # each utterance: Start, contiguous pushes, Finish exactly at the end of what was pushed
    pos = None
    pushed_total = 0
    for a in actions:
        if isinstance(a, Start):
            pos = a.sample
        elif isinstance(a, Push):
            assert np.array_equal(a.samples, audio[pos : pos + len(a.samples)])
            pos += len(a.samples)
            pushed_total += len(a.samples)
        elif isinstance(a, Finish):
            assert a.sample == pos and a.reason == "endpoint"
    # silence costs nothing: less than speech + padding around it reached the transcriber
    speech = windows(2.0) * WIN + windows(1.5) * WIN
    assert pushed_total <= speech + 2 * 2 * cfg.samples(cfg.padding_ms) + 4 * WIN
    assert pushed_total < len(audio) * 0.75


def test_segmenter_reports_pauses_inside_an_utterance():
    """A silence run inside an utterance is a Pause (the turn may be ending: the stream's PREFLIGHT
    cue); speech resuming is a Resume; a silence reaching endpointing_ms is a Pause, then the Finish."""
    cfg = EndpointingConfig(endpointing_ms=500, padding_ms=200)
    seg = Segmenter(cfg, use_vad=True)
    pattern = [0.9] * windows(1.0) + [0.0] * windows(0.3) + [0.9] * windows(1.0) + [0.0] * windows(1.0)
    kinds = [type(a).__name__ for a in run_vad(seg, pattern) if not isinstance(a, Push)]
    assert kinds == ["Start", "Pause", "Resume", "Pause", "Finish"]
    # silence between utterances is no pause
    kinds = [type(a).__name__ for a in run_vad(seg, [0.0] * windows(1.0)) if not isinstance(a, Push)]
    assert kinds == []
    # a gap between words (shorter than pause_ms) is no pause
    seg = Segmenter(cfg, use_vad=True)
    pattern = [0.9] * windows(1.0) + [0.0] * windows(0.1) + [0.9] * windows(1.0)
    kinds = [type(a).__name__ for a in run_vad(seg, pattern) if not isinstance(a, Push)]
    assert kinds == ["Start"]


def test_segmenter_flush_ends_utterance_with_all_audio_so_far():
    seg = Segmenter(EndpointingConfig(), use_vad=True)
    run_vad(seg, [0.9] * windows(1.0))
    extra = seg.on_audio(np.ones(777, np.int16))  # not judged by the VAD yet
    assert extra == []
    actions = seg.on_flush()
    assert isinstance(actions[-1], Finish) and actions[-1].reason == "flush"
    assert actions[-1].sample == windows(1.0) * WIN + 777
    assert not seg.in_utterance and not seg.endpointer.speaking  # what follows needs a new onset
    more = []
    for k in range(windows(0.5)):
        more += seg.on_audio(np.ones(WIN, np.int16))
        more += seg.on_vad((windows(1.0) + 1 + k) * WIN, 0.9)  # the VAD catches up, still speech
    assert isinstance(more[0], Start) and more[0].sample >= actions[-1].sample  # never before the flush


def test_without_vad_everything_is_pushed_and_flush_ends():
    seg = Segmenter(EndpointingConfig(), use_vad=False)
    a = seg.on_audio(np.ones(1000, np.int16))
    assert isinstance(a[0], Push) and len(a[0].samples) == 1000
    assert seg.on_vad(512, 0.9) == []
    assert seg.on_flush()[-1] == Finish(1000, "flush")


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts (~180 ms loud, ~60 ms quiet gaps), no pause long enough to endpoint."""
    rng = np.random.default_rng(seed)
    out, n = [], int(seconds * SR)
    while sum(len(x) for x in out) < n:
        loud = int(rng.uniform(0.12, 0.25) * SR)
        gap = int(rng.uniform(0.04, 0.08) * SR)
        out.append((rng.standard_normal(loud) * 8000).astype(np.int16))
        out.append((rng.standard_normal(gap) * 50).astype(np.int16))
    return np.concatenate(out)[:n]


@pytest.mark.parametrize("use_vad", [True, False])
def test_forced_cuts_partition_60s_of_pause_free_speech(use_vad):
    cfg = EndpointingConfig(max_utterance_sec=30.0, cut_search_sec=4.0)
    seg = Segmenter(cfg, use_vad=use_vad)
    audio = _speechlike(61.0)
    consumed = 0  # pretend streaming steps keep up: everything but the last 2 s is decoded
    utterances: list[np.ndarray] = []
    current: list[np.ndarray] = []
    start = 0
    for i in range(len(audio) // WIN):
        actions = seg.on_audio(audio[i * WIN : (i + 1) * WIN])
        actions += seg.on_vad((i + 1) * WIN, 0.95) if use_vad else []
        for a in actions:
            if isinstance(a, Start):
                start = a.sample
            elif isinstance(a, Push):
                current.append(a.samples)
                routed = start + sum(len(c) for c in current)
                consumed = max(0, (routed - start - 2 * SR) // (2 * SR) * 2 * SR)
                cut = seg.cut_due(consumed)
                if cut is not None:
                    whole = np.concatenate(current)
                    n = cut.sample - start
                    assert cut.reason == "max_length" and n <= cfg.max_utterance_samples
                    assert n >= consumed  # the rollback prefix only covers audio before the cut
                    utterances.append(whole[:n])
                    current, start = [whole[n:]], cut.sample
    utterances.append(np.concatenate(current))
    assert len(utterances) == 3
    joined = np.concatenate(utterances)
    fed = (len(audio) // WIN) * WIN
    assert np.array_equal(joined, audio[:fed])  # no sample lost, none repeated (VAD onset - padding = 0)
    # every cut falls in a quiet gap between "syllables", not inside a burst
    pos = 0
    for u in utterances[:-1]:
        pos += len(u)
        around = audio[pos - 80 : pos + 80].astype(np.float64)
        assert np.sqrt(np.mean(around**2)) < 500


def test_choose_cut_picks_the_quietest_window_latest_on_ties():
    x = np.full(16000, 5000, np.int16)
    x[4000:4400] = 0
    x[12000:12400] = 0
    c = choose_cut(x, 0, 16000)
    assert 12000 <= c <= 12400
    assert 4000 <= choose_cut(x, 0, 8000) <= 4400
    assert choose_cut(x, 100, 200) == 200  # window smaller than a frame: cut at its end


@pytest.mark.parametrize(
    "kw",
    [
        {"endpointing_ms": -1},
        {"activation_threshold": 0.2, "deactivation_threshold": 0.5},
        {"max_utterance_sec": 1.0},
        {"max_utterance_sec": float("inf")},
        {"cut_search_sec": 40.0},
        {"padding_ms": True},
    ],
)
def test_bad_endpointing_options(kw):
    with pytest.raises(InvalidOptionError):
        EndpointingConfig(**kw)


def test_choose_cut_prefers_a_gap_between_words_to_a_closure_inside_one():
    """A stop consonant's closure (50 ms of silence between loud sounds, inside a word) is quieter over
    20 ms than the junction of two words (a 25 ms near-silence amid 150 ms of softer sound), but only
    the junction is quiet over the 100 ms around it: the cut goes there (the quietest 20 ms alone chose
    the closure, and cut the word in two)."""
    x = np.full(32000, 8000, np.int16)
    x[8000:8800] = 0  # closure, 8000..8800
    x[20000:22400] = 1000  # softer sound around the junction
    x[21000:21400] = 100  # the junction
    c = choose_cut(x, 0, 32000)
    assert 21000 <= c <= 21400, c
