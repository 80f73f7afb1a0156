"""Soak, churn and load runs on the real plugin path and engine, with memory over time.

    .venv/bin/python -m bench.reliability soak-stream   [--minutes 60] [--speed 12]
    .venv/bin/python -m bench.reliability soak-captioner [--participants 6] [--minutes 10]
    .venv/bin/python -m bench.reliability churn         [--cycles 1000]
    .venv/bin/python -m bench.reliability load          [--streams 8] [--seconds 90] [--preset 0.6b]
    .venv/bin/python -m bench.reliability engine-memory [--streams 6] [--minutes 6] [--mm-cache-gib 4]

Audio: slices (2-8 s) of the bundled espeak-ng speech separated by 1-2.5 s pauses, generated as it is
played (memory stays flat however long the run). Every run checks its own invariants and returns them
with the figures: `lost` lists utterances without a final, `leaks` what was left behind. Results go to
results/reliability/<run>.json; docs/reliability.md quotes them. tests/test_reliability_runs.py runs
the same functions, short, in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from livekit import rtc
from livekit.agents import stt as lk_stt

from livekit_qwen_asr import STT, TooManyStreamsError
from livekit_qwen_asr.allocator import loaded_allocator
from livekit_qwen_asr.captioner import RoomCaptioner
from livekit_qwen_asr.engine import EngineOptions, StepRequest, VLLMEngine, options_replace
from livekit_qwen_asr.features import HOP, split_windows
from livekit_qwen_asr.samples import bundled_speech_path, iter_frames, read_wav, upsample_to_stereo
from livekit_qwen_asr.synthetic import ensure_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.room_double import RoomDouble  # noqa: E402  (no LiveKit server here: see room_double.py)

SR = 16000
E = lk_stt.SpeechEventType


# -- audio and memory ------------------------------------------------------------------------------
def speech_segments(seed: int, total_s: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(speech, pause) pairs, 16 kHz mono int16, until `total_s` seconds of audio."""
    speech, rate, _ = read_wav(bundled_speech_path())
    assert rate == SR
    rng = np.random.default_rng(seed)
    played = 0.0
    while played < total_s:
        n = int(rng.uniform(2.0, 8.0) * SR)
        start = int(rng.integers(0, speech.shape[0] - n))
        pause = np.zeros(int(rng.uniform(1.0, 2.5) * SR), np.int16)
        played += (n + pause.shape[0]) / SR
        yield speech[start : start + n], pause


class MemorySampler:
    """RSS of this process and of its children (vLLM's EngineCore and workers), in MiB."""

    def __init__(self) -> None:
        self.samples: list[dict[str, float]] = []
        self._proc = psutil.Process()

    def sample(self, at: float, **extra: float) -> None:
        main = self._proc.memory_info().rss
        children = core = worker = 0
        for c in self._proc.children(recursive=True):
            try:
                rss, title = c.memory_info().rss, " ".join(c.cmdline())
            except psutil.Error:
                continue
            children += rss
            core += rss if "EngineCore" in title else 0  # vLLM names its processes (setproctitle)
            worker += rss if "Worker" in title else 0
        self.samples.append(
            {
                "at": round(at, 1),
                "main_mib": main / 2**20,
                "engine_mib": children / 2**20,
                "engine_core_mib": core / 2**20,
                "worker_mib": worker / 2**20,
                **extra,
            }
        )

    def growth(self, key: str = "main_mib", warmup: float = 0.2) -> float:
        """MiB gained between the end of the warm-up fraction and the end."""
        if len(self.samples) < 2:
            return 0.0
        start = self.samples[min(len(self.samples) - 1, int(len(self.samples) * warmup))]
        return self.samples[-1][key] - start[key]


