"""What a benchmark report says about the machine it ran on: on CPU a step's cost depends on whether
the CPU has bf16 matrix hardware (livekit_qwen_asr/cpu_features.py)."""

from __future__ import annotations

import os
import platform

from livekit_qwen_asr.cpu_features import BF16_MATRIX_FLAGS, bf16_matrix_hardware, cpu_flags

# a resolved engine dtype (livekit_qwen_asr.engine.engine_dtype) as reports name it; "auto" is the
# checkpoint's dtype, bf16 for the Qwen3-ASR checkpoints and the synthetic ones
DTYPE_NAMES = {"auto": "bf16", "bfloat16": "bf16", "float32": "float32"}


def machine_label(flags: set[str] | None = None) -> str:
    """e.g. "x86_64 cpus=2, AVX2, no bf16 matrix hardware"."""
    flags = cpu_flags() if flags is None else flags
    label = f"{platform.machine()} cpus={os.cpu_count()}"
    if not flags:
        return label
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    bf16 = [name for flag, name in BF16_MATRIX_FLAGS.items() if flag in flags]
    parts = [label, *([isa] if isa else []), ", ".join(bf16) if bf16 else "no bf16 matrix hardware"]
    return ", ".join(parts)


def cpu_device_label(flags: set[str] | None = None) -> str:
    """The benchmark table's device, e.g. "CPU (2 cores, no bf16 matrix hardware)"."""
    has = bf16_matrix_hardware(cpu_flags() if flags is None else flags)
    note = {True: ", bf16 matrix hardware", False: ", no bf16 matrix hardware", None: ""}[has]
    return f"CPU ({os.cpu_count()} cores{note})"
