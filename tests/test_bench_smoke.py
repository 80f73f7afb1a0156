"""CI smoke runs of the benchmark harness and the fidelity harness on the shared tiny engine
(numbers meaningless: random weights; what is checked is that the pipelines run and measure)."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench import fidelity
from bench import report as bench_report
from bench import run as bench_run


async def test_benchmark_harness_smoke(engine, tmp_path):
    args = bench_run.parse_args(["--quick", "--out", str(tmp_path)])
    args.refeed_seconds = 20
    results = await bench_run.run_benchmark(engine, args, bench_run.EncoderProbe(None))
    results.update(preset="tiny", device="CPU", engine_start_s=0.0, cut_s=args.cut)
    bench_run.write_outputs(results, tmp_path)

    modes = results["modes"]
    assert set(modes) == {"official", "official_cut", "ours", "ours_cut"}
    assert all(m["steps"] == 10 and m["audio_s"] == 20.0 for m in modes.values())
    # same prompts, greedy, float32 engine: ours generates exactly what the re-feed loop generates
    assert results["same_text_steps"] == "10/10"
    # the re-feed loop sends one raw item and never reuses audio; ours reuses completed windows
    assert modes["official"]["uncached_audio_s_per_audio_s"] == pytest.approx(5.5)  # (2+4+...+20)/20
    assert modes["ours"]["uncached_audio_s_per_audio_s"] < modes["official"]["uncached_audio_s_per_audio_s"]
    assert modes["ours"]["completed_window_hit_rate"] > 0 == modes["official"]["completed_window_hit_rate"]
    # token cap as real speech: K rolled-back tokens + 3 per new second, header + 3/s without prefix
    official_steps = results["steps"]["official"]
    assert [r["generated_tokens"] for r in official_steps] == [10, 16] + [11] * 8

    paced = results["paced"]["ours_cut_x2"]
    paced_rows = results["steps"]["paced_ours_cut_x2"]
    assert paced["streams"] == 2 and sum(r["chunks"] for r in paced_rows) == 6  # 6 s, 2 s chunks, x2
    assert all(t is not None and t >= 2.0 for t in paced["ttfi_s"])  # the first chunk takes 2 s to arrive
    assert len(paced["final_delay_s"]) == 2

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["plots"] == ["steps.png", "paced.png"]
    assert all((tmp_path / p).stat().st_size > 10_000 for p in saved["plots"])
    table = (tmp_path / "table.md").read_text()
    assert "| ours_cut |" in table and "| ours_cut_x2 |" in table

    doc = tmp_path / "docs" / "performance.md"
    doc.parent.mkdir()
    bench_report.render(tmp_path, doc)
    text = doc.read_text()
    assert "{{" not in text and "| ours_cut |" in text and "**Prefill per step**" in text
    assert (doc.parent / "perf" / "steps.png").is_file()


def test_encoder_bounds():
    # 2 s chunks, 8 s windows: the open window is encoded at 2, 4, 6, 8 s, and once more (re-encode)
    assert bench_report.exact_encoder_bound(8, reencode=False) == 20 == bench_report.exact_encoder_bound(8)
    assert bench_report.exact_encoder_bound(16) == 20 + 8 + 20
    assert bench_report.exact_encoder_bound(30) / 30 == pytest.approx(3.2)
    assert bench_report.session_bound(300, None, reencode=False) / 300 == pytest.approx(2.5, abs=0.02)


def test_unstable_partial_words():
    # "the cat" -> "the cap sat" (cat changed) -> final "the cap sat down": 1 unstable of 5 shown
    assert fidelity.unstable_words(["The cat", "the cap sat", "the cap, sat down."]) == (1, 5)
    assert fidelity.unstable_words(["a b c", "a"]) == (2, 3)  # words that vanish are unstable too
    assert fidelity.unstable_words(["only the final"]) == (0, 0)
    assert fidelity.normalize("Hello, World!  It's") == "hello world it's"


def test_first_right_times_align_words_instead_of_positions():
    timeline = [(1.0, "The cat"), (2.0, "the cap sat"), (3.0, "uh the cap, sat down.")]
    # "uh" inserted at 3.0 does not make the later words wrong; "dog" is never right
    assert fidelity.first_right_times(["the", "cap", "sat", "down", "dog"], timeline) == [
        1.0, 2.0, 2.0, 3.0, None,
    ]  # fmt: skip


async def test_fidelity_harness_runs_end_to_end(engine, tmp_path):
    texts = {
        "fox": "The quick brown fox jumps over the lazy dog.",
        "meeting": "Please send the meeting notes to everyone before Friday.",
    }
    for name, text in texts.items():
        raw = tmp_path / f"{name}-22k.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True)
        # 48 kHz stereo, as a browser would record it: goes through the plugin's conversion
        subprocess.run(
            [
                "sox",
                str(raw),
                "-r",
                "48000",
                "-c",
                "2",
                "-b",
                "16",
                "-t",
                "wavpcm",
                str(tmp_path / f"{name}.wav"),
            ],
            check=True,
        )
        raw.unlink()
        (tmp_path / f"{name}.txt").write_text(text)
    # word timings for one file (even spacing: enough to run the latency figures)
    fox = texts["fox"].split()
    timed = [[w, 0.2 * i, 0.2 * i + 0.2] for i, w in enumerate(fox)]
    (tmp_path / "fox.words.json").write_text(json.dumps(timed))
    report = await fidelity.evaluate(engine, tmp_path)
    assert report["synthetic"] is True and report["files"] == 2
    per_file = {r["name"]: r for r in report["per_file"]}
    assert set(per_file) == set(texts)
    for name, r in per_file.items():
        assert r["reference"] == texts[name]
        assert 1.5 < r["audio_s"] < 6.0
        assert r["step_latencies"] and r["streaming"] and r["offline"]
    assert report["wer_streaming"] >= 0 and report["wer_offline"] >= 0
    assert report["wer_gap"] == pytest.approx(report["wer_streaming"] - report["wer_offline"])
    assert 0.0 <= report["unstable_partial_word_ratio"] <= 1.0
    assert report["timed_words"] == len(fox) and per_file["meeting"]["words"] is None
    # the final comes after the end of speech (1.8 s here) on the simulated clock
    assert per_file["fox"]["final_latency_s"] > 0
    assert 0.0 <= report["words_never_right_ratio"] <= 1.0
    with pytest.raises(FileNotFoundError):
        fidelity.dataset(tmp_path / "missing")
