"""bench/cpu_knobs.py (issue #15, item 3): its comparison with the baseline setting, its docs block, and
a smoke run on real vLLM engines (tiny checkpoint, two settings)."""

from __future__ import annotations

import json

import pytest

from bench import cpu_knobs


def _result(total: float, generated: list[str]) -> dict:
    return {
        "engine_start_s": 1.0,
        "steps": len(generated),
        "step_p50_s": total / len(generated),
        "step_p95_s": total / len(generated),
        "steps_total_s": total,
        "prefill_tokens_per_step": 100.0,
        "generated": generated,
        "forward_passes_per_step": 11.0,
        "draft_tokens": 0,
        "accepted_tokens": 0,
    }


def test_a_setting_is_compared_step_by_step_with_the_baseline_and_other_dtypes_are_not():
    results = {
        "default": _result(10.0, ["a", "b", "c"]),
        "block64": _result(8.0, ["a", "x", "c"]),
        "fp32": _result(12.0, ["q", "r", "s"]),
    }
    cpu_knobs.compare(results)
    assert results["default"]["same_text_as_default"] == 3 and results["default"]["time_vs_default"] == 1.0
    assert results["block64"]["same_text_as_default"] == 2 and results["block64"]["time_vs_default"] == 0.8
    assert results["fp32"]["same_text_as_default"] is None and results["fp32"]["time_vs_default"] == 1.2


def test_the_block_shows_every_setting(tmp_path):
    results = {"default": _result(10.0, ["a", "b"]), "omp1": _result(15.0, ["a", "b"])}
    results["default"].update(draft_tokens=12, accepted_tokens=9)
    cpu_knobs.compare(results)
    report = {
        "command": "python -m bench.cpu_knobs",
        "machine": "m",
        "date": "d",
        "preset": "0.6b",
        "seconds": 60.0,
        "cut_s": 30.0,
        "dtype": "auto",
        "settings": results,
    }
    (tmp_path / "performance.md").write_text(f"x\n{cpu_knobs.BEGIN}\nold\n{cpu_knobs.END}\ny\n")
    block = cpu_knobs.render(report, tmp_path)
    assert (tmp_path / "performance.md").read_text() == f"x\n{block}\ny\n"
    assert "| `omp1` | OMP on one core | 2 |" in block and "x1.50" in block and "2/2" in block
    assert "| 11.0 | 9/12 | 2/2 |" in block and "| 11.0 | - | 2/2 |" in block  # drafts: only where proposed
    (tmp_path / "performance.md").write_text(f"{block}\n{cpu_knobs.PAIRED_BEGIN}\n{cpu_knobs.PAIRED_END}\n")
    paired = cpu_knobs.render({**report, "paired": True}, tmp_path)
    assert (tmp_path / "performance.md").read_text() == f"{block}\n{paired}\n" and "took turns" in paired
    # a report names its settings as they were when it ran
    old = cpu_knobs.render({**report, "labels": {"default": "the defaults then"}}, tmp_path)
    assert "| `default` | the defaults then |" in old and "| `omp1` | OMP on one core |" in old


@pytest.mark.timeout(600)
def test_the_benchmark_runs_each_setting_on_its_own_engine(tmp_path):
    out = tmp_path / "out"
    cpu_knobs.main(
        ["--preset", "tiny", "--seconds", "24", "--settings", "default,block128"]
        + ["--dtype", "float32", "--paired", "--out", str(out), "--no-render"]
    )
    report = json.loads((out / "report.json").read_text())
    small, large = report["settings"]["default"], report["settings"]["block128"]
    assert small["steps"] == large["steps"] >= 12
    # in float32 the block size changes no output (cached KV equals a fresh prefill's) ...
    assert large["same_text_as_default"] == large["steps"]
    # ... and the smaller default block serves more of each prompt from the prefix cache
    assert small["prefill_tokens_per_step"] < large["prefill_tokens_per_step"]


def test_the_iomp_setting_swaps_vllms_gnu_openmp_for_intels(monkeypatch):
    # vLLM adds torch's libgomp to LD_PRELOAD once it starts an engine, and refuses both runtimes at once
    monkeypatch.setenv("LD_PRELOAD", "/lib/libtcmalloc_minimal.so.4:/site/torch.libs/libgomp-a34b3233.so.1")
    env = cpu_knobs.SPAWN_ENV["iomp"]()
    first, second = env["LD_PRELOAD"].split(":")
    assert first == "/lib/libtcmalloc_minimal.so.4" and second.endswith("/libiomp5.so")


def test_reports_name_the_cpus_bf16_matrix_hardware(tmp_path):
    """A verification pass's cost depends on it (torch's bf16 linear costs per row without it), so the
    reports of cpu_knobs and spec_decode say whether the CPU has it, read from /proc/cpuinfo's flags."""
    from bench.machine import machine_label
    from livekit_qwen_asr.cpu_features import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "fma"}  # the first CPU's
    assert cpu_flags(tmp_path / "missing") == set()
    assert machine_label({"avx2", "fma"}).endswith(", AVX2, no bf16 matrix hardware")
    assert machine_label({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}).endswith(
        ", AVX-512, AVX-512 BF16, AMX-BF16"
    )
    assert "bf16" not in machine_label(set())  # unknown: says nothing rather than guess
