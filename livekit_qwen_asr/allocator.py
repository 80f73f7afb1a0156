"""Which malloc this process runs on. vLLM's CPU backend wants tcmalloc preloaded: on glibc malloc its
worker's RSS keeps creeping up under concurrent streams (docs/reliability.md#memory). vLLM forks its
EngineCore and worker from this process, so only `LD_PRELOAD` at interpreter start can change it
(scripts/preload.sh does that); here we only detect and explain."""

from __future__ import annotations

import glob
from pathlib import Path

_SEARCH = ("/usr/lib/*-linux-gnu", "/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def loaded_allocator(maps: Path = Path("/proc/self/maps")) -> str:
    """ "tcmalloc", "jemalloc" or "glibc" (the default), from the libraries mapped into this process."""
    try:
        text = maps.read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in text:
            return name
    return "glibc"


def find_tcmalloc() -> str | None:
    """Path of an installed libtcmalloc_minimal.so.4 (Debian: libtcmalloc-minimal4), if any."""
    for d in _SEARCH:
        if hits := sorted(glob.glob(f"{d}/libtcmalloc_minimal.so.4")):
            return hits[0]
    return None


def allocator_advice() -> str | None:
    """A warning for CPU engines not running on tcmalloc; None when there is nothing to say."""
    allocator = loaded_allocator()
    if allocator in ("tcmalloc", "jemalloc", "unknown"):
        return None
    lib = find_tcmalloc()
    how = (
        f"start the process with LD_PRELOAD={lib}"
        if lib
        else "install tcmalloc (Debian: apt-get install libtcmalloc-minimal4) and preload it"
    )
    return (
        "vLLM's CPU processes run on glibc malloc here: under concurrent streams their memory keeps "
        f"creeping up; {how} (the scripts do; docs/reliability.md#memory)"
    )
