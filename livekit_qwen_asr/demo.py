"""Main job: stream a speech recording through the real plugin path and print live captions.

    python -m livekit_qwen_asr.demo [--model ID_OR_PATH] [--wav FILE] [--speed 1.0] [--language en]

Path: WAV -> 48 kHz stereo `rtc.AudioFrame`s (as WebRTC delivers them), paced at `--speed` x real time
-> `STT.stream()` (downmix, resample, rollback streaming) -> the vLLM engine. Interims are redrawn in
place; finals are printed as lines with timings. The default model is Qwen/Qwen3-ASR-0.6B; when it
cannot be loaded (no hub access, not cached) the demo says so and falls back to the small test model
trained in this repository on synthetic English speech (livekit_qwen_asr.test_model; labelled as such,
it is not Qwen3-ASR-0.6B), streams its in-domain recording and prints the reference and the WER of the
finals. Without that model file it falls back to the tiny random-weight checkpoint, whose output is
random tokens, never a transcription.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from livekit.agents import stt as lk_stt

from .engine import DEFAULT_MODEL, EngineOptions, VLLMEngine
from .samples import bundled_speech_path, iter_frames, read_wav, upsample_to_stereo, word_error_rate
from .stt import STT
from .test_model import TEST_MODEL_LABEL, TestModelUnavailableError

BANNER = """\
================================================================================
 SYNTHETIC MODEL: {reason}
 Using a random-weight checkpoint with the real Qwen3-ASR layout and vocabulary.
 Its output is random tokens, NOT a transcription. The pipeline is real.
================================================================================"""

TEST_MODEL_BANNER = """\
================================================================================
 TEST MODEL: {reason}
 Using the {label}
 ({steps} training steps, {cpu_h} CPU hours; held-out WER at its last evaluation: {wer}).
 It knows {words} English words spoken by espeak-ng; real speech is outside its domain.
================================================================================"""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def resolve_model(model: str) -> tuple[str, str | None]:
    """(model to load, why it is a fallback or None). Falls back to the trained test model, or to the
    tiny synthetic checkpoint when this install has no test model file."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser()), None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model), None
    except Exception as e:  # no hub here: say so, then fall back
        reason = f"{model} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    try:
        from .test_model import ensure_test_model

        return str(ensure_test_model()), reason
    except TestModelUnavailableError as e:
        from .synthetic import ensure_checkpoint

        return str(ensure_checkpoint("tiny")), f"{reason}; {e}"


def trained_model_banner(model: str, reason: str | None) -> str:
    import json

    trained = json.loads((Path(model) / "config.json").read_text())["test_model"]["trained"]
    last = trained.get("last_eval", {})
    wer = f"{last['test_wer']:.0%}" if "test_wer" in last else "not evaluated"
    return TEST_MODEL_BANNER.format(
        reason=reason or f"{model} is the test model",
        label=TEST_MODEL_LABEL,
        steps=trained.get("steps", "?"),
        cpu_h=trained.get("cpu_h", "?"),
        words=trained.get("words", "a few hundred"),
        wer=wer,
    )


