"""vLLM's wire format for one precomputed Qwen3-ASR audio item — no torch, no vLLM, no I/O.

`/inference/v1/generate` (vLLM's token-in/token-out endpoint, `--enable-scale-out`) takes multimodal
items as base64 msgpack `MultiModalKwargsItem`s: vLLM's `MsgpackEncoder` layout (`v1/serial_utils.py`:
a map of field name -> {"data": [dtype, shape, Ext(3, raw bytes)], "field": [factory, kwargs]}),
with the field configs of vLLM's Qwen3-ASR (`qwen3_asr._qwen3asr_field_config`). This module writes
that layout with a tiny msgpack encoder, so a client without torch or vLLM can send features.
tests/test_remote_engine.py decodes what it writes with vLLM's own decoder. The layout is vLLM's
internal format: a release that changes it fails the engine's start-up probe, which then falls back
to the chat path.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

_RAW_VIEW = 3  # vLLM's CUSTOM_TYPE_RAW_VIEW msgpack extension: a tensor's bytes inline


@dataclass(frozen=True)
class _Ext:
    code: int
    data: bytes


def packb(obj: Any) -> bytes:
    """msgpack bytes of None, bool, int, str, bytes, list/tuple, dict and `_Ext` (what items hold)."""
    out = bytearray()
    _pack(obj, out)
    return bytes(out)


def _pack(o: Any, out: bytearray) -> None:
    if o is None:
        out += b"\xc0"
    elif o is True or o is False:
        out += b"\xc3" if o else b"\xc2"
    elif isinstance(o, int):
        if 0 <= o < 0x80:
            out.append(o)
        elif -32 <= o < 0:
            out += struct.pack(">b", o)
        elif 0 <= o < 2**32:
            out += b"\xce" + struct.pack(">I", o)
        elif 0 <= o < 2**64:
            out += b"\xcf" + struct.pack(">Q", o)
        else:
            out += b"\xd3" + struct.pack(">q", o)
    elif isinstance(o, str):
        b = o.encode()
        out += (bytes([0xA0 | len(b)]) if len(b) < 32 else b"\xdb" + struct.pack(">I", len(b))) + b
    elif isinstance(o, bytes):
        out += b"\xc6" + struct.pack(">I", len(o)) + o
    elif isinstance(o, (list, tuple)):
        out += bytes([0x90 | len(o)]) if len(o) < 16 else b"\xdd" + struct.pack(">I", len(o))
        for x in o:
            _pack(x, out)
    elif isinstance(o, dict):
        out += bytes([0x80 | len(o)]) if len(o) < 16 else b"\xdf" + struct.pack(">I", len(o))
        for k, v in o.items():
            _pack(k, out)
            _pack(v, out)
    elif isinstance(o, _Ext):
        out += b"\xc9" + struct.pack(">Ib", len(o.data), o.code) + o.data
    else:
        raise TypeError(f"cannot msgpack {type(o).__name__}")


def _tensor(a: np.ndarray) -> list:
    dtype = {np.dtype("float32"): "float32", np.dtype("int64"): "int64"}[a.dtype]
    # little-endian (what vLLM's x86/ARM servers read), C order, 0-d arrays kept 0-d
    return [dtype, list(a.shape), _Ext(_RAW_VIEW, a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())]


def window_items(
    features: np.ndarray, sizes: tuple[int, ...], window_frames: int, skip: frozenset[int] = frozenset()
) -> list[bytes | None]:
    """msgpack `MultiModalKwargsItem` of each window of `features` ([n_mels, frames] float32, the
    whole utterance), as vLLM's processor builds them from the in-process engine's feature dict;
    None for the windows in `skip` (sent by hash)."""
    feats = np.asarray(features, dtype=np.float32)
    starts = np.cumsum((0,) + sizes)
    if starts[-1] != feats.shape[1]:
        raise ValueError(f"window sizes {sizes} do not cover {feats.shape[1]} frames")
    slices = [[[None, None, None], [int(a), int(b), None]] for a, b in pairwise(starts)]
    flat = ["flat", {"keep_on_cpu": False, "slices": slices, "dim": 1}]
    batched = ["batched", {"keep_on_cpu": True}]
    items = []
    for i, size in enumerate(sizes):
        if i in skip:
            items.append(None)
            continue
        mask = np.zeros(window_frames, np.int64)
        mask[:size] = 1
        items.append(
            packb(
                {
                    "input_audio_features": {
                        "data": _tensor(feats[:, starts[i] : starts[i + 1]]),
                        "field": flat,
                    },
                    "audio_feature_lengths": {"data": _tensor(np.array(size, np.int64)), "field": batched},
                    "feature_attention_mask": {"data": _tensor(mask), "field": batched},
                }
            )
        )
    return items


def item_hash(features_window: np.ndarray) -> str:
    """Content hash of one window's features: the server's cache key for the item (its encoder output
    and its place in the prefix cache), the same for every client that sends the same numbers."""
    a = np.ascontiguousarray(features_window, dtype=np.float32)
    h = hashlib.sha256(str(a.shape).encode())
    h.update(a.tobytes())
    return "lkqa-" + h.hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
