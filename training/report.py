"""Render docs/test-model.md from the training logs (the numbers come only from state/*.jsonl), and
the learning curve docs/test-model-curve.png when matplotlib is installed.

python -m training.report      # any Python 3.11; no torch needed
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "test-model.md"
CURVE = DOC.parent / "test-model-curve.png"
SHIPPED = HERE.parent / "livekit_qwen_asr" / "assets" / "test_model.safetensors"
TARGETS = {"test_wer": 0.05, "test_unseen_wer": 0.10}  # issue #12, offline WER
BUDGET_CPU_H = 12.0  # issue #12: stop and ship the best model if the targets need more
LOGS = {
    "stage 0 (1,000 words, frame-budget batches; abandoned)": "log-stage0-1000words.jsonl",
    "stage 1, first try (402 words, frame-budget batches; abandoned: CTC plateau)": (
        "log-stage1-frame-batches.jsonl"
    ),
    "stage 1 (402 words, 16-example batches, train_easy first)": "log.jsonl",
}

INTRO = """# The test model

`livekit_qwen_asr.test_model` is a **small test model trained on synthetic English speech, not
Qwen3-ASR-0.6B**: the real Qwen3-ASR architecture (official transformers classes, real 151,936-id Qwen
vocabulary and chat template) at a tiny size, trained from scratch in this repository on espeak-ng
speech over a fixed English word list (training/README.md has the recipe). It exists so that the demo,
the tests and the benchmarks can show text that means something where the real weights cannot be
downloaded. Outside its domain (real voices, other words) its output means nothing.

- Shipped as `livekit_qwen_asr/assets/test_model.safetensors` (the trained tensors only) and expanded
  on first use into the official checkpoint layout in the cache (`ensure_test_model()`; atomic,
  hash-checked, re-expanded if damaged). vLLM and the official `qwen-asr` transformers backend load
  it and decode it identically (tests/test_test_model.py).
- `python -m livekit_qwen_asr.demo` (and `scripts/demo.sh`) falls back to it when the real model cannot
  be loaded, bannered with this label, streams its in-domain recording (`assets/test_model_speech.wav`,
  held-out sentences) and prints the reference and the finals' WER.
- Training resumes across sessions from the committed state: `bash scripts/train_test_model.sh MINUTES`.

## Where training stands

