"""Encoder-window reuse over HTTP: `/inference/v1/generate` requests for the remote engine.

The in-process engine sends an utterance as one feature item per 8 s encoder window, so vLLM serves
completed windows from its caches (features.py says why that is exact). Over HTTP the same works
through vLLM's token-in/token-out endpoint (`--enable-scale-out`): this side renders the prompt's token
ids (the Qwen chat layout, audio pads expanded) and sends the whole-utterance log-mel windows as
precomputed items (mm_wire.py), each keyed by a hash of its numbers. A completed window this stream
already sent to its server goes by hash only: the server takes it from its multimodal cache, and its
prefix-cache blocks match. A server that evicted it answers 500 ("cache miss ... resent with data");
the step is then sent once more with every window's data.

Features are computed here with torch (bit-identical to the server's extractor only with the same
arithmetic, which the engine's start-up probe checks against the server's own answer), so this path
needs `pip install 'livekit-qwen-asr[features]'`; without it the engine uses the chat path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from . import mm_wire
from .features import WINDOW_FRAMES, FeatureCache, FeatureItems, output_tokens, reencoded_seconds
from .prompt import AUDIO_PLACEHOLDER
from .streaming import TokenCodec

AUDIO_PAD = "<|audio_pad|>"


def client_feature_cache() -> tuple[FeatureCache | None, str | None]:
    """(per-stream feature state, None), or (None, why window reuse over HTTP cannot run here)."""
    try:
        import torch  # noqa: F401  (features.py computes with it)
        from transformers import WhisperFeatureExtractor
    except ImportError:
        return (
            None,
            "torch and transformers are not installed here (pip install 'livekit-qwen-asr[features]')",
        )
    from .features import self_check

    fe = WhisperFeatureExtractor(feature_size=128)  # Qwen3-ASR's: 128 mels, n_fft 400, hop 160, 16 kHz
    why = self_check(fe.mel_filters, fe)
    if why is not None:
        return None, why
    return FeatureCache(fe.mel_filters), None


@dataclass
class WindowStats:
    """Items sent with their data, items sent by hash only, and steps re-sent after a cache miss."""

    items_with_data: int = 0
    items_by_reference: int = 0
    resent_steps: int = 0


@dataclass
class GenerateStep:
    body: dict[str, Any]
    sizes: tuple[int, ...]  # log-mel frames per window
    hashes: list[str]
    by_reference: int  # windows sent by hash only
    pad_offset: int  # index of the first audio pad in the prompt


@dataclass
class _Held:
    server: str
    hashes: set[str] = field(default_factory=set)


class WindowRequests:
    """Builds one engine's `/inference/v1/generate` bodies and remembers, per stream, which windows
    its server holds. A stream's steps are serialised by the plugin; `items` and `build` may run in a
    worker thread, `sent` and `forget` run on the event loop."""

    def __init__(self, features: FeatureCache, codec: TokenCodec, model: str) -> None:
        self._features = features
        self._codec = codec
        self._model = model
        (self._pad,) = codec.encode(AUDIO_PAD)
        self._held: dict[str, _Held] = {}
        self.stats = WindowStats()

    def items(self, stream_id: str, audio: np.ndarray) -> FeatureItems:
        """The utterance's windows (CPU work: call it off the event loop)."""
        return self._features.items_for(stream_id, audio)

    def build(
        self,
        stream_id: str,
        server: str,
        prompt: str,
        items: FeatureItems,
        max_tokens: int,
        by_reference: bool,
    ) -> GenerateStep:
        feats = items.features.numpy()
        sizes = items.sizes
        starts = np.cumsum((0,) + sizes)
        hashes = [mm_wire.item_hash(feats[:, a:b]) for a, b in pairwise(starts)]
        held = self._held.get(stream_id)
        known = held.hashes if by_reference and held is not None and held.server == server else set()
        skip = frozenset(i for i, h in enumerate(hashes) if h in known)
        wire = mm_wire.window_items(feats, sizes, WINDOW_FRAMES, skip)
        data = [None if w is None else mm_wire.b64(w) for w in wire]
        ids = self._codec.encode(prompt)
        try:
            pad_at = ids.index(self._pad)
        except ValueError as e:
            raise ValueError(f"prompt has no {AUDIO_PLACEHOLDER}") from e
        counts = [output_tokens(s) for s in sizes]
        ids = ids[:pad_at] + [self._pad] * sum(counts) + ids[pad_at + 1 :]
        offsets = np.cumsum([pad_at] + counts)[:-1]  # each window's first pad
        body = {
            "model": self._model,
            "token_ids": ids,
            "features": {
                "mm_hashes": {"audio": hashes},
                "mm_placeholders": {
                    "audio": [{"offset": int(o), "length": c} for o, c in zip(offsets, counts, strict=True)]
                },
                "kwargs_data": {"audio": data},
            },
            "sampling_params": {
                "temperature": 0,
                "max_tokens": max_tokens,
                "logprobs": 0,
                "detokenize": True,
            },
            "output_mode": "text",
            "return_token_ids": True,
        }
        return GenerateStep(body, sizes, hashes, data.count(None), pad_at)

    def sent(self, stream_id: str, server: str, step: GenerateStep) -> None:
        """The server answered `step`: it holds these windows now (older ones of the stream are gone
        from its future requests, so they are not remembered)."""
        self._held[stream_id] = _Held(server, set(step.hashes))
        self.stats.items_by_reference += step.by_reference
        self.stats.items_with_data += len(step.hashes) - step.by_reference

    def forget(self, stream_id: str) -> None:
        self._held.pop(stream_id, None)
        self._features.forget(stream_id)


def encoded_seconds(step: GenerateStep, cached_tokens: int) -> float:
    """Seconds of the windows whose audio tokens reach past the prefix-cache hit (re-encoded)."""
    return reencoded_seconds(step.pad_offset, step.sizes, cached_tokens)
