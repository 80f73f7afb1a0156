"""The small test model trained in this repository (training/): real Qwen3-ASR architecture and the
real Qwen vocabulary, trained on synthetic English speech (espeak-ng, ~400 frequent English words).

It is **not Qwen3-ASR-0.6B**: it exists so that transcripts shown by the demo, the tests and the
benchmarks mean something when the real weights cannot be downloaded. Shipped compact
(``assets/test_model.safetensors``: the trained tensors, the used vocabulary rows and the one row all
unused output ids share; written by ``python -m training.export``) and expanded on first use into the
official checkpoint layout (config, ``thinker.*`` safetensors, tokenizer and processor files) that vLLM
and the official ``qwen-asr`` transformers backend load. The expansion is cached under
:func:`livekit_qwen_asr.synthetic.default_cache_dir`, published atomically, named by the compact file's
hash and checked against the hashes it recorded before every use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from . import synthetic

logger = logging.getLogger("livekit.plugins.qwen_asr")

TEST_MODEL_LABEL = "small test model trained on synthetic English speech, not Qwen3-ASR-0.6B"
EMBED_SEED = 0  # unused input-embedding rows (never fed by the task's prompts) come from this seed
EMBED_STD = 0.02
_MARKER = "test_model"


class TestModelUnavailableError(RuntimeError):
    """The compact test-model file is missing from this install (or not readable)."""

    __test__ = False  # not a pytest class


def compact_path() -> Path:
    return Path(str(resources.files("livekit_qwen_asr") / "assets" / "test_model.safetensors"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def info(path: Path | None = None) -> dict[str, Any]:
    """What the shipped model is and how far it was trained (read from the file's header, no torch)."""
    path = path or compact_path()
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise TestModelUnavailableError(f"test model not available at {path}: {e}") from e
    meta = header.get("__metadata__", {})
    return {
        "label": TEST_MODEL_LABEL,
        "path": str(path),
        "format": meta.get("format"),
        "trained": json.loads(meta.get("trained", "{}")),
    }


def is_test_model(model_dir: str | Path) -> bool:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg.get(_MARKER), dict)


def expand(out_dir: Path, compact: Path | None = None, *, cache_dir: Path | None = None) -> dict[str, Any]:
    """Write the official checkpoint layout of the compact model into ``out_dir``; config.json last."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    compact = compact or compact_path()
    with safe_open(str(compact), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    config = json.loads(meta["config"])
    text = config["thinker_config"]["text_config"]
    vocab, hidden = text["vocab_size"], text["hidden_size"]
    used = t["used_ids"]
    weights = {k.removeprefix("model."): v for k, v in t.items() if k.startswith("model.")}
    g = torch.Generator().manual_seed(EMBED_SEED)
    embed = torch.empty(vocab, hidden).normal_(0.0, EMBED_STD, generator=g)
    embed[used] = t["heads.emb"]
    lm_head = t["heads.other"][None].repeat(vocab, 1)
    lm_head[used] = t["heads.out"]
    weights["thinker.model.embed_tokens.weight"] = embed
    weights["thinker.lm_head.weight"] = lm_head

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").unlink(missing_ok=True)
    # tokenizer/processor files do not depend on the shapes
    synthetic.write_support_files(out_dir, synthetic.PRESETS["tiny"], cache_dir)
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"), {"format": "pt"}
    )
    trained = json.loads(meta.get("trained", "{}"))
    (out_dir / "README.md").write_text(
        f"# {TEST_MODEL_LABEL}\n\nExpanded by livekit_qwen_asr.test_model from {compact.name} "
        f"(training/ in the livekit-qwen-asr repository). Training so far: {json.dumps(trained)}.\n",
        encoding="utf-8",
    )
    config[_MARKER] = {
        "note": TEST_MODEL_LABEL,
        "compact_sha256": _sha256(compact),
        "weights_sha256": _sha256(out_dir / "model.safetensors"),
        "trained": trained,
    }
    synthetic._write_json(out_dir / "config.json", config)
    return config[_MARKER]


def test_model_dir(cache_dir: Path | None = None, compact: Path | None = None) -> Path:
    """Where :func:`ensure_test_model` keeps the expansion of ``compact`` (it may not exist yet)."""
    compact = compact or compact_path()
    if not compact.is_file():
        raise TestModelUnavailableError(f"test model not available: {compact} is missing")
    root = Path(cache_dir) if cache_dir is not None else synthetic.default_cache_dir()
    return root / f"qwen3-asr-test-model-{_sha256(compact)[:12]}"


def _verified(path: Path, compact: Path) -> bool:
    try:
        marker = json.loads((path / "config.json").read_text())[_MARKER]
        return marker["compact_sha256"] == _sha256(compact) and marker["weights_sha256"] == _sha256(
            path / "model.safetensors"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_test_model(cache_dir: Path | None = None, compact: Path | None = None) -> Path:
    """Path of the expanded test model, expanding it on first use (or again if its files changed)."""
    compact = compact or compact_path()
    target = test_model_dir(cache_dir, compact)
    if _verified(target, compact):
        return target
    if target.exists():
        logger.warning("test model cache at %s fails its hash check: expanding it again", target)
        shutil.rmtree(target, ignore_errors=True)
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    synthetic._remove_stale_tmp_dirs(root, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        expand(tmp, compact, cache_dir=root)
        tmp.chmod(0o755)
        synthetic._publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