async def run(args: argparse.Namespace) -> int:
    model, reason = resolve_model(args.model)
    if reason is None and args.model != model:
        print(f"model: {args.model} ({model})")
    t0 = time.perf_counter()
    print(f"starting vLLM engine for {model} ...", flush=True)
    engine = await VLLMEngine.start(EngineOptions(model=model, max_model_len=args.max_model_len))
    print(f"engine ready in {engine.startup_s:.1f} s", flush=True)
    from .test_model import is_test_model

    test_model = is_test_model(model)
    if engine.is_synthetic:
        print(BANNER.format(reason=reason or f"{model} is a synthetic checkpoint"), flush=True)
    elif test_model:
        print(trained_model_banner(model, reason), flush=True)
    wav = args.wav or str(test_model_speech_path() if test_model else bundled_speech_path())
    reference = _reference_for(wav)
    if reference:
        print(f"reference: {reference}", flush=True)

    data, rate, channels = read_wav(wav)
    mono = data if channels == 1 else data.reshape(-1, channels).mean(axis=1).astype(data.dtype)
    stereo48 = upsample_to_stereo(mono, rate)
    plugin = STT(engine=engine, language=args.language, context=args.context)
    stream = plugin.stream()
    frames = list(iter_frames(stereo48, 48000, 2, (20.0,)))
    audio_s = len(mono) / rate
    print(f"streaming {wav} ({audio_s:.1f} s, 48 kHz stereo frames) at {args.speed}x real time\n")

    t_start = time.perf_counter()

    async def feed() -> None:
        for i, f in enumerate(frames):
            stream.push_frame(f)
            due = t_start + (i + 1) * 0.020 / args.speed
            await asyncio.sleep(max(0.0, due - time.perf_counter()))  # real-time pacing of the source
        stream.end_input()

    feeder = asyncio.create_task(feed())
    tag = "[synthetic] " if engine.is_synthetic else ("[test model] " if test_model else "")
    final_texts: list[str] = []
    tty = sys.stdout.isatty()
    clear = "\r\x1b[2K" if tty else ""
    width = os.get_terminal_size().columns if tty else 200
    finals = 0
    async for ev in stream:
        now = time.perf_counter() - t_start
        if ev.type == lk_stt.SpeechEventType.INTERIM_TRANSCRIPT:
            line = f"  {now:6.2f}s interim {tag}{_one_line(ev.alternatives[0].text)}"
            # a terminal redraws the interim in place; a log gets one line per interim
            sys.stdout.write(f"\r\x1b[2K{line[: width - 1]}" if tty else f"{line[:width]}\n")
            sys.stdout.flush()
        elif ev.type == lk_stt.SpeechEventType.FINAL_TRANSCRIPT:
            a = ev.alternatives[0]
            finals += 1
            final_texts.append(a.text)
            lag = max(0.0, now - audio_s / args.speed)
            sys.stdout.write(
                f"{clear}  {now:6.2f}s FINAL   {tag}[{a.start_time:.2f}-{a.end_time:.2f}s, "
                f"lang={a.language or '?'}, {lag:.2f}s after audio end] {_one_line(a.text)}\n"
            )
        elif ev.type == lk_stt.SpeechEventType.RECOGNITION_USAGE:
            u = ev.recognition_usage
            print(
                f"  usage: {u.audio_duration:.2f} s audio, "
                f"{u.input_tokens} prompt / {u.output_tokens} generated tokens"
            )
    await feeder
    st = engine.stats
    mean_ms = 1000 * sum(b - a for _, a, b in st.recent) / max(1, st.steps)
    total_s = time.perf_counter() - t0
    print(f"\n{st.steps} engine steps, mean {mean_ms:.0f} ms; {finals} final(s); total {total_s:.1f} s")
    if reference:
        hyp = " ".join(final_texts)
        print(f"reference: {reference}\nfinals:    {_one_line(hyp)}")
        print(f"WER of the finals: {word_error_rate(reference, hyp):.1%}")
    await engine.aclose()
    return 0 if finals else 1


def test_model_speech_path() -> Path:
    return bundled_speech_path().with_name("test_model_speech.wav")


def _reference_for(wav: str) -> str | None:
    """The reference text of a recording: `<name>.txt`, or the bundled recordings' `<name>.json`."""
    import json

    path = Path(wav)
    if path.with_suffix(".txt").is_file():
        return _one_line(path.with_suffix(".txt").read_text(encoding="utf-8"))
    if path.with_suffix(".json").is_file():
        return _one_line(json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["text"])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("QWEN_ASR_MODEL", DEFAULT_MODEL))
    p.add_argument(
        "--wav",
        default=None,
        help="16-bit PCM WAV (default: the bundled recording; with the test model, its in-domain one). "
        "A reference transcript beside it (same name, .txt) gets its WER printed",
    )
    p.add_argument("--speed", type=float, default=1.0, help="pace relative to real time (default 1.0)")
    p.add_argument("--language", default=None, help="force a language, e.g. en; default auto-detect")
    p.add_argument("--context", default="", help="context text (names, topic) for the system prompt")
    p.add_argument("--max-model-len", type=int, default=8192)
    args = p.parse_args(argv)
    if args.speed <= 0:
        p.error("--speed must be > 0")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
