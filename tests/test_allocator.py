"""Allocator detection (tcmalloc is preloaded by the scripts for vLLM's CPU processes)."""

from __future__ import annotations

import os
from pathlib import Path

from livekit_qwen_asr import allocator


def _maps(tmp_path: Path, *libs: str) -> Path:
    p = tmp_path / "maps"
    lines = [f"7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/{lib}" for lib in libs]
    p.write_text("\n".join(lines) + "\n")
    return p


def test_loaded_allocator_reads_the_mapped_libraries(tmp_path):
    assert allocator.loaded_allocator(_maps(tmp_path, "libc.so.6")) == "glibc"
    assert (
        allocator.loaded_allocator(_maps(tmp_path, "libtcmalloc_minimal.so.4.5.10", "libc.so.6"))
        == "tcmalloc"
    )
    assert allocator.loaded_allocator(_maps(tmp_path, "libjemalloc.so.2")) == "jemalloc"
    assert allocator.loaded_allocator(tmp_path / "missing") == "unknown"


def test_this_process_matches_its_ld_preload():
    # scripts/test.sh preloads tcmalloc when installed; a plain `pytest` runs on glibc
    preloaded = "libtcmalloc" in os.environ.get("LD_PRELOAD", "")
    assert (allocator.loaded_allocator() == "tcmalloc") == preloaded


def test_advice_only_on_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "tcmalloc")
    assert allocator.allocator_advice() is None
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "glibc")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/usr/lib/x/libtcmalloc_minimal.so.4")
    assert "LD_PRELOAD=/usr/lib/x/libtcmalloc_minimal.so.4" in allocator.allocator_advice()
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert "apt-get install libtcmalloc-minimal4" in allocator.allocator_advice()
