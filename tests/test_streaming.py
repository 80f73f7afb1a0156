"""Unit tests of the pure streaming core, with the real Qwen tokenizer (no model, no asyncio)."""

from __future__ import annotations

import numpy as np
import pytest

from livekit_qwen_asr.errors import (
    InvalidAudioError,
    InvalidOptionError,
    StaleStepError,
    UnsupportedLanguageError,
)
from livekit_qwen_asr.prompt import chatml_base_prompt
from livekit_qwen_asr.streaming import StreamingConfig, StreamingTranscriber

CHUNK = 32000
EN = "language English<asr_text>"


def make(codec, **kw) -> StreamingTranscriber:
    return StreamingTranscriber(StreamingConfig(**kw), codec)


def noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def test_no_step_until_a_whole_chunk_is_pending(qwen_codec):
    t = make(qwen_codec)
    t.push_audio(noise(CHUNK - 1))
    assert not t.step_ready() and t.next_step() is None
    t.push_audio(noise(1))
    plan = t.next_step()
    assert plan is not None and plan.audio.shape[0] == CHUNK and plan.new_chunks == 1
    assert plan.prompt == chatml_base_prompt("") and plan.prefix == ""


def test_prefix_is_previous_decode_minus_k_tokens_after_unfixed_chunks(qwen_codec):
    t = make(qwen_codec)
    t.push_audio(noise(4 * CHUNK))
    outputs = [f"{EN}one two", f"{EN}one two three four five six seven", " five six seven eight"]
    raws = []
    for out in outputs:
        plan = t.next_step()
        if len(raws) < 2:
            assert plan.prefix == ""  # first unfixed_chunk_num=2 chunks: no prefix
        else:
            ids = qwen_codec.encode(raws[-1])
            assert plan.prefix == qwen_codec.decode(ids[:-5])
            assert plan.prompt == chatml_base_prompt("") + plan.prefix
        hyp = t.apply(plan, out)
        raws.append(hyp.raw)
        assert "<asr_text>" not in hyp.text and "language" not in hyp.text
    assert raws[-1] == qwen_codec.decode(qwen_codec.encode(raws[1])[:-5]) + outputs[2]


def test_stable_text_is_exactly_what_the_next_prefix_keeps(qwen_codec):
    t = make(qwen_codec)
    t.push_audio(noise(4 * CHUNK))
    h0 = t.apply(t.next_step(), f"{EN}alpha beta")
    assert h0.stable_text == ""  # the next step (chunk 1 < 2) has no prefix
    h1 = t.apply(t.next_step(), f"{EN}alpha beta gamma delta epsilon zeta")
    nxt = t.next_step()
    assert h1.stable_text == nxt.prefix.split("<asr_text>", 1)[1].strip()
    assert h1.text.startswith(h1.stable_text) and len(h1.stable_text) < len(h1.text)


def test_rollback_grows_k_while_prefix_ends_in_a_broken_character(qwen_codec):
    raw = f"{EN}hello 鬱龘齉爨"
    ids = qwen_codec.encode(raw)
    assert "\ufffd" in qwen_codec.decode(ids[:-5])  # precondition: a naive cut breaks a character
    t = make(qwen_codec, unfixed_chunk_num=0)
    t.push_audio(noise(2 * CHUNK))
    t.apply(t.next_step(), raw)
    prefix = t.next_step().prefix
    assert "\ufffd" not in prefix and raw.startswith(prefix)
    k = 6
    while "\ufffd" in qwen_codec.decode(ids[:-k]):
        k += 1
    assert prefix == qwen_codec.decode(ids[:-k])


def test_coalesced_step_covers_all_pending_chunks(qwen_codec):
    t = make(qwen_codec)
    t.push_audio(noise(3 * CHUNK + 500))
    plan = t.next_step(max_chunks=None)
    assert plan.new_chunks == 3 and plan.audio.shape[0] == 3 * CHUNK
    t.apply(plan, f"{EN}a b c d e f g h")
    assert t.pending_samples == 500
    assert t.next_step() is None
    t.push_audio(noise(CHUNK))
    assert t.next_step().prefix != ""  # chunk count, not step count, ends the unfixed phase


