"""What the remote engine costs: the same streams, the same checkpoint, in one run, through the
in-process engine (`VLLMEngine`, window reuse on) and through vLLM's own server (`VLLMServerEngine`:
the chat path, then encoder windows over /inference/v1/generate), with 1 and 4 concurrent streams.

    .venv/bin/python -m bench.remote_latency --preset tiny --seconds 30 --streams 1,4

Every stream runs the rollback loop back to back over its own copy of the bundled speech (2 s chunks,
the plugin's defaults), so a stream's steps follow each other without pacing: step latency and total
step time compare the engines, not the audio clock. The two engines run one after the other (never
together) on the same machine. Random weights never stop on their own, so each step generates
--max-new-tokens tokens. Writes results/remote-<preset>/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from bench.doc_blocks import replace_block
from bench.run import percentile
from bench.vllm_server import ServerProcess
from livekit_qwen_asr.engine import EngineOptions, StepRequest, VLLMEngine
from livekit_qwen_asr.remote import VLLMServerEngine
from livekit_qwen_asr.samples import bundled_speech_path, read_wav
from livekit_qwen_asr.streaming import StreamingConfig, StreamingTranscriber
from livekit_qwen_asr.synthetic import ensure_checkpoint

SR = 16000


async def one_stream(engine, audio: np.ndarray, sid: str, max_new: int) -> list[dict]:
    t = StreamingTranscriber(StreamingConfig(), engine.codec, engine.base_prompt)
    t.push_audio(audio)
    steps = []
    while (plan := t.next_step()) is not None or (plan := t.finish_step()) is not None:
        r = await engine.step(StepRequest(plan.prompt, plan.audio, max_new, sid))
        t.apply(plan, r.text)
        steps.append(
            {
                "wall_s": r.finished_at - r.started_at,
                "prompt_tokens": r.prompt_tokens,
                "cached": r.cached_tokens,
                "audio_s": r.audio_seconds,
                "encoded_s": r.encoded_seconds,
            }
        )
        if plan.final:
            break
    engine.release_stream(sid)
    return steps


async def run_streams(engine, audio: np.ndarray, n: int, max_new: int) -> dict:
    # warm-up: the first request pays one-off costs
    await one_stream(engine, audio[: 4 * SR], "warmup", max_new)
    t0 = time.perf_counter()
    # every stream of every run its own audio (the speech rotated), so no stream's prompt is a cache hit
    # left by another stream or an earlier run: the hits measured are the stream's own
    per_stream = await asyncio.gather(
        *(
            one_stream(engine, np.roll(audio, (n * 7 + i) * 3 * SR // 2), f"s{n}-{i}", max_new)
            for i in range(n)
        )
    )
    total = time.perf_counter() - t0
    walls = [s["wall_s"] for steps in per_stream for s in steps]
    prompt = sum(s["prompt_tokens"] for steps in per_stream for s in steps)
    cached = sum(s["cached"] for steps in per_stream for s in steps)
    return {
        "streams": n,
        "steps": len(walls),
        "step_p50_s": round(percentile(walls, 50), 4),
        "step_p95_s": round(percentile(walls, 95), 4),
        "step_time_sum_s": round(sum(walls), 3),
        "wall_s": round(total, 3),
        "cached_token_share": round(cached / prompt, 4) if prompt else 0.0,
        # audio whose tokens lay past the prefix-cache hit: encoded (and prefilled) again
        "encoded_audio_share": round(
            sum(s["encoded_s"] for st in per_stream for s in st)
            / sum(s["audio_s"] for st in per_stream for s in st),
            4,
        ),
    }


async def amain(args: argparse.Namespace) -> dict:
    ckpt = ensure_checkpoint(args.preset)
    speech, _, _ = read_wav(bundled_speech_path())
    reps = int(np.ceil(args.seconds * SR / len(speech)))
    audio = (np.tile(speech, reps)[: int(args.seconds * SR)] / 32768).astype(np.float32)
    streams = [int(x) for x in args.streams.split(",")]
    results: dict = {
        "preset": args.preset,
        "machine": f"{platform.machine()} cpus={os.cpu_count()}",
        "audio_seconds_per_stream": args.seconds,
        "max_new_tokens": args.max_new_tokens,
        "dtype": "float32",
        "modes": {},
    }

    engine = await VLLMEngine.start(
        EngineOptions(model=str(ckpt), dtype="float32", kv_cache_gib=args.kv_cache_gib, max_model_len=8192)
    )
    try:
        results["in_process_reuses_windows"] = engine.reuses_windows
        results["modes"]["in_process"] = [
            await run_streams(engine, audio, n, args.max_new_tokens) for n in streams
        ]
    finally:
        await engine.aclose()

    server = ServerProcess(ckpt, args.out / "server.log", kv_cache_gib=args.kv_cache_gib, max_model_len=8192)
    server.start()
    try:
        for mode, reuse in (("remote_chat", False), ("remote_windows", True)):
            remote = await VLLMServerEngine.start(server.url, reuse_windows=reuse)
            try:
                if remote.reuses_windows != reuse:
                    raise SystemExit(f"{mode}: the server's window probe failed (see the log)")
                results["modes"][mode] = [
                    await run_streams(remote, audio, n, args.max_new_tokens) for n in streams
                ]
                if reuse:
                    results["remote_windows_items"] = remote.window_stats
            finally:
                await remote.aclose()
    finally:
        server.stop()

    results["remote_over_in_process"] = {
        mode: [
            {
                "streams": a["streams"],
                "step_p50": round(b["step_p50_s"] / a["step_p50_s"], 2),
                "step_time_sum": round(b["step_time_sum_s"] / a["step_time_sum_s"], 2),
            }
            for a, b in zip(results["modes"]["in_process"], results["modes"][mode], strict=True)
        ]
        for mode in ("remote_chat", "remote_windows")
    }
    return results


def table(results: dict) -> str:
    rows = [
        "| mode | streams | steps | step p50 (s) | step p95 (s) | step time, sum (s) | wall (s) "
        "| cached prompt share | audio encoded again |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, runs in results["modes"].items():
        for r in runs:
            rows.append(
                f"| {mode} | {r['streams']} | {r['steps']} | {r['step_p50_s']:.3f} | {r['step_p95_s']:.3f} "
                f"| {r['step_time_sum_s']:.1f} | {r['wall_s']:.1f} | {r['cached_token_share']:.0%} "
                f"| {r['encoded_audio_share']:.0%} |"
            )
    return "\n".join(rows)


BEGIN, END = "<!-- remote-bench:begin -->", "<!-- remote-bench:end -->"
DOCS = Path(__file__).resolve().parents[1] / "docs"
# every doc with the markers gets the block (the template too, so bench/report keeps it)
DOC_FILES = ("deployment.md", "performance.md", "performance.template.md")


def render(results: dict, docs: Path = DOCS, source: str = "") -> None:
    """Put this run's table and ratios between the markers in docs/deployment.md and performance.md."""
    ratios = " ".join(
        f"{mode}: "
        + "; ".join(
            f"{r['streams']} stream(s): step p50 x{r['step_p50']}, total step time x{r['step_time_sum']}"
            for r in runs
        )
        + "."
        for mode, runs in results["remote_over_in_process"].items()
    )
    items = results["remote_windows_items"]
    block = "\n".join(
        [
            BEGIN,
            f"Measured with `python -m bench.remote_latency --preset {results['preset']} --seconds "
            f"{results['audio_seconds_per_stream']:g} --streams "
            f"{','.join(str(r['streams']) for r in results['modes']['in_process'])}` on "
            f"{results['machine']}, {results['dtype']}, {results['max_new_tokens']} new tokens per step"
            f" (in-process window reuse: {results['in_process_reuses_windows']}){source}:",
            "",
            table(results),
            "",
            f"Remote over in-process, {ratios}",
            "",
            f"Encoder windows over HTTP: {items['items_by_reference']} windows went by hash only (served "
            f"from the server's caches), {items['items_with_data']} with their data, "
            f"{items['resent_steps']} steps re-sent after a cache miss.",
            END,
        ]
    )
    replace_block(docs, DOC_FILES, BEGIN, END, block)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.6b"])
    ap.add_argument("--seconds", type=float, default=30.0, help="audio per stream")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--render", action="store_true", help="also update docs/deployment.md")
    ap.add_argument("--render-only", type=Path, help="re-render the docs from this results.json, run nothing")
    args = ap.parse_args(argv)
    if args.render_only:
        kept = args.render_only
        render(json.loads(kept.read_text()), source=f"; results in `docs/perf/{kept.name}`")
        return
    args.out = args.out or Path("results") / f"remote-{args.preset}"
    args.out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(amain(args))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    print(json.dumps(results["remote_over_in_process"]))
    print("wrote", args.out / "results.json")
    if args.render:
        kept = DOCS / "perf" / f"remote-{args.preset}.json"  # the committed copy the docs cite
        kept.write_text(json.dumps(results, indent=1))
        render(results, source=f"; results in `docs/perf/{kept.name}`")
        print("rendered", ", ".join(DOC_FILES))


if __name__ == "__main__":
    main()
