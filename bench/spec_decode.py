"""Speculative decoding with the previous hypothesis as the draft (issue #15): what it saves, counted
in vLLM's own terms (forward passes, drafts proposed and accepted, generated and prefill tokens).

1. **Trained test model** (the model stops by itself and consecutive steps mostly agree, so drafts
   behave as with a real model): held-out recordings streamed one utterance each at the plugin
   defaults, on two engines alike but for `speculative_tokens`. Finals and generated tokens must be
   identical; per step: forward passes, drafts, accepted tokens, prefill tokens, encoder seconds, wall.
2. **0.6B-shaped checkpoint** (random weights, real compute): the cost of a forward pass. Each step of
   a streamed utterance is run with its prompt fully cached (a warm-up call first), so what is timed
   is decoding: once plainly (one pass per token) and once with its own output as the draft (every
   draft token accepted: the upper bound). Gives ms per decode pass, ms per verification pass, and the
   decode time a step saves at the pass reduction part 1 measured.

    python -m bench.spec_decode --heldout results/heldout/test --files 40 --tokens 8
    (`bash scripts/fidelity.sh` writes results/heldout; the run re-renders docs/performance.md's block)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.doc_blocks import replace_block
from bench.fidelity import dataset, load_audio, wer
from livekit_qwen_asr.engine import EngineOptions, StepRequest, VLLMEngine
from livekit_qwen_asr.streaming import SAMPLE_RATE, StreamingConfig, StreamingTranscriber
from livekit_qwen_asr.stt import step_token_budget

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- spec-decode:begin -->", "<!-- spec-decode:end -->"
DOC_FILES = ("performance.md", "performance.template.md")


async def _measured_step(engine: VLLMEngine, request: StepRequest) -> dict[str, Any]:
    """One step's text, wall time and vLLM counts (steps run one at a time, so the engine-wide counts
    around a step are that step's)."""
    before = engine.pass_counts
    r = await engine.step(request)
    counts = engine.pass_counts.minus(before)
    return {"text": r.text, "wall_s": r.wall_s, "encoded_s": r.encoded_seconds, **counts.__dict__}


async def utterance_steps(
    engine: VLLMEngine, audio: np.ndarray, sid: str
) -> tuple[list[dict[str, Any]], str]:
    """Stream one utterance at the plugin defaults, each step with its draft: the measured steps and
    the final text."""
    t = StreamingTranscriber(StreamingConfig(), engine.codec, engine.base_prompt)
    t.push_audio(audio)
    steps = []
    while (plan := t.next_step()) is not None or (plan := t.finish_step()) is not None:
        budget = step_token_budget(plan, 64)
        step = await _measured_step(
            engine, StepRequest(plan.prompt, plan.audio, budget, sid, draft=plan.draft)
        )
        t.apply(plan, step["text"])
        steps.append(step)
        if plan.final:
            break
    engine.release_stream(sid)
    return steps, t.finalize().text


