"""Speculative decoding with the previous hypothesis as the draft (issue #15): what it saves, counted
in vLLM's own terms (forward passes, drafts proposed and accepted, generated and prefill tokens).

1. **Trained test model** (the model stops by itself and consecutive steps mostly agree, so drafts
   behave as with a real model), streamed at the plugin defaults on two engines alike but for
   `speculative_tokens`, both loaded and taking turns utterance by utterance: held-out recordings
   (one short utterance each: its first step has no draft) and pause-free held-out speech cut every
   30 s as the plugin cuts it (most steps have a draft).
   Finals and generated tokens must be identical; per step: forward passes, drafts, accepted tokens,
   prefill tokens, encoder seconds, wall.
2. **0.6B-shaped checkpoint** (random weights, real compute): the cost of a forward pass. Each step of
   a streamed utterance is run with its prompt fully cached (a warm-up call first), so what is timed
   is decoding: once plainly (one pass per token) and once with its own output as the draft (every
   draft token accepted: the upper bound), and plainly on an engine without speculative decoding
   (both engines loaded, taking turns step by step: this shared machine drifts between runs).
   Gives ms per decode pass on each engine, ms per verification pass, and the decode time a step
   saves at the counts part 1 measured.

    python -m bench.spec_decode --heldout results/heldout/test --files 40 --tokens 8
    (`bash scripts/fidelity.sh` or `bash scripts/bench.sh` writes results/heldout and
    results/forced-cuts/speech.wav; the run re-renders docs/performance.md's block)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.doc_blocks import replace_block
from bench.fidelity import dataset, load_audio, wer
from bench.machine import DTYPE_NAMES, machine_label
from livekit_qwen_asr.engine import EngineOptions, StepRequest, VLLMEngine, _cuda_available, engine_dtype
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
        # the most a draft can save: every token of it accepted (the prefill pass writes the first)
        offered = len(engine.codec.encode(plan.draft)) if plan.draft else 0
        step["draft_savable"] = max(0, min(offered, step["generation_tokens"] - 1))
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
        "passes_if_drafts_all_accepted": (total("generation_tokens") - total("draft_savable")) / n,
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


async def trained_model_run(model: str, sets: dict[str, list[np.ndarray]], tokens: int) -> dict[str, Any]:
    """Part 1: every set's utterances in both modes, one engine per mode, both loaded and taking turns
    utterance by utterance (so the machine's drift hits both alike); identical finals required."""
    modes = {"plain": 0, "drafted": tokens}
    engines: dict[str, VLLMEngine] = {}
    runs: dict[str, dict[str, tuple[list[dict[str, Any]], list[str], float]]] = {name: {} for name in sets}
    try:
        for mode, spec in modes.items():
            engines[mode] = await VLLMEngine.start(
                EngineOptions(model=model, dtype="float32", max_model_len=2048, speculative_tokens=spec)
            )
        for name, utterances in sets.items():
            acc = {mode: ([], [], 0.0) for mode in modes}
            for i, a in enumerate(utterances):
                for mode, engine in engines.items():
                    steps, finals, wall = acc[mode]
                    t0 = time.perf_counter()
                    s, final = await utterance_steps(engine, a, f"{name}-{i}")
                    acc[mode] = (steps + s, [*finals, final], wall + time.perf_counter() - t0)
            runs[name] = acc
    finally:
        for engine in engines.values():
            await engine.aclose()
    out: dict[str, Any] = {}
    for name, utterances in sets.items():
        modes = {mode: _summary(steps, wall) for mode, (steps, _f, wall) in runs[name].items()}
        out[name] = {
            "utterances": len(utterances),
            "audio_s": sum(a.shape[0] for a in utterances) / SAMPLE_RATE,
            "identical_finals": runs[name]["plain"][1] == runs[name]["drafted"][1],
            "finals": runs[name]["drafted"][1],
            "modes": modes,
            "pass_ratio": modes["drafted"]["forward_passes_per_step"]
            / modes["plain"]["forward_passes_per_step"],
        }
    return out


def pause_free_utterances(wav: Path, max_utterance_s: float) -> list[np.ndarray]:
    """Pause-free speech as the plugin streams it: utterances cut every `max_utterance_s` seconds."""
    audio = load_audio(wav)
    cut = int(max_utterance_s * SAMPLE_RATE)
    return [audio[i : i + cut] for i in range(0, audio.shape[0], cut)]


async def _decode_cost_rows(model: str, audio: np.ndarray, tokens: int, max_tokens: int) -> list[dict]:
    """Each step of one streamed utterance with its prompt cached, on an engine without speculative
    decoding (`base`) and one with it (`spec`), both loaded and taking turns step by step so the
    machine's drift hits both alike: per engine the prefill-only call and plain decoding, and on
    `spec` decoding with the plain output as the draft (every draft token accepted)."""
    engines: dict[str, VLLMEngine] = {}
    rows = []
    try:
        for name, spec in (("base", 0), ("spec", tokens)):
            engines[name] = await VLLMEngine.start(
                EngineOptions(model=model, max_model_len=4096, speculative_tokens=spec)
            )
        base = engines["base"]
        t = StreamingTranscriber(StreamingConfig(), base.codec, base.base_prompt)
        t.push_audio(audio)
        while (plan := t.next_step()) is not None:
            req = StepRequest(plan.prompt, plan.audio, max_tokens, "cost")
            first = dataclasses.replace(req, max_tokens=1)
            runs: dict[str, dict[str, Any]] = {}
            for name, engine in engines.items():
                await engine.step(first)  # warm: the prompt is cached from here on
                runs[f"{name}_prefill"] = await _measured_step(engine, first)
                runs[f"{name}_plain"] = await _measured_step(engine, req)
            runs["drafted"] = await _measured_step(
                engines["spec"], dataclasses.replace(req, draft=runs["spec_plain"]["text"])
            )
            t.apply(plan, runs["base_plain"]["text"])
            rows.append(runs)
    finally:
        for engine in engines.values():
            await engine.aclose()
    return rows


def _ms_per_pass(rows: list[dict], engine: str, mode: str) -> tuple[float, int, float]:
    """Decode wall (that engine's prefill call subtracted), passes after the prefill pass, ms per pass."""
    wall = sum(r[mode]["wall_s"] - r[f"{engine}_prefill"]["wall_s"] for r in rows)
    passes = sum(r[mode]["forward_passes"] - 1 for r in rows)
    return wall, passes, 1000 * wall / passes


async def pass_cost_run(model: str, audio: np.ndarray, tokens: int, max_tokens: int) -> dict[str, Any]:
    """Part 2: ms per decode pass on an engine without speculative decoding, and on one with it: per
    plain decode pass and per verification pass with every draft token accepted."""
    rows = await _decode_cost_rows(model, audio, tokens, max_tokens)
    base_wall, _, base_ms = _ms_per_pass(rows, "base", "base_plain")
    plain_wall, _, plain_ms = _ms_per_pass(rows, "spec", "spec_plain")
    drafted_wall, drafted_passes, drafted_ms = _ms_per_pass(rows, "spec", "drafted")
    gen = sum(r["spec_plain"]["generation_tokens"] - 1 for r in rows)
    return {
        "steps": len(rows),
        "dtype": engine_dtype(EngineOptions(), cuda=_cuda_available()),  # the engines' (the default)
        "paired": True,
        "decode_tokens": gen,
        "identical": all(r["spec_plain"]["text"] == r["drafted"]["text"] for r in rows),
        "accepted_tokens": sum(r["drafted"]["accepted_tokens"] for r in rows),
        "draft_tokens": sum(r["drafted"]["draft_tokens"] for r in rows),
        "ms_per_decode_pass_no_spec_engine": base_ms,
        "ms_per_decode_pass": plain_ms,
        "ms_per_verification_pass": drafted_ms,
        "tokens_per_verification_pass": gen / drafted_passes,
        "decode_time_ratio_all_accepted": drafted_wall / plain_wall,
        "decode_time_ratio_vs_no_spec_engine": drafted_wall / base_wall,
    }


def _best_ratio(run: dict[str, Any]) -> float:
    plain = run["modes"]["plain"]
    return run["modes"]["drafted"]["passes_if_drafts_all_accepted"] / plain["forward_passes_per_step"]


SET_LABELS = {"heldout": "held-out sentences", "long_speech": "pause-free speech, cut at 30 s"}


def render(report: dict[str, Any], docs: Path = ROOT / "docs") -> str:
    """The table between the spec-decode markers of docs/performance.md (and its template)."""
    tm, cost = report["trained_model"], report.get("pass_cost")
    names = [n for n in SET_LABELS if n in tm]
    header = "| trained test model, plugin defaults |"
    for n in names:
        header += f" {SET_LABELS[n]}: plain | drafts |"
    rows = [header, "|---|" + "---|---|" * len(names)]
    for label, key, fmt in (
        ("forward passes per step", "forward_passes_per_step", "{:.2f}"),
        ("generated tokens per step", "generated_tokens_per_step", "{:.2f}"),
        ("prefill tokens per step", "prefill_tokens_per_step", "{:.1f}"),
        ("encoder seconds per step", "encoded_s_per_step", "{:.2f}"),
        ("verification passes per step (a draft in it)", "drafts_per_step", "{:.2f}"),
    ):
        cells = [fmt.format(tm[n]["modes"][m][key]) for n in names for m in ("plain", "drafted")]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for n in names:
        d = tm[n]["modes"]["drafted"]
        cells += ["-", f"{d['draft_tokens']} / {d['accepted_tokens']} ({d['acceptance']:.0%})"]
    rows.append("| draft tokens proposed / accepted | " + " | ".join(cells) + " |")
    cells = [
        f"{tm[n]['modes'][m]['step_p50_s']:.3f} / {tm[n]['modes'][m]['step_p95_s']:.3f}"
        for n in names
        for m in ("plain", "drafted")
    ]
    rows.append("| step p50 / p95 (s) | " + " | ".join(cells) + " |")
    h = tm["heldout"]
    sets = f"{h['utterances']} held-out recordings ({h['audio_s']:.0f} s, one utterance each)"
    if "long_speech" in tm:
        ls = tm["long_speech"]
        sets += f" and {ls['audio_s']:.0f} s of pause-free held-out speech ({ls['utterances']} utterances)"
    lines = [
        BEGIN,
        f"Measured with `{report['command']}` on {report['machine']} ({report['date']}): {sets}, "
        f"{report['tokens']} draft tokens per pass at most; finals identical: "
        + ", ".join(f"**{tm[n]['identical_finals']}**" for n in names)
        + f" (held-out streaming WER {h['wer']:.1%}).",
        "",
        *rows,
        "",
        "Forward passes per step with drafts: "
        + ", ".join(f"**x{tm[n]['pass_ratio']:.2f}** ({SET_LABELS[n]})" for n in names)
        + " of plain decoding. Had every token of every draft been accepted: "
        + ", ".join(f"x{_best_ratio(tm[n]):.2f}" for n in names)
        + " (the draft is the rolled-back tail; the new audio's words cannot be drafted from it).",
    ]
    # the decode-time estimate uses the set closest to continuous speech
    p, d = tm[names[-1]]["modes"]["plain"], tm[names[-1]]["modes"]["drafted"]
    if cost:
        # a pass is priced as a fixed cost plus a cost per token it computes (a verification pass
        # computes its draft tokens + 1), fitted to the two passes measured on the 0.6B shape: the
        # plain decode pass and the verification pass with every draft token accepted
        base, dec, ver = (
            cost["ms_per_decode_pass_no_spec_engine"],
            cost["ms_per_decode_pass"],
            cost["ms_per_verification_pass"],
        )
        verifications = cost["decode_tokens"] / cost["tokens_per_verification_pass"]
        carried = cost["draft_tokens"] / verifications + 1
        per_token = (ver - dec) / (carried - 1) if carried > 1 else 0.0
        fixed = dec - per_token
        # a step's decode passes (after the prefill pass) at the test model's counts: plain steps at
        # the engine without speculative decoding, drafted ones at the spec engine's costs
        plain_ms = (p["forward_passes_per_step"] - 1) * base
        drafts = d["drafts_per_step"]
        test_carried = d["draft_tokens"] / d["drafts"] + 1 if d["drafts"] else 1.0
        drafted_ms = (
            drafts * (fixed + per_token * test_carried) + (d["forward_passes_per_step"] - 1 - drafts) * dec
        )
        saved = 1 - drafted_ms / plain_ms
        rejected = 1 - (d["acceptance"] or 1.0)
        dtype = f" in {DTYPE_NAMES[cost['dtype']]}" if cost.get("dtype") in DTYPE_NAMES else ""
        order = "one after the other"
        if cost.get("paired"):
            order = "both engines loaded, taking turns step by step"
        lines += [
            "",
            f"{cost['preset']}-shaped synthetic checkpoint{dtype} ({cost['steps']} steps, prompts cached so "
            "only decoding is timed, "
            f"outputs identical: {cost['identical']}): **{base:.0f} ms** per decode pass on an engine "
            f"without speculative decoding; with it, **{dec:.0f} ms** per plain decode pass and "
            f"**{ver:.0f} ms** per verification pass computing {carried:.1f} tokens, every draft token "
            f"accepted ({cost['accepted_tokens']}/{cost['draft_tokens']}); a step's decode then took "
            f"x{cost['decode_time_ratio_vs_no_spec_engine']:.2f} of its time on the engine without it "
            f"({order}). So a pass costs about **{fixed:.0f} ms plus {per_token:.0f} ms per token it "
            f"computes**. Priced so, at the test model's counts ({SET_LABELS[names[-1]]}: "
            f"{test_carried:.1f} tokens per verification pass, {rejected:.0%} of draft tokens rejected) "
            f"a step's decode time would be about {abs(saved):.0%} "
            f"{'shorter' if saved >= 0 else 'longer'} (passes after the prefill pass).",
        ]
    lines.append(END)
    block = "\n".join(lines)
    replace_block(docs, DOC_FILES, BEGIN, END, block)
    return block


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    from livekit_qwen_asr.stt import STTOptions
    from livekit_qwen_asr.synthetic import ensure_checkpoint
    from livekit_qwen_asr.test_model import ensure_test_model

    files = dataset(args.heldout)[: args.files]
    sets = {"heldout": [load_audio(w) for w, _r, _x in files]}
    if args.long_speech:
        sets["long_speech"] = pause_free_utterances(args.long_speech, STTOptions().max_utterance_sec)
    trained = await trained_model_run(str(ensure_test_model()), sets, args.tokens)
    trained["heldout"]["wer"] = wer([ref for _w, ref, _x in files], trained["heldout"]["finals"])
    report: dict[str, Any] = {
        "command": "python -m bench.spec_decode " + " ".join(args.argv),
        "machine": machine_label(),
        "date": time.strftime("%Y-%m-%d"),
        "tokens": args.tokens,
        "trained_model": trained,
    }
    if args.cost_preset != "none":
        audio = np.concatenate(sets["heldout"])[: int(args.cost_seconds * SAMPLE_RATE)]
        model = str(ensure_checkpoint(args.cost_preset))
        cost = await pass_cost_run(model, audio, args.tokens, args.cost_max_tokens)
        report["pass_cost"] = {"preset": args.cost_preset, **cost}
    return report


def main(argv: list[str] | None = None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", type=Path, default=ROOT / "results" / "heldout" / "test")
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument(
        "--long-speech",
        default=str(ROOT / "results" / "forced-cuts" / "speech.wav"),
        help="pause-free speech streamed as the plugin cuts it (training.long_speech); '' to skip",
    )
    ap.add_argument("--tokens", type=int, default=8, help="draft tokens per verification pass at most")
    ap.add_argument("--cost-preset", default="0.6b", choices=["0.6b", "tiny", "none"])
    ap.add_argument("--cost-seconds", type=float, default=12.0, help="audio of the pass-cost utterance")
    ap.add_argument("--cost-max-tokens", type=int, default=16, help="tokens decoded per pass-cost step")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "spec-decode")
    ap.add_argument("--no-render", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.long_speech = Path(args.long_speech) if args.long_speech.strip() else None
    report = asyncio.run(amain(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    block = render(report) if not args.no_render else ""
    if block:  # the docs' table comes from this copy
        (ROOT / "docs" / "perf" / "spec-decode.json").write_text(json.dumps(report, indent=1))
    print(block or json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