class UtteranceLedger:
    """Checks the event order of one stream: every START_OF_SPEECH gets exactly one FINAL, and no
    INTERIM or FINAL of an utterance comes after its FINAL."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finals: dict[str, str] = {}
        self.interims = 0
        self.violations: list[str] = []

    def on_event(self, ev: lk_stt.SpeechEvent) -> None:
        rid = ev.request_id
        if ev.type == E.START_OF_SPEECH:
            self.started.append(rid)
        elif ev.type == E.INTERIM_TRANSCRIPT:
            self.interims += 1
            if rid in self.finals:
                self.violations.append(f"interim after the final of {rid}")
        elif ev.type == E.FINAL_TRANSCRIPT:
            if rid in self.finals:
                self.violations.append(f"second final for {rid}")
            self.finals[rid] = ev.alternatives[0].text if ev.alternatives else ""

    @property
    def lost(self) -> list[str]:
        return [rid for rid in self.started if rid not in self.finals]


def _stereo_frames(mono: np.ndarray) -> list[rtc.AudioFrame]:
    return list(iter_frames(upsample_to_stereo(mono), 48000, 2, (20.0,)))


def _feature_states(engine: Any) -> int:
    features = getattr(getattr(engine, "inner", engine), "_features", None)
    return len(features) if features is not None else 0


# -- soak: one stream ------------------------------------------------------------------------------
async def soak_stream(engine: Any, *, minutes: float, speed: float, seed: int = 0) -> dict[str, Any]:
    """`minutes` of audio through one STT stream (silero VAD on), pushed at `speed` x real time."""
    plugin = STT(engine=engine)
    stream = plugin.stream()
    ledger = UtteranceLedger()
    mem = MemorySampler()

    async def consume() -> None:
        async for ev in stream:
            ledger.on_event(ev)

    consumer = asyncio.create_task(consume())
    t0 = time.perf_counter()
    pos = 0.0  # audio seconds pushed
    segments = 0
    next_sample = 0.0
    for speech, pause in speech_segments(seed, minutes * 60):
        for part in (speech, pause):
            for f in _stereo_frames(part):
                stream.push_frame(f)
            pos += part.shape[0] / SR
            await asyncio.sleep(max(0.0, t0 + pos / speed - time.perf_counter()))  # source pacing
        segments += 1
        if pos >= next_sample:
            mem.sample(pos)
            next_sample += 60.0
    stream.end_input()
    await consumer
    await stream.aclose()
    mem.sample(pos)
    return {
        "audio_s": round(pos, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "speed": speed,
        "speech_segments": segments,
        "utterances": len(ledger.started),
        "finals": len(ledger.finals),
        "interims": ledger.interims,
        "lost": ledger.lost,
        "violations": ledger.violations,
        "engine_steps": engine.stats.steps,
        "feature_states_left": _feature_states(engine),
        "rss_growth_main_mib": round(mem.growth(), 1),
        "rss_growth_engine_mib": round(mem.growth("engine_mib"), 1),
        "memory": mem.samples,
    }


# -- the captioner ---------------------------------------------------------------------------------
class _Speaker:
    def __init__(self, room: RoomDouble, identity: str) -> None:
        self.room = room
        self.identity = identity
        self.source = rtc.AudioSource(SR, 1, queue_size_ms=100)
        self.track = rtc.LocalAudioTrack.create_audio_track(f"{identity}-mic", self.source)
        self.publication = None

    def join(self) -> None:
        participant = self.room.connect_participant(self.identity)
        self.publication = self.room.publish_track(participant, self.track)

    async def play(self, audio: np.ndarray) -> None:
        for frame in iter_frames(audio, SR, 1, (20.0,)):
            await self.source.capture_frame(frame)  # real-time pacing by the rtc source

    def leave(self, *, unpublish: bool = True) -> None:
        self.room.disconnect_participant(
            self.room.remote_participants[self.identity], unpublish_tracks=unpublish
        )

    async def aclose(self) -> None:
        await self.source.aclose()


async def soak_captioner(engine: Any, *, participants: int, minutes: float, seed: int = 0) -> dict[str, Any]:
    """`participants` speakers, each `minutes` of speech with pauses, in real time, through one
    RoomCaptioner: participants x minutes of audio captioned."""
    room = RoomDouble()
    plugin = STT(engine=engine)
    captioner = RoomCaptioner(room, plugin)
    captioner.start()
    mem = MemorySampler()
    said: collections.Counter[str] = collections.Counter()
    speakers = [_Speaker(room, f"speaker-{i}") for i in range(participants)]
    t0 = time.perf_counter()

    async def talk(i: int, sp: _Speaker) -> None:
        sp.join()
        for speech, pause in speech_segments(seed + i, minutes * 60):
            await sp.play(speech)
            said[sp.identity] += 1
            await sp.play(pause)

    async def sample_memory() -> None:
        while True:
            mem.sample(time.perf_counter() - t0)
            await asyncio.sleep(30)  # a periodic sample, not synchronisation

    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(talk(i, sp) for i, sp in enumerate(speakers)))
    for sp in speakers:
        sp.leave()
    await captioner.aclose()
    sampler.cancel()
    mem.sample(time.perf_counter() - t0)
    for sp in speakers:
        await sp.aclose()
    records = room.local_participant.closed_streams  # delivery order
    finals = collections.Counter(r.sender_identity for r in records if r.final)
    segments_by_id = collections.defaultdict(list)
    for r in records:
        segments_by_id[r.attributes["lk.segment_id"]].append(r.final)
    open_segments = [sid for sid, flags in segments_by_id.items() if not flags[-1]]
    revised = [sid for sid, flags in segments_by_id.items() if True in flags[:-1]]
    stats = captioner.stats
    return {
        "participants": participants,
        "audio_s": round(participants * minutes * 60, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "sentences_said": sum(said.values()),
        "finals_published": sum(finals.values()),
        "speakers_with_fewer_finals_than_pauses": [p for p in said if finals[p] < said[p]],
        "lost": open_segments,  # segments whose last caption is not final
        "violations": [f"caption after the final of {sid}" for sid in revised],
        "stream_errors": stats.stream_errors,
        "finish_timeouts": stats.finish_timeouts,
        "publish_errors": stats.publish_errors,
        "active_tracks_left": len(captioner.active_tracks),
        "open_streams_left": plugin.open_streams,
        "feature_states_left": _feature_states(engine),
        "rss_growth_main_mib": round(mem.growth(), 1),
        "rss_growth_engine_mib": round(mem.growth("engine_mib"), 1),
        "memory": mem.samples,
    }


# -- churn -----------------------------------------------------------------------------------------
async def churn(engine: Any, *, cycles: int, seed: int = 0) -> dict[str, Any]:
    """`cycles` participants join, speak (or not) for a moment and leave, one after another."""
    rng = np.random.default_rng(seed)
    speech, _, _ = read_wav(bundled_speech_path())
    room = RoomDouble()
    plugin = STT(engine=engine)
    captioner = RoomCaptioner(room, plugin)
    ended = asyncio.Event()
    captioner.on("track_ended", lambda info: ended.set())
    captioner.start()
    mem = MemorySampler()
    baseline_tasks = len(asyncio.all_tasks())
    warm_tasks = None
    t0 = time.perf_counter()
    for i in range(cycles):
        sp = _Speaker(room, f"p{i}")
        ended.clear()
        sp.join()
        n = int(rng.uniform(0.2, 0.6) * SR)
        start = int(rng.integers(0, speech.shape[0] - n))
        await sp.play(speech[start : start + n] if i % 2 == 0 else np.zeros(n, np.int16))
        sp.leave(unpublish=bool(rng.integers(0, 2)))  # with or without unpublish events first
        await asyncio.wait_for(ended.wait(), 60)
        await sp.aclose()
        if i == min(9, cycles - 1):
            warm_tasks = len(asyncio.all_tasks())
        if i % max(1, cycles // 20) == 0:
            mem.sample(i)
    mem.sample(cycles)
    end_tasks = len(asyncio.all_tasks())
    result = {
        "cycles": cycles,
        "wall_s": round(time.perf_counter() - t0, 1),
        "tracks_started": captioner.stats.tracks_started,
        "tracks_finished": captioner.stats.tracks_finished,
        "finals_published": captioner.stats.finals_published,
        "stream_errors": captioner.stats.stream_errors,
        "tasks_before": baseline_tasks,
        "tasks_after_warmup": warm_tasks,
        "tasks_after": end_tasks,
        "active_tracks_left": len(captioner.active_tracks),
        "finishing_left": len(captioner.finishing),
        "open_streams_left": plugin.open_streams,
        "feature_states_left": _feature_states(engine),
        "rss_growth_main_mib": round(mem.growth(), 1),
        "memory": mem.samples,
    }
    await captioner.aclose()
    result["leaks"] = [
        k
        for k, bad in (
            ("tasks", end_tasks > (warm_tasks or baseline_tasks)),
            ("tracks", result["active_tracks_left"] or result["finishing_left"]),
            ("streams", result["open_streams_left"]),
            ("engine state", result["feature_states_left"]),
        )
        if bad
    ]
    return result


# -- load --------------------------------------------------------------------------------------------
async def load(engine: Any, *, streams: int, seconds: float, seed: int = 0) -> dict[str, Any]:
    """`streams` real-time streams at once (more than the engine can serve, with a big model), with
    `max_streams=streams`: one more is refused. Lag = wall time behind the audio an interim covers."""
    plugin = STT(engine=engine, max_streams=streams)
    opened = [plugin.stream() for _ in range(streams)]
    try:
        plugin.stream()
        refused = ""
    except TooManyStreamsError as e:
        refused = str(e)
    mem = MemorySampler()
    ledgers = [UtteranceLedger() for _ in opened]
    lags: list[list[tuple[float, float]]] = [[] for _ in opened]
    t0 = time.perf_counter()

    async def feed(k: int, s) -> None:
        pos = 0.0
        for speech, pause in speech_segments(seed + k, seconds):
            for part in (speech, pause):
                for f in _stereo_frames(part):
                    s.push_frame(f)
                pos += part.shape[0] / SR
                await asyncio.sleep(max(0.0, t0 + pos - time.perf_counter()))  # real time
        s.end_input()

    async def consume(k: int, s) -> None:
        async for ev in s:
            ledgers[k].on_event(ev)
            if ev.type == E.INTERIM_TRANSCRIPT and ev.alternatives:
                now = time.perf_counter() - t0
                lags[k].append((round(now, 2), round(now - ev.alternatives[0].end_time, 2)))

    async def sample_memory() -> None:
        while True:
            mem.sample(time.perf_counter() - t0)
            await asyncio.sleep(5)

    sampler = asyncio.create_task(sample_memory())
    steps0 = engine.stats.steps
    await asyncio.gather(
        *(feed(k, s) for k, s in enumerate(opened)), *(consume(k, s) for k, s in enumerate(opened))
    )
    sampler.cancel()
    mem.sample(time.perf_counter() - t0)
    for s in opened:
        await s.aclose()
    all_lags = [lag for per in lags for _, lag in per]
    return {
        "streams": streams,
        "audio_s_per_stream": seconds,
        "wall_s": round(time.perf_counter() - t0, 1),
        "refused_extra_stream": refused,
        "engine_steps": engine.stats.steps - steps0,
        "chunks_if_one_step_per_chunk": int(streams * seconds / 2.0),
        "max_in_flight": engine.stats.max_in_flight,
        "lag_p50_s": round(float(np.percentile(all_lags, 50)), 2) if all_lags else None,
        "lag_max_s": round(max(all_lags), 2) if all_lags else None,
        "lag_over_time": lags,
        "utterances": sum(len(led.started) for led in ledgers),
        "finals": sum(len(led.finals) for led in ledgers),
        "lost": [rid for led in ledgers for rid in led.lost],
        "violations": [v for led in ledgers for v in led.violations],
        "open_streams_left": plugin.open_streams,
        "rss_growth_main_mib": round(mem.growth(), 1),
        "memory": mem.samples,
    }


# -- engine memory: the EngineCore's multimodal cache ------------------------------------------------
async def engine_memory(
    engine: Any, *, streams: int, minutes: float, min_new_item_mib: float = 0.0, seed: int = 0
) -> dict[str, Any]:
    """`streams` rollback loops straight on the engine, as fast as it serves them, for `minutes` and
    until at least `min_new_item_mib` of new items were sent (a slow machine runs longer, not less):
    each utterance grows by a 2 s chunk per step up to 2-30 s, then the next one starts. The audio is
    noise at random offsets, so every step's open-window item is new: the worst case for vLLM's
    multimodal processor cache, which keeps new items in the EngineCore until `mm_cache_gib` is full.
    RSS per vLLM process against steps and against the bytes of new items sent."""
    rng = np.random.default_rng(seed)
    noise = (rng.standard_normal(40 * SR) * 0.1).astype(np.float32)
    prompt = engine.base_prompt("")
    mem = MemorySampler()
    steps = 0
    new_item_bytes = 0  # the open window's features (128 mel x frames, float32), new every step
    t0 = time.perf_counter()
    stop = t0 + minutes * 60

    def running() -> bool:
        return time.perf_counter() < stop or new_item_bytes < min_new_item_mib * 2**20

    async def loop(k: int) -> None:
        nonlocal steps, new_item_bytes
        r = np.random.default_rng(seed + 1 + k)
        u = 0
        while running():
            sid, u = f"mem{k}-{u}", u + 1
            start = int(r.integers(0, SR))
            for chunk in range(1, int(r.integers(1, 16)) + 1):
                audio = noise[start : start + chunk * 2 * SR - int(r.integers(0, SR // 2))]
                await engine.step(StepRequest(prompt, audio, 16, sid))
                steps += 1
                new_item_bytes += 128 * 4 * split_windows(audio.shape[0] // HOP)[-1]  # the open item
                if not running():
                    break
            engine.release_stream(sid)

    async def sample_memory() -> None:
        while True:
            mem.sample(time.perf_counter() - t0, steps=steps, new_item_mib=new_item_bytes / 2**20)
            await asyncio.sleep(max(2.0, minutes * 60 / 40))

    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(loop(k) for k in range(streams)))
    sampler.cancel()
    mem.sample(time.perf_counter() - t0, steps=steps, new_item_mib=new_item_bytes / 2**20)
    first, last = mem.samples[0], mem.samples[-1]
    half = mem.samples[len(mem.samples) // 2]
    return {
        "streams": streams,
        "wall_s": round(time.perf_counter() - t0, 1),
        "steps": steps,
        "new_item_mib": round(new_item_bytes / 2**20, 1),
        "engine_core_growth_mib": round(last["engine_core_mib"] - first["engine_core_mib"], 1),
        "engine_core_growth_second_half_mib": round(last["engine_core_mib"] - half["engine_core_mib"], 1),
        "worker_growth_mib": round(last["worker_mib"] - first["worker_mib"], 1),
        "worker_growth_second_half_mib": round(last["worker_mib"] - half["worker_mib"], 1),
        "rss_growth_main_mib": round(mem.growth(), 1),
        "feature_states_left": _feature_states(engine),
        "memory": mem.samples,
    }


# -- CLI ---------------------------------------------------------------------------------------------
async def _main(args: argparse.Namespace) -> dict[str, Any]:
    model = str(ensure_checkpoint(args.preset))
    options = EngineOptions(model=model, max_model_len=8192, kv_cache_gib=args.kv_cache_gib)
    if args.mm_cache_gib is not None:
        options = options_replace(options, mm_cache_gib=args.mm_cache_gib)
    engine = await VLLMEngine.start(options)
    try:
        if args.run == "soak-stream":
            result = await soak_stream(engine, minutes=args.minutes, speed=args.speed)
        elif args.run == "soak-captioner":
            result = await soak_captioner(engine, participants=args.participants, minutes=args.minutes)
        elif args.run == "engine-memory":
            result = await engine_memory(engine, streams=args.streams, minutes=args.minutes)
        elif args.run == "churn":
            result = await churn(engine, cycles=args.cycles)
        else:
            result = await load(engine, streams=args.streams, seconds=args.seconds)
    finally:
        await engine.aclose()
    return {
        "run": args.run,
        "preset": args.preset,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "allocator": loaded_allocator(),  # vLLM's processes are forked from this one: the same
        "mm_cache_gib": options.mm_cache_gib,
        **result,
    }


FIGURES_START, FIGURES_END = "<!-- figures:start -->", "<!-- figures:end -->"


def render_figures(results_dir: Path) -> str:
    """The figures table of docs/reliability.md, from the runs' JSON files (no number typed by hand)."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    rows = [
        "| run | size | wall | finals / utterances | lost | leaks / violations | memory |",
        "|---|---|---|---|---|---|---|",
    ]

    def mem(r: dict[str, Any]) -> str:
        samples = r.get("memory") or []
        if not samples:
            return ""
        first = samples[min(len(samples) - 1, len(samples) // 5)]  # after a 20 % warm-up
        last = samples[-1]
        text = (
            f"main RSS {first['main_mib']:.0f} -> {last['main_mib']:.0f} MiB "
            f"(peak {max(x['main_mib'] for x in samples):.0f})"
        )
        if last.get("engine_mib"):
            text += f"; vLLM processes {first['engine_mib']:.0f} -> {last['engine_mib']:.0f} MiB"
        text += f" ({len(samples)} samples, from 20 % of the run to its end"
        text += (
            f"; {r['allocator']} malloc, `mm_cache_gib={r['mm_cache_gib']:g}`)"
            if "allocator" in r
            else ("; run before the cap: glibc malloc, vLLM's 4 GiB multimodal cache)")
        )
        if "worker_mib" in last and len(samples) >= 8:
            # per process, growth in each quarter of the run: levelling off shows as shrinking steps
            q = [samples[round(i * (len(samples) - 1) / 4)] for i in range(5)]
            for key, label in (("engine_core_mib", "EngineCore"), ("worker_mib", "worker")):
                steps = " / ".join(f"{b[key] - a[key]:+.0f}" for a, b in zip(q, q[1:], strict=False))
                text += f"; {label} {q[0][key]:.0f} -> {q[-1][key]:.0f} MiB, by quarter {steps}"
            return text
        window = samples[len(samples) // 5 :]
        if len(window) >= 5 and window[-1]["at"] > window[0]["at"] and r["run"] != "load":
            at = np.array([x["at"] for x in window])
            unit, per = ("h of audio", 3600.0) if r["run"] == "soak-stream" else ("", 0.0)
            if r["run"] == "churn":
                unit, per = "1000 cycles", 1000.0
            elif r["run"] == "soak-captioner":
                unit, per = "h", 3600.0
            slopes = [np.polyfit(at, [x[k] for x in window], 1)[0] * per for k in ("main_mib", "engine_mib")]
            text += f"; trend {slopes[0]:+.0f} / {slopes[1]:+.0f} MiB per {unit}"
        return text

    if r := runs.get("soak-stream"):
        rows.append(
            f"| soak, one stream ({r['measured_at'][:10]}) | {r['audio_s'] / 3600:.2f} h of audio, "
            f"{r['speech_segments']} spoken segments, VAD on | {r['wall_s'] / 60:.1f} min "
            f"({r['audio_s'] / r['wall_s']:.1f}x real time) | {r['finals']} / {r['utterances']} "
            f"| {len(r['lost'])} | {len(r['violations'])} order violations, "
            f"{r['feature_states_left']} engine states left | {mem(r)} |"
        )
    if r := runs.get("soak-captioner"):
        rows.append(
            f"| soak, captioner ({r['measured_at'][:10]}) | {r['participants']} speakers x "
            f"{r['audio_s'] / r['participants'] / 60:.0f} min = {r['audio_s'] / 3600:.2f} h of audio, "
            f"{r['sentences_said']} sentences with pauses | {r['wall_s'] / 60:.1f} min (real time) | "
            f"{r['finals_published']} finals published for {r['sentences_said']} sentences "
            f"| {len(r['lost'])} | {len(r['violations'])} captions after a final; "
            f"{r['stream_errors']} stream errors, {r['finish_timeouts']} finish timeouts, "
            f"{r['active_tracks_left']} tracks / {r['open_streams_left']} streams / "
            f"{r['feature_states_left']} engine states left | {mem(r)} |"
        )
    if r := runs.get("churn"):
        rows.append(
            f"| churn, captioner ({r['measured_at'][:10]}) | {r['cycles']} join / speak-or-not / "
            f"leave cycles | {r['wall_s'] / 60:.1f} min | {r['finals_published']} finals, "
            f"{r['tracks_finished']} of {r['tracks_started']} tracks finished | 0 "
            f"| leaks: {', '.join(r['leaks']) or 'none'} (asyncio tasks {r['tasks_before']} before, "
            f"{r['tasks_after_warmup']} after 10 cycles, {r['tasks_after']} after all) | {mem(r)} |"
        )
    if r := runs.get("load"):
        rows.append(
            f"| load, {r['preset']} ({r['measured_at'][:10]}) | {r['streams']} real-time streams x "
            f"{r['audio_s_per_stream']:.0f} s, `max_streams={r['streams']}` (one more refused: "
            f'"{r["refused_extra_stream"]}") | {r["wall_s"]:.0f} s | {r["finals"]} / {r["utterances"]} '
            f"| {len(r['lost'])} | {len(r['violations'])} order violations; {r['engine_steps']} steps for "
            f"{r['chunks_if_one_step_per_chunk']} chunks (coalesced), interim lag p50 {r['lag_p50_s']} s, "
            f"max {r['lag_max_s']} s | {mem(r)} |"
        )
    for name in sorted(runs, key=lambda n: (n != "engine-memory", n)):  # the current setup first
        if runs[name].get("run") == "engine-memory":
            rows.append(_engine_memory_row(runs[name]))
    return "\n".join(rows)


def _engine_memory_row(r: dict[str, Any]) -> str:
    first, half, last = r["memory"][0], r["memory"][len(r["memory"]) // 2], r["memory"][-1]
    return (
        f"| engine memory, {r['allocator']} malloc, `mm_cache_gib={r['mm_cache_gib']:g}` "
        f"({r['measured_at'][:10]}) | {r['streams']} rollback loops straight on the engine, as fast as "
        f"it serves them; {r['steps']} steps, {r['new_item_mib'] / 1024:.2f} GiB of new audio items "
        f"| {r['wall_s'] / 60:.1f} min | - | - | {r['feature_states_left']} engine states left "
        f"| EngineCore {first['engine_core_mib']:.0f} -> {half['engine_core_mib']:.0f} (half-way) -> "
        f"{last['engine_core_mib']:.0f} MiB; worker {first['worker_mib']:.0f} -> "
        f"{half['worker_mib']:.0f} -> {last['worker_mib']:.0f} MiB; main {first['main_mib']:.0f} -> "
        f"{last['main_mib']:.0f} MiB |"
    )


def write_report(results_dir: Path, doc: Path) -> None:
    text = doc.read_text()
    head, rest = text.split(FIGURES_START, 1)
    _, tail = rest.split(FIGURES_END, 1)
    doc.write_text(f"{head}{FIGURES_START}\n{render_figures(results_dir)}\n{FIGURES_END}{tail}")


def main() -> None:
    if sys.argv[1:2] == ["report"]:
        write_report(Path("results/reliability"), Path("docs/reliability.md"))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", choices=["soak-stream", "soak-captioner", "churn", "load", "engine-memory"])
    p.add_argument("--preset", default=None, help="synthetic checkpoint: tiny (default) or 0.6b (load)")
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--speed", type=float, default=12.0)
    p.add_argument("--participants", type=int, default=6)
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--streams", type=int, default=None, help="load: 8, engine-memory: 6")
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="vLLM KV cache (CPU default 2 GiB)")
    p.add_argument("--mm-cache-gib", type=float, default=None, help="EngineOptions.mm_cache_gib")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.preset = args.preset or ("0.6b" if args.run == "load" else "tiny")
    args.streams = args.streams or (8 if args.run == "load" else 6)
    if args.minutes is None:
        args.minutes = 60.0 if args.run == "soak-stream" else 10.0
    result = asyncio.run(_main(args))
    out = Path(args.out or f"results/reliability/{args.run}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    brief = {k: v for k, v in result.items() if k not in ("memory", "lag_over_time")}
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
