"""The prepared GPU check (bench/gpu_check.py) run on CPU: its ramp logic, its exactness comparison
and its report, on the shared tiny engine (the GPU run itself needs a CUDA machine)."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench import gpu_check


def _stage(n: int, real_time: bool) -> dict:
    return {"streams": n, "real_time": real_time}


def test_the_ramp_doubles_then_bisects_then_stops():
    assert gpu_check.next_count([], 1024) == 1
    assert gpu_check.next_count([_stage(1, True), _stage(2, True)], 1024) == 4
    assert gpu_check.next_count([_stage(256, True), _stage(512, False)], 1024) == 384
    ran = [_stage(256, True), _stage(512, False), _stage(384, True), _stage(448, False)]
    assert gpu_check.next_count(ran, 1024) == 416
    assert gpu_check.next_count(ran + [_stage(416, True), _stage(432, False)], 1024) is None  # 432-416 < 26
    assert gpu_check.next_count([_stage(512, True)], 512) is None  # the ceiling
    assert gpu_check.next_count([_stage(1, False)], 1024) is None  # not even one stream


def test_without_cuda_the_full_check_refuses_up_front():
    args = gpu_check.parse_args([])
    assert (args.preset, args.budget_min, args.max_streams) == ("0.6b", 8.0, 1024)
    with pytest.raises(SystemExit, match="no CUDA device"):
        asyncio.run(gpu_check.amain(args))


@pytest.mark.timeout(300)
async def test_dry_run_on_the_tiny_engine(engine):
    args = gpu_check.parse_args(["--dry-run", "--stage-seconds", "4"])
    cfg = gpu_check.CheckConfig(
        args.preset, args.exact_seconds, args.stage_seconds, args.max_streams, 170.0, time.monotonic()
    )
    r = await gpu_check.run_check(engine, cfg, log=lambda _: None)
    ex = r["exactness"]
    # every step identical, on the session engine whatever earlier tests left in its caches (the check
    # empties them first: without that, not every step matched in the full suite)
    assert ex["steps_compared"] == ex["steps_ours"] == ex["steps_official"] == 5, ex
    assert ex["identical"] and ex["same_steps"] == 5, ex
    assert [s["streams"] for s in r["stages"]][:1] == [1]
    assert all(s["steps"] >= 2 and s["step_p95_s"] > 0 for s in r["stages"])
    assert r["real_time_streams"] in {0, 1, 2}
    text = gpu_check.summary(r | {"device": "CPU", "preset": "tiny", "dtype": "float32", "engine_start_s": 1})
    assert f"{ex['same_steps']}/{ex['steps_compared']} steps identical" in text
    assert text.count("\n| ") == len(r["stages"]) + 1  # header + one row per stage


@pytest.mark.timeout(120)
async def test_a_spent_budget_still_measures_one_stream(engine):
    cfg = gpu_check.CheckConfig("tiny", 4.0, 4.0, 1024, 0.0, time.monotonic())
    r = await gpu_check.run_check(engine, cfg, log=lambda _: None)
    assert [s["streams"] for s in r["stages"]] == [1] and r["one_stream"] is r["stages"][0]
    assert r["stopped"].startswith("time budget") if r["stages"][0]["real_time"] else "stopped" not in r
