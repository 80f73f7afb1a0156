"""Render docs/performance.md from a benchmark run: the table, the plots and the target checks all
come from results.json (nothing typed in by hand).

    python -m bench.report results/bench-0.6b        # run by scripts/bench.sh after the default run
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from livekit_qwen_asr.features import WINDOW_SECONDS

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "docs" / "performance.template.md"
DOC = ROOT / "docs" / "performance.md"
WINDOW_S = WINDOW_SECONDS


def exact_encoder_bound(utterance_s: float, chunk_s: float = 2.0, reencode: bool = True) -> float:
    """Encoder audio-seconds for one utterance when each step encodes only its open window (the
    issue's rule: 2.5 per audio second), plus, with `reencode`, one more encode of each window at the
    step after it completed: its last log-mel frame was reflect-padded at that step and takes the real
    samples one step later. Outputs equal to the re-feed loop's need that re-encode unless the frame
    comes out the same (a quiet frame clamped to the floor), so exact reuse lies between the two."""
    total, t, completed_at_prev = 0.0, chunk_s, False
    while t <= utterance_s + 1e-9:
        open_s = t - WINDOW_S * int((t - 1e-9) // WINDOW_S)
        total += open_s + (WINDOW_S if completed_at_prev and reencode else 0.0)
        completed_at_prev = abs(open_s - WINDOW_S) < 1e-9
        t += chunk_s
    return total


def session_bound(audio_s: float, cut_s: float | None, reencode: bool = True) -> float:
    if not cut_s:
        return exact_encoder_bound(audio_s, reencode=reencode)
    full, rest = divmod(audio_s, cut_s)
    return full * exact_encoder_bound(cut_s, reencode=reencode) + exact_encoder_bound(rest, reencode=reencode)


def targets(r: dict) -> str:
    m, p = r["modes"], r["paced"]
    cut = r["cut_s"]
    lines = []
    ours, ours_cut = m.get("ours"), m.get("ours_cut")
    off, off_cut = m.get("official"), m.get("official_cut")
    if ours and ours.get("encoder_s_per_audio_s") is not None:
        rows = []
        for name, mode, c in (("without a cut", ours, None), (f"with the {cut:.0f} s cut", ours_cut, cut)):
            e = mode["encoder_s_per_audio_s"]
            lo = session_bound(mode["audio_s"], c, reencode=False) / mode["audio_s"]
            hi = session_bound(mode["audio_s"], c) / mode["audio_s"]
            rows.append(
                f"{e:.2f} {name} (open window only: {lo:.2f}, {e / lo - 1:+.0%}; "
                f"plus one re-encode per window: {hi:.2f}, {e / hi - 1:+.0%})"
            )
        refeed_300 = sum(range(2, 302, 2)) / 300
        lines.append(
            f"- **Encoder work** per audio second over {ours['audio_s']:.0f} s: ours "
            + "; ".join(rows)
            + ". "
            "The issue's 5 % target is against the open-window bound; bit-exact outputs cost one more "
            "encode of a window whose last frame changes once audio follows it (below), so ours lies "
            "between the two bounds. Re-feed loop: "
            f"{off['encoder_s_per_audio_s']:.1f} at {off['audio_s']:.0f} s, "
            f"{off_cut['encoder_s_per_audio_s']:.1f} with the cut, {refeed_300:.1f} at 300 s uncut by "
            "the same arithmetic (2 + 4 + ... + 300 over 300)."
        )
    if ours_cut and off_cut:
        pre, prompt = ours_cut["prefill_tokens_per_step"], ours_cut["prompt_tokens_per_step"]
        lines.append(
            f"- **Prefill per step** (prompt tokens not from the cache): ours {pre:.0f} of {prompt:.0f} "
            f"with the cut, {ours['prefill_tokens_per_step']:.0f} of {ours['prompt_tokens_per_step']:.0f} "
            "without (the text prefix after the open window grows with the utterance); re-feed "
            f"{off_cut['prefill_tokens_per_step']:.0f} of {off_cut['prompt_tokens_per_step']:.0f}. "
            f"Completed windows served from the cache: {ours_cut['completed_window_hit_rate']:.0%} / "
            f"{ours['completed_window_hit_rate']:.0%} of the reusable tokens; the rest is the KV block "
            "straddling a window edge (32 tokens on CPU by default, 16 on GPU)."
        )
    if ours_cut and ours_cut.get("p95_ratio_300_30"):
        oc = off_cut.get("p95_ratio_300_30") if off_cut else None
        ou = ours.get("p95_ratio_300_30") if ours else None
        lines.append(
            f"- **p95 at 300 s / p95 at 30 s** with the {cut:.0f} s maximum utterance: ours "
            f"{ours_cut['p95_ratio_300_30']:.2f} (target <= 1.15; p95 {ours_cut['p95_at_30']:.2f} s and "
            f"{ours_cut['p95_at_300']:.2f} s); re-feed loop with the same cut "
            + (
                f"{oc:.2f} (p95 {off_cut['p95_at_30']:.2f} s and {off_cut['p95_at_300']:.2f} s)"
                if oc
                else "n/a"
            )
            + (f"; ours without a cut {ou:.2f}" if ou else "")
            + "."
        )
    ours_rt = sorted(
        int(k.split("_x")[1]) for k, v in p.items() if k.startswith("ours_cut") and v["real_time"]
    )
    tried = sorted(int(k.split("_x")[1]) for k in p if k.startswith("ours_cut"))
    if tried:
        off1 = p.get("official_cut_x1")
        paced_s = max(
            (x["position_s"] for k, rows in r["steps"].items() if k.startswith("paced") for x in rows),
            default=0,
        )
        lags = ", ".join(f"{n}: {p[f'ours_cut_x{n}']['max_lag_s']:.1f} s" for n in tried)
        kept = (
            f"kept up with {max(ours_rt)} at once" if ours_rt else "did not keep up strictly with any count"
        )
        lines.append(
            f"- **Real-time streams** (0.6b, {r['device']}, {paced_s:.0f} s each; a step must finish before "
            f"the next chunk is due): ours {kept} (tried {', '.join(map(str, tried))}); its lag stays "
            f"bounded because a late stream coalesces chunks (max lag by stream count: {lags}); the "
            "re-feed loop with one stream "
            + (
                f"{'kept up' if off1['real_time'] else 'fell behind'} ({off1['steps_behind']} of "
                f"{off1['steps']} steps late, lag growing to {off1['max_lag_s']:.1f} s)"
                if off1
                else "was not run"
            )
            + "."
        )
    if ours_cut:
        lines.append(
            f"- **Decode**: {ours_cut['generated_tokens_per_step']:.1f} tokens per step at the "
            "real-speech cap (see below)."
        )
    return "\n".join(lines)


def render(results_dir: Path, doc: Path = DOC) -> None:
    r = json.loads((results_dir / "results.json").read_text())
    table = (results_dir / "table.md").read_text().strip()
    command = " ".join(["bash scripts/bench.sh", *r.get("argv", [])])
    table += f"\n\nRun: `{command}`; results in `results/{results_dir.name}/`."
    out = TEMPLATE.read_text()
    gen = r["modes"].get("ours_cut", {}).get("generated_tokens_per_step")
    oc, fc = r["modes"].get("ours_cut"), r["modes"].get("official_cut")
    saving = (
        f"runs the {oc['audio_s']:.0f} s session in {oc['total_wall_s']:.0f} s of steps against the re-feed "
        f"loop's {fc['total_wall_s']:.0f} s with the same cut "
        f"({1 - oc['total_wall_s'] / fc['total_wall_s']:.0%} less)"
        if oc and fc
        else "lowers the total step time"
    )
    out = (
        out.replace("{{TABLE}}", table)
        .replace("{{TARGETS}}", targets(r))
        .replace("{{REFEED_S}}", f"{r['modes'].get('official', {}).get('audio_s', 0):.0f}")
        .replace("{{SAVING}}", saving)
        .replace("{{GEN}}", f"{gen:.0f}" if gen else "about 11")
    )
    (doc.parent / "perf").mkdir(exist_ok=True)
    for png in r.get("plots", []):
        shutil.copy(results_dir / png, doc.parent / "perf" / png)
    doc.write_text(out)
    print(f"wrote {doc}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results", type=Path)
    render(ap.parse_args(argv).results)


if __name__ == "__main__":
    main()