def _summary(steps: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    n = len(steps)

    def total(k: str) -> float:
        return float(sum(s[k] for s in steps))

    walls = [s["wall_s"] for s in steps]
    return {
        "steps": n,
        "forward_passes_per_step": total("forward_passes") / n,
        "generated_tokens_per_step": total("generation_tokens") / n,
        "prefill_tokens_per_step": total("prefill_tokens") / n,
        "encoded_s_per_step": total("encoded_s") / n,
        "drafts_per_step": total("drafts") / n,
        "drafts": int(total("drafts")),
        "draft_tokens": int(total("draft_tokens")),
        "accepted_tokens": int(total("accepted_tokens")),
        "acceptance": total("accepted_tokens") / total("draft_tokens") if total("draft_tokens") else None,
        "step_p50_s": float(np.percentile(walls, 50)),
        "step_p95_s": float(np.percentile(walls, 95)),
        "wall_s": wall_s,
    }


async def trained_model_run(model: str, files: list, tokens: int) -> dict[str, Any]:
    """Part 1: both modes over the same recordings; identical finals required."""
    modes: dict[str, Any] = {}
    finals: dict[str, list[str]] = {}
    audio = [load_audio(wav) for wav, _ref, _words in files]
    for name, spec in (("plain", 0), ("drafted", tokens)):
        engine = await VLLMEngine.start(
            EngineOptions(model=model, dtype="float32", max_model_len=2048, speculative_tokens=spec)
        )
        try:
            steps: list[dict[str, Any]] = []
            finals[name] = []
            t0 = time.perf_counter()
            for i, a in enumerate(audio):
                s, final = await utterance_steps(engine, a, f"u{i}")
                finals[name].append(final)
                steps += s
            modes[name] = _summary(steps, time.perf_counter() - t0)
        finally:
            await engine.aclose()
    refs = [ref for _w, ref, _x in files]
    p, d = modes["plain"], modes["drafted"]
    return {
        "files": len(files),
        "audio_s": sum(a.shape[0] for a in audio) / SAMPLE_RATE,
        "identical_finals": finals["plain"] == finals["drafted"],
        "wer": wer(refs, finals["drafted"]),
        "modes": modes,
        "pass_ratio": d["forward_passes_per_step"] / p["forward_passes_per_step"],
    }


async def pass_cost_run(model: str, audio: np.ndarray, tokens: int, max_tokens: int) -> dict[str, Any]:
    """Part 2: ms per decode pass and per verification pass with every draft token accepted."""
    engine = await VLLMEngine.start(EngineOptions(model=model, max_model_len=4096, speculative_tokens=tokens))
    rows = []
    try:
        t = StreamingTranscriber(StreamingConfig(), engine.codec, engine.base_prompt)
        t.push_audio(audio)
        while (plan := t.next_step()) is not None:
            req = StepRequest(plan.prompt, plan.audio, max_tokens, "cost")
            first = dataclasses.replace(req, max_tokens=1)
            await engine.step(first)  # warm: the prompt is cached from here on
            runs = {"prefill": await _measured_step(engine, first)}
            runs["plain"] = await _measured_step(engine, req)
            runs["drafted"] = await _measured_step(
                engine, dataclasses.replace(req, draft=runs["plain"]["text"])
            )
            t.apply(plan, runs["plain"]["text"])
            rows.append(runs)
    finally:
        await engine.aclose()
    pre = sum(r["prefill"]["wall_s"] for r in rows)
    plain_wall = sum(r["plain"]["wall_s"] for r in rows) - pre
    drafted_wall = sum(r["drafted"]["wall_s"] for r in rows) - pre
    plain_passes = sum(r["plain"]["forward_passes"] - 1 for r in rows)
    drafted_passes = sum(r["drafted"]["forward_passes"] - 1 for r in rows)
    gen = sum(r["plain"]["generation_tokens"] - 1 for r in rows)
    return {
        "steps": len(rows),
        "decode_tokens": gen,
        "identical": all(r["plain"]["text"] == r["drafted"]["text"] for r in rows),
        "accepted_tokens": sum(r["drafted"]["accepted_tokens"] for r in rows),
        "draft_tokens": sum(r["drafted"]["draft_tokens"] for r in rows),
        "ms_per_decode_pass": 1000 * plain_wall / plain_passes,
        "ms_per_verification_pass": 1000 * drafted_wall / drafted_passes,
        "tokens_per_verification_pass": gen / drafted_passes,
        "decode_time_ratio_all_accepted": drafted_wall / plain_wall,
    }


def render(report: dict[str, Any], docs: Path = ROOT / "docs") -> str:
    """The table between the spec-decode markers of docs/performance.md (and its template)."""
    tm, cost = report["trained_model"], report.get("pass_cost")
    p, d = tm["modes"]["plain"], tm["modes"]["drafted"]
    rows = [
        "| trained test model, plugin defaults | plain | previous hypothesis as draft |",
        "|---|---|---|",
    ]
    for label, key, fmt in (
        ("forward passes per step", "forward_passes_per_step", "{:.2f}"),
        ("generated tokens per step", "generated_tokens_per_step", "{:.2f}"),
        ("prefill tokens per step", "prefill_tokens_per_step", "{:.1f}"),
        ("encoder seconds per step", "encoded_s_per_step", "{:.2f}"),
    ):
        rows.append(f"| {label} | {fmt.format(p[key])} | {fmt.format(d[key])} |")
    accepted = f"{d['draft_tokens']} / {d['accepted_tokens']} ({d['acceptance']:.0%})"
    rows.append(f"| draft tokens proposed / accepted | - | {accepted} |")
    rows.append(
        f"| step p50 / p95 (s) | {p['step_p50_s']:.3f} / {p['step_p95_s']:.3f} | "
        f"{d['step_p50_s']:.3f} / {d['step_p95_s']:.3f} |"
    )
    lines = [
        BEGIN,
        f"Measured with `{report['command']}` on {report['machine']} ({report['date']}): "
        f"{tm['files']} held-out recordings ({tm['audio_s']:.0f} s), one utterance each, {report['tokens']} "
        f"draft tokens per pass at most; finals identical: **{tm['identical_finals']}** "
        f"(streaming WER {tm['wer']:.1%}).",
        "",
        *rows,
        "",
        f"Forward passes per step with drafts: **x{tm['pass_ratio']:.2f}** of plain decoding.",
    ]
    if cost:
        # a step's decode passes (after the prefill pass) at the test model's counts, priced at the
        # 0.6B pass costs: drafted steps mix verification passes (one per draft) and plain ones
        dec, ver = cost["ms_per_decode_pass"], cost["ms_per_verification_pass"]
        plain_ms = (p["forward_passes_per_step"] - 1) * dec
        drafts = d["drafts_per_step"]
        drafted_ms = drafts * ver + (d["forward_passes_per_step"] - 1 - drafts) * dec
        saved = 1 - drafted_ms / plain_ms
        lines += [
            "",
            f"{cost['preset']}-shaped synthetic checkpoint ({cost['steps']} steps, prompts cached so "
            "only decoding is timed, "
            f"outputs identical: {cost['identical']}): **{cost['ms_per_decode_pass']:.0f} ms** per decode "
            f"pass, **{cost['ms_per_verification_pass']:.0f} ms** per verification pass carrying "
            f"{cost['tokens_per_verification_pass']:.1f} tokens when every draft token is accepted "
            f"({cost['accepted_tokens']}/{cost['draft_tokens']}); decode time x"
            f"{cost['decode_time_ratio_all_accepted']:.2f}. At the test model's pass ratio a step's decode "
            f"time would be about {saved:.0%} shorter (passes after the prefill pass, priced at these "
            "costs).",
        ]
    lines.append(END)
    block = "\n".join(lines)
    replace_block(docs, DOC_FILES, BEGIN, END, block)
    return block


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    from livekit_qwen_asr.synthetic import ensure_checkpoint
    from livekit_qwen_asr.test_model import ensure_test_model

    files = dataset(args.heldout)[: args.files]
    report: dict[str, Any] = {
        "command": "python -m bench.spec_decode " + " ".join(args.argv),
        "machine": f"{platform.machine()} cpus={os.cpu_count()}",
        "date": time.strftime("%Y-%m-%d"),
        "tokens": args.tokens,
        "trained_model": await trained_model_run(str(ensure_test_model()), files, args.tokens),
    }
    if args.cost_preset != "none":
        audio = np.concatenate([load_audio(w) for w, _r, _x in files])[: int(args.cost_seconds * SAMPLE_RATE)]
        model = str(ensure_checkpoint(args.cost_preset))
        cost = await pass_cost_run(model, audio, args.tokens, args.cost_max_tokens)
        report["pass_cost"] = {"preset": args.cost_preset, **cost}
    return report


def main(argv: list[str] | None = None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", type=Path, default=ROOT / "results" / "heldout" / "test")
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=8, help="draft tokens per verification pass at most")
    ap.add_argument("--cost-preset", default="0.6b", choices=["0.6b", "tiny", "none"])
    ap.add_argument("--cost-seconds", type=float, default=12.0, help="audio of the pass-cost utterance")
    ap.add_argument("--cost-max-tokens", type=int, default=16, help="tokens decoded per pass-cost step")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "spec-decode")
    ap.add_argument("--no-render", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    report = asyncio.run(amain(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    block = render(report) if not args.no_render else ""
    print(block or json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
