"""Synthetic Qwen3-ASR checkpoint generator: tokenizer, config layout, weights, marker, cache.

Only the ``tiny`` preset is generated here; vLLM is never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from livekit_qwen_asr import synthetic

EXPECTED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|audio_start|>": 151669,
    "<|audio_end|>": 151670,
    "<|audio_pad|>": 151676,
    "<asr_text>": 151704,
}
CONTEXT = "hotwords: LiveKit, Qwen"
EXPECTED_PROMPT = (
    f"<|im_start|>system\n{CONTEXT}<|im_end|>\n<|im_start|>user\n"
    "<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n<|im_start|>assistant\n"
)
MESSAGES = [
    {"role": "system", "content": CONTEXT},
    {"role": "user", "content": [{"type": "audio", "audio": ""}]},
]
ROUND_TRIP_TEXTS = [
    "Hello world, this is a test.",
    "你好，世界！今天天气很好。",
    "language Chinese<asr_text>我们明天见。",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "Ünïcödé café naïve 日本語 한국어 😀🎉",
    "don't I'll we've 12345 3.14159",
]


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A per-session tokenizer cache (these tests never write to ~/.cache)."""
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture(scope="session")
def tiny(cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    summary = synthetic.generate("tiny", out, seed=0, cache_dir=cache_root)
    return out, summary


@pytest.fixture(scope="session")
def tiny_path(tiny: tuple[Path, dict[str, Any]]) -> Path:
    return tiny[0]


@pytest.fixture(scope="session")
def tok(tiny_path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_path / "tokenizer.json"))


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- files ------------------------------------------------------------------------------------------


def test_checkpoint_files(tiny_path: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "chat_template.json",
        "generation_config.json",
        "SYNTHETIC.md",
    ):
        assert (tiny_path / name).is_file(), name


# --- tokenizer --------------------------------------------------------------------------------------


