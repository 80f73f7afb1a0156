"""Speculative decoding with the previous hypothesis as the draft (issue #15, spec_decode.py).

Pure parts: what a step's draft is, and which draft tokens the proposer offers as the output grows.
Real vLLM: on the trained test model (float32), 120 s of held-out speech streamed with drafts gives
every step's text identical to plain decoding, while vLLM's own counts show drafts accepted and fewer
forward passes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench import spec_decode
from livekit_qwen_asr import test_model as tm
from livekit_qwen_asr.engine import CPU_SPECULATIVE_TOKENS, EngineOptions, VLLMEngine, _engine_kwargs
from livekit_qwen_asr.errors import InvalidOptionError
from livekit_qwen_asr.samples import read_wav, write_wav
from livekit_qwen_asr.spec_decode import PROPOSER, WORKER_EXTENSION, PassCounts, draft_continuation
from livekit_qwen_asr.streaming import SAMPLE_RATE, StreamingConfig, StreamingTranscriber

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_PY = ROOT / ".venv-official" / "bin" / "python"


def test_the_draft_continues_while_the_output_follows_it():
    draft = [1, 2, 3, 4, 5]
    assert draft_continuation([], draft, 8) == [1, 2, 3, 4, 5]
    assert draft_continuation([1, 2], draft, 2) == [3, 4]
    assert draft_continuation([1, 2, 3, 4, 5], draft, 8) == []
    assert draft_continuation([1, 2, 3, 4, 5, 6], draft, 8) == []  # past its end: nothing to guess
    assert draft_continuation([1, 2], draft, 0) == []
    assert draft_continuation([1, 2], [], 4) == []


def test_after_a_corrected_word_the_draft_resumes_where_the_output_rejoins_it():
    draft = [10, 11, 12, 13, 14]  # e.g. "all so take looking done"
    assert draft_continuation([9, 11], draft, 8) == [12, 13, 14]  # "or so" -> "take looking done"
    assert draft_continuation([9, 12, 13], draft, 2) == [14]  # longest match first
    assert draft_continuation([9, 8], draft, 8) == []  # nothing of it in the output


def test_a_step_drafts_the_previous_decode_after_its_prefix(qwen_codec):
    t = StreamingTranscriber(StreamingConfig(chunk_size_sec=1.0, unfixed_chunk_num=1), qwen_codec)
    t.push_audio(np.zeros(3 * SAMPLE_RATE, np.float32))
    first = t.next_step()
    assert first is not None and first.draft == ""  # an utterance's first step has nothing before it
    raw = " one two three four five six seven eight"
    t.apply(first, "language English<asr_text>" + raw)
    second = t.next_step()
    assert second is not None and second.prefix  # K = 5 tokens rolled back
    assert second.prefix + second.draft == "language English<asr_text>" + raw
    assert second.draft == " four five six seven eight"
    t.apply(second, second.draft + " nine")
    tail = t.finish_step()
    assert tail is not None and tail.final and tail.prefix + tail.draft == t.finalize().raw


def test_the_option_configures_vllms_custom_proposer():
    with pytest.raises(InvalidOptionError):
        EngineOptions(model="m", speculative_tokens=-1)
    with pytest.raises(InvalidOptionError):
        EngineOptions(model="m", speculative_tokens=True)  # type: ignore[arg-type]
    for cuda in (False, True):
        off = _engine_kwargs(EngineOptions(model="m", speculative_tokens=0), cuda=cuda, kv_env=False)
        assert "speculative_config" not in off and "worker_extension_cls" not in off
        kw = _engine_kwargs(EngineOptions(model="m", speculative_tokens=6), cuda=cuda, kv_env=False)
        spec = {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 6}
        assert kw["speculative_config"] == spec
        assert kw["worker_extension_cls"] == WORKER_EXTENSION
    # by default: on where it was measured faster (CPU), off where it was not measured (GPU)
    cpu = _engine_kwargs(EngineOptions(model="m"), cuda=False, kv_env=False)["speculative_config"]
    assert cpu["num_speculative_tokens"] == CPU_SPECULATIVE_TOKENS
    assert "speculative_config" not in _engine_kwargs(EngineOptions(model="m"), cuda=True, kv_env=False)


async def _stream_steps(engine: VLLMEngine, audio: np.ndarray, utterance_s: float) -> list[str]:
    """Every step's generated text over `audio`, cut into utterances of `utterance_s`, each streamed
    at the plugin defaults (2 s chunks, no prefix for 2 chunks, K = 5) with its drafts."""
    cut = int(utterance_s * SAMPLE_RATE)
    texts: list[str] = []
    for start in range(0, audio.shape[0], cut):
        steps, _final = await spec_decode.utterance_steps(engine, audio[start : start + cut], "s")
        texts += [s["text"] for s in steps]
    return texts


@pytest.mark.timeout(900)
async def test_drafted_steps_write_exactly_what_plain_decoding_writes(tmp_path):
    wav = tmp_path / "speech.wav"
    subprocess.run(
        [str(OFFICIAL_PY), "-m", "training.long_speech", str(wav)], cwd=ROOT, check=True, timeout=120
    )
    pcm, _, _ = read_wav(wav)
    audio = pcm.astype(np.float32) / 32768
    assert audio.size / SAMPLE_RATE >= 120
    words = len(json.loads(wav.with_suffix(".json").read_text())["words"])
    runs: dict[int, tuple[list[str], PassCounts]] = {}
    for spec in (0, 8):
        engine = await VLLMEngine.start(
            EngineOptions(
                model=str(tm.ensure_test_model()),
                max_model_len=1024,
                kv_cache_gib=0.25,
                dtype="float32",
                speculative_tokens=spec,
            )
        )
        try:
            before = engine.pass_counts
            texts = await _stream_steps(engine, audio, 10.0)
            runs[spec] = (texts, engine.pass_counts.minus(before))
        finally:
            await engine.aclose()
    (plain, plain_counts), (drafted, counts) = runs[0], runs[8]
    print("\n", words, "words;", len(plain), "steps; plain", plain_counts, "; drafted", counts)
    assert drafted == plain
    assert plain_counts.drafts == 0 and plain_counts.forward_passes == plain_counts.generation_tokens
    assert counts.generation_tokens == plain_counts.generation_tokens
    assert counts.accepted_tokens > 0 and counts.forward_passes < plain_counts.forward_passes


@pytest.mark.timeout(900)
def test_the_benchmark_counts_passes_and_renders_its_table(tmp_path):
    """Smoke run of bench/spec_decode.py on the bundled in-domain recording (whole, ~10 s: steps with
    drafts; and its first sentence, under one chunk: a finish step only; the whole one again as the
    pause-free set) with the tiny checkpoint for the pass costs, and its docs block."""
    ref = json.loads((ROOT / "livekit_qwen_asr" / "assets" / "test_model_speech.json").read_text())
    pcm, _, _ = read_wav(ROOT / "livekit_qwen_asr" / "assets" / "test_model_speech.wav")
    folder = tmp_path / "recordings"
    folder.mkdir()
    first = ref["sentences"][0]
    write_wav(folder / "a-whole.wav", pcm)
    (folder / "a-whole.txt").write_text(" ".join(s["text"] for s in ref["sentences"]))
    write_wav(folder / "b-first.wav", pcm[first["start"] : first["end"]])
    (folder / "b-first.txt").write_text(first["text"])
    out = tmp_path / "out"
    spec_decode.main(
        ["--heldout", str(folder), "--files", "2", "--long-speech", str(folder / "a-whole.wav")]
        + ["--cost-preset", "tiny", "--cost-seconds", "5", "--cost-max-tokens", "8"]
        + ["--out", str(out), "--no-render"]
    )
    report = json.loads((out / "report.json").read_text())
    tm_run, cost = report["trained_model"], report["pass_cost"]
    held, long = tm_run["heldout"], tm_run["long_speech"]
    assert held["utterances"] == 2 and held["identical_finals"] and long["identical_finals"]
    assert long["utterances"] == 1 and long["finals"] == held["finals"][:1]  # the same recording
    for run in (held, long):
        plain, drafted = run["modes"]["plain"], run["modes"]["drafted"]
        assert plain["generated_tokens_per_step"] == drafted["generated_tokens_per_step"]
        assert drafted["accepted_tokens"] > 0 and run["pass_ratio"] < 1
        assert drafted["passes_if_drafts_all_accepted"] <= drafted["forward_passes_per_step"]
    assert cost["identical"] and cost["accepted_tokens"] > 0
    assert cost["tokens_per_verification_pass"] > 1 and cost["ms_per_decode_pass_no_spec_engine"] > 0
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "performance.md").write_text(f"before\n{spec_decode.BEGIN}\nold\n{spec_decode.END}\nafter\n")
    block = spec_decode.render(report, docs)
    assert (docs / "performance.md").read_text() == f"before\n{block}\nafter\n"
    assert f"x{held['pass_ratio']:.2f}" in block and f"x{long['pass_ratio']:.2f}" in block
    assert "finals identical: **True**, **True**" in block