def test_audio_arriving_during_a_step_is_kept(qwen_codec):
    t = make(qwen_codec)
    a, b = noise(CHUNK, 1), noise(1234, 2)
    t.push_audio(a)
    plan = t.next_step()
    t.push_audio(b)  # arrives while the model runs
    t.apply(plan, f"{EN}x")
    assert t.pending_samples == 1234
    fin = t.finish_step()
    assert fin.final and np.array_equal(fin.audio, np.concatenate([a, b]))


def test_stale_plan_is_refused(qwen_codec):
    t = make(qwen_codec)
    t.push_audio(noise(2 * CHUNK))
    plan = t.next_step()
    t.apply(plan, "x")
    with pytest.raises(StaleStepError):
        t.apply(plan, "x")


def test_finish_flushes_tail_and_reset_starts_fresh(qwen_codec):
    t = make(qwen_codec)
    assert t.finish_step() is None and t.finalize().text == ""
    t.push_audio(noise(CHUNK + 7000))
    t.apply(t.next_step(), f"{EN}hello")
    fin = t.finish_step()
    assert fin.final and fin.audio.shape[0] == CHUNK + 7000 and fin.new_samples == 7000
    hyp = t.apply(fin, f"{EN}hello world")
    assert hyp.final and hyp.text == "hello world" and hyp.stable_text == "hello world"
    assert t.finalize().text == "hello world"
    t.reset()
    assert t.utterance_samples == 0 and t.pending_samples == 0 and t.finalize().text == ""
    t.push_audio(noise(CHUNK))
    assert t.next_step().prefix == ""


def test_finish_without_tail_keeps_last_hypothesis_as_final(qwen_codec):
    t = make(qwen_codec)
    t.push_audio(noise(CHUNK))
    t.apply(t.next_step(), f"{EN}only")
    assert t.finish_step() is None
    final = t.finalize()
    assert final.final and final.text == "only"


def test_forced_language_prompt_and_parse(qwen_codec):
    t = make(qwen_codec, language="en", context="Meeting about vLLM.")
    assert t.prompt_raw == chatml_base_prompt("Meeting about vLLM.") + EN
    t.push_audio(noise(CHUNK))
    hyp = t.apply(t.next_step(), "plain words")
    assert (hyp.language, hyp.text) == ("English", "plain words")


@pytest.mark.parametrize(
    "samples",
    [
        np.array([0.1, np.nan], np.float32),
        np.array([np.inf], np.float64),
        np.zeros((2, 10), np.float32),
        np.zeros(4, np.int32),
    ],
)
def test_bad_audio_gets_a_typed_error(qwen_codec, samples):
    t = make(qwen_codec)
    with pytest.raises(InvalidAudioError):
        t.push_audio(samples)
    assert t.pending_samples == 0


def test_int16_and_empty_audio(qwen_codec):
    t = make(qwen_codec)
    t.push_audio(np.zeros(0, np.float32))
    t.push_audio(np.array([16384, -32768], np.int16))
    assert t.pending_samples == 2
    plan = StreamingTranscriber(StreamingConfig(chunk_size_sec=0.01), qwen_codec)
    plan.push_audio(np.full(160, 16384, np.int16))
    assert plan.next_step().audio[0] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kw",
    [
        {"chunk_size_sec": 0},
        {"chunk_size_sec": -1.0},
        {"chunk_size_sec": float("nan")},
        {"chunk_size_sec": "2"},
        {"chunk_size_sec": 0.001},
        {"unfixed_token_num": -1},
        {"unfixed_chunk_num": -2},
        {"unfixed_token_num": 2.5},
        {"unfixed_chunk_num": True},
        {"context": 5},
    ],
)
def test_absurd_options_are_rejected(kw):
    with pytest.raises(InvalidOptionError):
        StreamingConfig(**kw)


def test_unknown_language_is_rejected():
    with pytest.raises(UnsupportedLanguageError):
        StreamingConfig(language="Klingon")
    assert StreamingConfig(language="zh-CN").language == "Chinese"