def test_special_token_ids_at_real_positions(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() == synthetic.VOCAB_SIZE == 151936
    for content, token_id in EXPECTED_IDS.items():
        assert tok.token_to_id(content) == token_id, content
        assert tok.id_to_token(token_id) == content
        assert tok.encode(content, add_special_tokens=False).ids == [token_id]
    assert synthetic.SPECIAL_TOKEN_IDS == EXPECTED_IDS
    # every id decodes, including the padding rows at the end of the embedding
    assert tok.id_to_token(151643 - 1) is not None
    assert tok.id_to_token(151935) is not None


def test_asr_text_is_not_special(tok: Tokenizer, tiny_path: Path) -> None:
    added = {t["content"]: t for t in _json(tiny_path / "tokenizer.json")["added_tokens"]}
    assert added["<asr_text>"]["special"] is False
    for content in EXPECTED_IDS:
        if content != "<asr_text>":
            assert added[content]["special"] is True, content
    # not special => it survives skip_special_tokens, the ChatML tokens do not
    ids = tok.encode("<|im_start|>language English<asr_text>hi<|im_end|>", add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=True) == "language English<asr_text>hi"

    cfg = _json(tiny_path / "tokenizer_config.json")
    assert cfg["added_tokens_decoder"]["151704"]["special"] is False
    assert cfg["added_tokens_decoder"]["151676"]["special"] is True
    assert len(cfg["added_tokens_decoder"]) == 151936 - 151643


def test_tokenizer_config(tiny_path: Path) -> None:
    cfg = _json(tiny_path / "tokenizer_config.json")
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == "<|endoftext|>"
    assert cfg["audio_token"] == "<|audio_pad|>"
    assert cfg["audio_bos_token"] == "<|audio_start|>"
    assert cfg["audio_eos_token"] == "<|audio_end|>"
    assert cfg["chat_template"] == synthetic.CHAT_TEMPLATE
    assert _json(tiny_path / "chat_template.json")["chat_template"] == synthetic.CHAT_TEMPLATE
    assert _json(tiny_path / "special_tokens_map.json")["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_known_qwen_ids(tok: Tokenizer, tiny_path: Path) -> None:
    assert tok.encode("Hello world", add_special_tokens=False).ids == [9707, 1879]
    assert tok.encode("user", add_special_tokens=False).ids == [872]
    assert _json(tiny_path / "config.json")["thinker_config"]["user_token_id"] == 872


def test_matches_tiktoken(tok: Tokenizer) -> None:
    """The converted BPE tokenizes exactly like tiktoken with the same ranks (ordinary text)."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = synthetic._load_ranks(synthetic._tiktoken_path())
    enc = tiktoken.Encoding("qwen-test", pat_str=synthetic._PAT_STR, mergeable_ranks=ranks, special_tokens={})
    text = "\n".join(ROUND_TRIP_TEXTS) + "\n" + Path(synthetic.__file__).read_text(encoding="utf-8")
    text = text.replace("<|", "< |").replace("<asr_text>", "< asr_text>")  # no added tokens here
    assert tok.encode(text, add_special_tokens=False).ids == enc.encode(text)


def test_prompt_tokenization(tok: Tokenizer) -> None:
    ids = tok.encode(EXPECTED_PROMPT, add_special_tokens=False).ids
    assert ids[0] == 151644
    i = ids.index(151669)
    assert ids[i : i + 4] == [151669, 151676, 151670, 151645]
    assert tok.decode(ids, skip_special_tokens=False) == EXPECTED_PROMPT


def test_chat_template_jinja(tiny_path: Path) -> None:
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
    template = env.from_string(synthetic.CHAT_TEMPLATE)
    assert template.render(messages=MESSAGES, add_generation_prompt=True) == EXPECTED_PROMPT
    # list-form system content (what transformers' Qwen3ASRProcessor builds) renders the same
    listed = [{"role": "system", "content": [{"type": "text", "text": CONTEXT}]}, MESSAGES[1]]
    assert template.render(messages=listed, add_generation_prompt=True) == EXPECTED_PROMPT
    # empty context keeps an empty system turn, like the official SDK's messages
    empty = [{"role": "system", "content": ""}, MESSAGES[1]]
    assert template.render(messages=empty, add_generation_prompt=True).startswith(
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|audio_start|>"
    )
    assert not template.render(messages=MESSAGES, add_generation_prompt=False).endswith("assistant\n")


def test_transformers_tokenizer(tiny_path: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_path))
    assert len(hf) == 151936
    assert hf.eos_token_id == 151645 and hf.pad_token_id == 151643
    assert hf.convert_tokens_to_ids("<asr_text>") == 151704
    assert getattr(hf, "audio_token", None) == "<|audio_pad|>"
    for text in ROUND_TRIP_TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False).ids
        assert hf.decode(ids) == text
    rendered = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered == EXPECTED_PROMPT


# --- config -----------------------------------------------------------------------------------------


def test_config_layout(tiny_path: Path) -> None:
    cfg = _json(tiny_path / "config.json")
    assert cfg["model_type"] == "qwen3_asr"
    assert cfg["architectures"] == ["Qwen3ASRForConditionalGeneration"]
    thinker = cfg["thinker_config"]
    assert thinker["audio_token_id"] == 151676
    assert thinker["audio_start_token_id"] == 151669
    assert thinker["audio_end_token_id"] == 151670
    audio, text = thinker["audio_config"], thinker["text_config"]
    assert audio["model_type"] == "qwen3_asr_audio_encoder"
    assert text["model_type"] == "qwen3_asr_text"
    # the real audio geometry: 1 s conv chunks, 8 s attention windows, 128 mel bins
    assert (audio["n_window"], audio["n_window_infer"], audio["conv_chunksize"]) == (50, 800, 500)
    assert audio["num_mel_bins"] == 128
    assert audio["output_dim"] == text["hidden_size"]
    assert audio["d_model"] % audio["encoder_attention_heads"] == 0
    assert text["vocab_size"] == 151936
    assert sum(text["rope_scaling"]["mrope_section"]) == text["head_dim"] // 2
    assert text["eos_token_id"] == 151645
    assert cfg["tie_word_embeddings"] == text["tie_word_embeddings"] == thinker["tie_word_embeddings"]

    pre = _json(tiny_path / "preprocessor_config.json")
    assert pre["feature_extractor_type"] == "WhisperFeatureExtractor"
    assert pre["feature_size"] == 128 and pre["sampling_rate"] == 16000 and pre["hop_length"] == 160
    gen = _json(tiny_path / "generation_config.json")
    assert 151645 in gen["eos_token_id"]


def _expected_keys(cfg: dict[str, Any]) -> set[str]:
    audio, text = cfg["thinker_config"]["audio_config"], cfg["thinker_config"]["text_config"]
    at, tm = "thinker.audio_tower.", "thinker.model."
    keys = {at + f"conv2d{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias")}
    keys |= {at + "conv_out.weight", at + "ln_post.weight", at + "ln_post.bias"}
    keys |= {at + f"proj{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    for i in range(audio["encoder_layers"]):
        p = f"{at}layers.{i}."
        for mod in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "self_attn_layer_norm",
            "fc1",
            "fc2",
            "final_layer_norm",
        ):
            keys |= {p + mod + ".weight", p + mod + ".bias"}
    keys |= {tm + "embed_tokens.weight", tm + "norm.weight"}
    for i in range(text["num_hidden_layers"]):
        p = f"{tm}layers.{i}."
        for mod in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "self_attn.q_norm",
            "self_attn.k_norm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ):
            keys.add(p + mod + ".weight")
    if not text["tie_word_embeddings"]:
        keys.add("thinker.lm_head.weight")
    return keys


def test_safetensors_keys_and_shapes(tiny: tuple[Path, dict[str, Any]]) -> None:
    from safetensors import safe_open

    path, summary = tiny
    cfg = _json(path / "config.json")
    audio, text = cfg["thinker_config"]["audio_config"], cfg["thinker_config"]["text_config"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert all(k.startswith("thinker.") for k in keys)
        assert keys == _expected_keys(cfg)
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}

    h, d, ds = text["hidden_size"], audio["d_model"], audio["downsample_hidden_size"]
    assert shapes["thinker.model.embed_tokens.weight"] == (151936, h)
    assert shapes["thinker.audio_tower.conv2d1.weight"] == (ds, 1, 3, 3)
    assert shapes["thinker.audio_tower.conv_out.weight"] == (d, ds * 16)  # 128 mel bins / 8
    assert shapes["thinker.audio_tower.proj2.weight"] == (audio["output_dim"], d)
    assert shapes["thinker.model.layers.0.self_attn.q_proj.weight"] == (
        text["num_attention_heads"] * text["head_dim"],
        h,
    )
    assert shapes["thinker.model.layers.0.self_attn.k_proj.weight"] == (
        text["num_key_value_heads"] * text["head_dim"],
        h,
    )
    assert dtypes == {{"bfloat16": "BF16", "float32": "F32"}[cfg["torch_dtype"]]}

    n_params = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        n_params += n
    assert summary["n_params"] == n_params == synthetic.count_params("tiny")
    assert summary["n_tensors"] == len(keys)


def test_weights_load_with_safetensors_torch(tiny_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    sd = load_file(str(tiny_path / "model.safetensors"))
    emb = sd["thinker.model.embed_tokens.weight"].float()
    assert torch.isfinite(emb).all()
    assert emb.std() > 0
    norm = sd["thinker.model.norm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))


def test_presets() -> None:
    assert synthetic.count_params("0.6b") == 782_426_112  # real Qwen3-ASR-0.6B, tied embeddings
    p = synthetic.PRESETS["0.6b"]
    assert (p.audio_d_model, p.audio_layers, p.audio_heads, p.audio_ffn) == (896, 18, 14, 3584)
    assert (p.hidden_size, p.text_layers, p.num_heads, p.num_kv_heads, p.head_dim) == (1024, 28, 16, 8, 128)
    assert p.tie_word_embeddings and p.dtype == "bfloat16"
    with pytest.raises(ValueError):
        synthetic.count_params("7b")


# --- marker -----------------------------------------------------------------------------------------


def test_synthetic_marker(tiny_path: Path, tmp_path: Path) -> None:
    marker = _json(tiny_path / "config.json")["synthetic"]
    assert marker["preset"] == "tiny" and marker["seed"] == 0
    assert "not a transcription" in marker["note"]
    assert "not a transcription" in (tiny_path / "SYNTHETIC.md").read_text(encoding="utf-8")
    assert synthetic.is_synthetic(tiny_path)
    assert synthetic.is_synthetic(str(tiny_path))

    assert not synthetic.is_synthetic(tmp_path / "missing")
    assert not synthetic.is_synthetic("Qwen/Qwen3-ASR-0.6B")
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text(json.dumps({"model_type": "qwen3_asr"}))
    assert not synthetic.is_synthetic(real)
    with pytest.raises(FileExistsError):
        synthetic.generate("tiny", real)


# --- determinism, cache, CLI ------------------------------------------------------------------------


def test_ensure_checkpoint_caches(tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real_generate = synthetic.generate

    def counting_generate(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(Path(args[1]))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate", counting_generate)
    first = synthetic.ensure_checkpoint("tiny", cache_dir=tmp_path, seed=0)
    assert len(calls) == 1
    assert first.parent == tmp_path and "tiny" in first.name
    assert synthetic.is_synthetic(first)
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    second = synthetic.ensure_checkpoint("tiny", cache_dir=tmp_path, seed=0)
    assert second == first
    assert len(calls) == 1  # not regenerated
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    # written into a temp dir, then renamed: nothing else is left behind
    leftovers = [p.name for p in tmp_path.iterdir() if p != first and not p.name.startswith("tokenizer-")]
    assert leftovers == []
    # same seed => byte-identical weights
    assert _sha256(first / "model.safetensors") == _sha256(tiny_path / "model.safetensors")


def test_ensure_checkpoint_aborted_run_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_generate(preset: str, out_dir: Path, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
        (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.ensure_checkpoint("tiny", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_seed_changes_weights_and_cli(
    tiny_path: Path,
    cache_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(synthetic.CACHE_ENV, str(cache_root))
    out = tmp_path / "seed1"
    assert synthetic.main(["--preset", "tiny", str(out), "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["preset"] == "tiny" and summary["seed"] == 1
    assert summary["n_params"] == synthetic.count_params("tiny")
    assert _json(out / "config.json")["synthetic"]["seed"] == 1
    assert _sha256(out / "model.safetensors") != _sha256(tiny_path / "model.safetensors")
    # the tokenizer came from the cache, not rebuilt
    assert summary["tokenizer_s"] < 1.0
    assert [p.name for p in cache_root.iterdir() if p.name.startswith("tokenizer-")]


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path / "c"))
    assert synthetic.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(synthetic.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert synthetic.default_cache_dir() == tmp_path / "xdg" / "livekit-qwen-asr"
    assert os.fspath(synthetic.default_cache_dir()).endswith("livekit-qwen-asr")
