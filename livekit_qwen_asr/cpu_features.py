"""What this machine's CPU can do that changes which engine settings are fast.

Without bf16 matrix hardware (AVX-512 BF16 or AMX) vLLM cannot create its oneDNN bf16 matmul and
falls back to torch's bf16 linear, whose cost grows with every row: a prefill of a few hundred tokens
then runs several times slower than in float32 (docs/performance.md, "CPU settings")."""

from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flag -> its name in reports
BF16_MATRIX_FLAGS = {"avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX-BF16", "bf16": "Arm BF16"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's flags; empty where they cannot be read (no /proc/cpuinfo, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_matrix_hardware(flags: set[str]) -> bool | None:
    """Whether the CPU multiplies bf16 matrices in hardware; None when its flags are unknown."""
    if not flags:
        return None
    return any(flag in flags for flag in BF16_MATRIX_FLAGS)