Rendered by `python -m training.report` from `training/state/*.jsonl`. WER is on 100 held-out examples
per set (whole sentences, cut recordings and long ones mixed), greedy, whole utterance.
"""

WER_KEYS = ("test_wer", "test_unseen_wer", "test_noise_wer")
SETS = ("test", "test_unseen", "test_noise")
KINDS = {"whole": "whole sentences", "cut": "cut recordings", "long": "long ones (2-6 sentences, up to 30 s)"}


def _rows(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def plot(curves: list[tuple[str, list[dict]]], path: Path) -> bool:
    """Held-out WER against cumulative CPU hours over all stages (one line per set)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key, label in zip(WER_KEYS, ("seen voices", "unseen voice variants", "noise"), strict=True):
        xs, ys, offset = [], [], 0.0
        for _, (evals, stage_h) in curves:
            xs += [offset + e["cpu_h"] for e in evals if key in e]
            ys += [min(e[key], 1.2) for e in evals if key in e]
            offset += stage_h
        ax.plot(xs, ys, marker=".", label=label)
    for target in TARGETS.values():
        ax.axhline(target, ls=":", color="grey")
    ax.set_xlabel("training CPU hours, all stages")
    ax.set_ylabel("held-out WER (capped at 120 %)")
    ax.set_ylim(0, 1.2)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Test model learning curve (dotted: issue #12's 5 % / 10 % targets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def shipped_step(path: Path = SHIPPED) -> int | None:
    """The training step of the model the package ships (its safetensors header), None if absent."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(n)).get("__metadata__", {})
        return int(json.loads(meta.get("trained", "{}"))["steps"])
    except (OSError, ValueError, KeyError, struct.error):
        return None


def render() -> str:
    out = [INTRO]
    curves: list[tuple[str, tuple[list[dict], float]]] = []
    for title, name in LOGS.items():
        rows = _rows(HERE / "state" / name)
        train = [r for r in rows if r.get("event") == "train"]
        evals = [r for r in rows if r.get("event") == "eval"]
        if not train:
            continue
        last = train[-1]
        stops = [r["cpu_h"] for r in rows if r.get("event") == "stop"]
        curves.append((title, (evals, max([last["cpu_h"], *stops]))))
        out.append(f"### {title}\n")
        splits = sorted({r["train_split"] for r in train if "train_split" in r})
        if splits:
            out.append(f"Training split(s): {', '.join(f'`{x}`' for x in splits)}.\n")
        out.append(
            f"{last['step']} steps, {last['cpu_h']:.2f} CPU hours "
            f"(last loss: CE {last['ce']:.2f}, CTC {last['ctc']:.2f}).\n"
        )
        if evals:
            out.append("| step | CPU h | test WER | unseen voices WER | noise WER |")
            out.append("|---:|---:|---:|---:|---:|")
            for e in evals:
                wers = " | ".join(f"{e.get(k, float('nan')):.1%}" for k in WER_KEYS)
                out.append(f"| {e['step']} | {e['cpu_h']:.2f} | {wers} |")
            out.append("")
            last_eval = evals[-1]
            if all(f"{s}_{k}_wer" in last_eval for s in SETS for k in KINDS):
                parts = ", ".join(
                    label + " " + " / ".join(f"{last_eval[s + '_' + k + '_wer']:.0%}" for s in SETS)
                    for k, label in KINDS.items()
                )
                out.append(f"By kind at step {last_eval['step']} (seen / unseen voices / noise): {parts}.\n")
        every = max(1, len(train) // 12)
        out.append("| step | CPU h | CE | CTC |")
        out.append("|---:|---:|---:|---:|")
        for r in train[::every] + ([] if (len(train) - 1) % every == 0 else [train[-1]]):
            out.append(f"| {r['step']} | {r['cpu_h']:.2f} | {r['ce']:.2f} | {r['ctc']:.2f} |")
        out.append("")
    total = sum(h for _, (_, h) in curves)
    evals = curves[-1][1][0] if curves else []
    step = shipped_step()
    final = next((e for e in evals if e["step"] == step), evals[-1] if evals else {})
    later = [e for e in evals if final and e["step"] > final["step"]]
    met = {k: final.get(k, 1.0) <= t for k, t in TARGETS.items()}
    out.append("### Learning curve\n")
    if plot(curves, CURVE):
        out.append(f"![held-out WER against training CPU hours]({CURVE.name})\n")
    out.append(
        f"Training so far: {total:.2f} CPU hours over all stages (logged training time, both cores "
        f"counted). Issue #12's targets: offline WER <= 5 % with seen voices "
        f"({'met' if met['test_wer'] else 'not met'}: {final.get('test_wer', float('nan')):.1%} for the "
        f"shipped model, step {final.get('step')}), <= 10 % with unseen voice variants "
        f"({'met' if met['test_unseen_wer'] else 'not met'}: "
        f"{final.get('test_unseen_wer', float('nan')):.1%}); "
        f"the issue's budget is about {BUDGET_CPU_H:.0f} CPU hours, after which the best model ships "
        "as it is. docs/fidelity.md has the streaming figures on the shipped model.\n"
    )
    if later:
        best = min(later, key=lambda e: e["test_wer"])
        out.append(
            f"Training after the shipped step (to step {later[-1]['step']}, {later[-1]['cpu_h']:.2f} CPU h "
            f"in the stage) did not beat it: its best evaluation, step {best['step']}, has "
            + " / ".join(f"{best[k]:.1%}" for k in WER_KEYS)
            + " (seen / unseen / noise) against the shipped "
            + " / ".join(f"{final[k]:.1%}" for k in WER_KEYS)
            + ", so the package keeps the shipped model and its state in `training/state/state.pt`.\n"
        )
    out.append(
        "Besides the plumbing (expansion, loading, identical decoding in vLLM and the official backend), "
        "tests/test_test_model.py asserts text at the model's present level (`MAX_STREAMING_WER`; random "
        "weights score over 100 %): the plugin's stream over the demo recording gives one final per "
        "sentence; the caption page in headless Chromium, fed that recording by its fake microphone, "
        "shows the model's label and those sentences; in a captioned room of two talkers each speaker's "
        "finals are that speaker's words; on 120 s of pause-free speech cut every 10 s the segments tile "
        "the audio and each final says its own segment's words; and the qwen-asr package's own "
        "streaming loop, answered by its transformers backend, gives the same prompt, text and final as "
        "ours at every step.\n"
    )
    return "\n".join(out)


def main() -> int:
    DOC.write_text(render(), encoding="utf-8")
    print(DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
