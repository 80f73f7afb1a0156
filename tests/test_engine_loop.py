"""The in-process engine and the caller's event loop, request rejection, memory options, logprobs.

- Starting, restarting and closing the engine (the library path: `STT(model=...)` ->
  `get_shared_engine` -> `SupervisedEngine` -> `VLLMEngine.start`) must not block the loop that serves
  streams: a loop-lag probe (a task sleeping 50 ms in a loop) records the worst lateness meanwhile.
- Requests the model can never take (prompt over max_model_len, text the tokenizer cannot encode) are
  `RequestRejectedError` (not retried), and the engine keeps working afterwards.
- `EngineOptions.gpu_memory_utilization`: validated, passed to vLLM on CUDA only; vLLM's "memory does
  not fit" start-up failures become an `EngineUnavailableError` that names the option and its value.
- `StepResult.token_logprobs`: one logprob per generated token, greedy outputs unchanged.
"""

from __future__ import annotations

import asyncio
import math
import os
import time

import numpy as np
import psutil
import pytest

from livekit_qwen_asr.engine import (
    CPU_KV_BLOCK_TOKENS,
    OMP_BIND_ENV,
    EngineOptions,
    StepRequest,
    VLLMEngine,
    _engine_kwargs,
    _map_start_error,
    _map_vllm_error,
    close_shared_engines,
    engine_dtype,
    get_shared_engine,
    omp_binding,
)
from livekit_qwen_asr.errors import (
    EngineError,
    EngineUnavailableError,
    InvalidOptionError,
    RequestRejectedError,
)
from livekit_qwen_asr.supervisor import SupervisedEngine

SR = 16000
MAX_LAG_S = 5.0  # the freeze was the whole start-up (40-150 s); what is left (~0.3-1.7 s on 2 loaded
# cores) are C calls in the start-up thread that hold the GIL (e.g. json-decoding tokenizer.json)

pytestmark = pytest.mark.timeout(600)


class LoopLag:
    """A task that sleeps `period` in a loop and records the worst lateness of its wake-ups."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.worst = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, loop.time() - t - self.period)
            self.ticks += 1

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0)  # the probe is running before the measured work starts
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await asyncio.sleep(0)  # a last wake-up after the measured work
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def _speech(speech16k: np.ndarray, seconds: float) -> np.ndarray:
    reps = int(np.ceil(seconds * SR / speech16k.shape[0]))
    return (np.tile(speech16k, reps)[: int(seconds * SR)] / 32768).astype(np.float32)


def _options(tiny_checkpoint, **changes) -> EngineOptions:
    base = dict(model=str(tiny_checkpoint), max_model_len=4096, kv_cache_gib=1, dtype="float32")
    base.update(changes)
    return EngineOptions(**base)


def _engine_core(exclude: set[int]) -> psutil.Process:
    """The EngineCore started by this test (not the shared test engine's)."""
    (core,) = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in exclude and p.name().startswith("VLLM::EngineCore")
    ]
    return core


def _worker_cores(core: psutil.Process) -> set[int]:
    """The cores an EngineCore's model worker threads may run on (vLLM binds them at start; the
    processes' environments are unreadable once vLLM sets their titles)."""
    workers = [p for p in core.children(recursive=True) if p.name().startswith("VLLM::Worker")]
    assert workers, [p.name() for p in core.children(recursive=True)]
    return {c for w in workers for t in w.threads() for c in psutil.Process(t.id).cpu_affinity()}


def _kill_engine_core(exclude: set[int]) -> None:
    """SIGKILL the EngineCore started by this test (not the shared test engine's)."""
    core = _engine_core(exclude)
    victims = [core, *core.children(recursive=True)]
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=30)


# -- item 6 / 13: start, restart and close off the caller's loop ------------------------------------
async def test_shared_engine_start_restart_and_close_keep_the_loop_responsive(tiny_checkpoint, speech16k):
    others = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. the shared test engine
    caller_binding = os.environ.get(OMP_BIND_ENV)
    # max_restarts=2 also checks that get_shared_engine honours EngineOptions.max_restarts;
    # cpu_threads differs from the shared test engine's (all cores), started earlier in this process
    options = _options(tiny_checkpoint, max_restarts=2, mm_cache_gib=0.01, cpu_threads="0")
    audio = _speech(speech16k, 3)
    try:
        t0 = time.monotonic()
        async with LoopLag() as lag:  # the library path: STT(model=...) -> get_shared_engine
            sup = await get_shared_engine(options)
        start_s = time.monotonic() - t0
        assert isinstance(sup, SupervisedEngine) and sup.max_restarts == 2
        assert lag.worst < MAX_LAG_S, f"start-up froze the loop for {lag.worst:.1f} s (start {start_s:.0f} s)"
        assert lag.ticks > start_s / 0.05 / 4  # the probe really ran all along

        # the AsyncLLM built off the loop serves steps on this loop
        request = StepRequest(sup.base_prompt(""), audio, 4, "s1")
        first = await sup.step(request)
        assert first.generated_tokens > 0
        # this engine's EngineCore binds its own cores; the caller's environment is as it was
        assert _worker_cores(_engine_core(others)) == {0}
        assert os.environ.get(OMP_BIND_ENV) == caller_binding

        _kill_engine_core(others)
        t0 = time.monotonic()
        async with LoopLag() as lag:  # death -> aclose of the dead engine -> a new start
            with pytest.raises(EngineUnavailableError):
                await sup.step(request)
            assert sup.state == "restarting"
            await sup.until_ready()
        restart_s = time.monotonic() - t0
        assert sup.restarts == 1 and sup.state == "running"
        assert lag.worst < MAX_LAG_S, f"the restart froze the loop for {lag.worst:.1f} s ({restart_s:.0f} s)"
        again = await sup.step(request)
        assert again.text == first.text  # greedy, same engine options
        assert _worker_cores(_engine_core(others)) == {0}  # the restart binds alike

        async with LoopLag() as lag:
            await close_shared_engines()
        assert lag.worst < MAX_LAG_S, f"shutdown froze the loop for {lag.worst:.1f} s"
    finally:
        await close_shared_engines()


async def test_a_start_that_cannot_fit_its_kv_cache_fails_clearly_without_blocking(tiny_checkpoint):
    """CPU twin of the GPU case: vLLM reports (in the EngineCore process) that the KV cache needed for
    max_model_len does not fit; the caller gets a typed error naming our option and its value."""
    options = _options(tiny_checkpoint, kv_cache_gib=1e-6, reuse_windows=False)
    async with LoopLag() as lag:
        with pytest.raises(EngineUnavailableError) as info:
            await VLLMEngine.start(options)
    msg = str(info.value)
    assert "kv_cache_gib=1e-06" in msg and "max_model_len=4096" in msg, msg
    assert "KV cache" in msg  # vLLM's own reason is kept
    assert lag.worst < MAX_LAG_S, f"a failed start froze the loop for {lag.worst:.1f} s"


# -- item 7: requests the model can never take are rejected, not retried ----------------------------
async def test_prompt_over_max_model_len_is_rejected_not_retried(engine, speech16k):
    audio = _speech(speech16k, 2)
    prompt = engine.base_prompt("keyterm " * 5000)  # far over max_model_len=4096 tokens
    with pytest.raises(RequestRejectedError, match="maximum (context|model) length") as info:
        await engine.step(StepRequest(prompt, audio, 4, "long"))
    assert not info.value.retryable
    ok = await engine.step(StepRequest(engine.base_prompt(""), audio, 4, "after-long"))
    for stream_id in ("long", "after-long"):  # the shared engine's per-stream feature caches
        engine.release_stream(stream_id)
    assert ok.generated_tokens > 0  # the engine is unharmed


@pytest.mark.parametrize("context", ["\ud800", "names: Zo\udcffe"])
async def test_text_the_tokenizer_cannot_encode_is_rejected(engine, speech16k, context):
    audio = _speech(speech16k, 2)
    prompt = engine.base_prompt(context)
    with pytest.raises(RequestRejectedError, match="cannot be encoded") as info:
        await engine.step(StepRequest(prompt, audio, 4, "surrogate"))
    assert not info.value.retryable
    ok = await engine.step(StepRequest(engine.base_prompt("names: Zoe"), audio, 4, "after-surrogate"))
    for stream_id in ("surrogate", "after-surrogate"):
        engine.release_stream(stream_id)
    assert ok.generated_tokens > 0


def test_vllm_errors_map_to_retryable_or_not():
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    rejected = _map_vllm_error(VLLMValidationError("The decoder prompt is longer than ..."))
    assert isinstance(rejected, RequestRejectedError) and not rejected.retryable
    assert isinstance(_map_vllm_error(EngineDeadError()), EngineUnavailableError)
    # generate() wraps unexpected errors: the cause decides
    for cause, kind in (
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "x"), RequestRejectedError),
        (RuntimeError("boom"), EngineError),
    ):
        try:
            raise EngineGenerateError() from cause
        except EngineGenerateError as wrapped:
            mapped = _map_vllm_error(wrapped)
        assert type(mapped) is kind, (cause, mapped)
    assert _map_vllm_error(RuntimeError("boom")).retryable


# -- item 13: gpu_memory_utilization --------------------------------------------------------------
def test_gpu_memory_utilization_is_validated():
    assert EngineOptions().gpu_memory_utilization == 0.3
    for ok in (0.05, 0.3, 1.0, 1):
        assert EngineOptions(gpu_memory_utilization=ok).gpu_memory_utilization == ok
    for bad in (0, 0.0, -0.1, 1.01, 2, math.nan, math.inf, True, "0.5", None):
        with pytest.raises(InvalidOptionError, match="gpu_memory_utilization"):
            EngineOptions(gpu_memory_utilization=bad)


def test_gpu_memory_utilization_reaches_vllm_on_cuda_only():
    options = EngineOptions(gpu_memory_utilization=0.45)
    gpu = _engine_kwargs(options, cuda=True, kv_env=False)
    assert gpu["gpu_memory_utilization"] == 0.45 and "kv_cache_memory_bytes" not in gpu
    cpu = _engine_kwargs(options, cuda=False, kv_env=False)
    assert "gpu_memory_utilization" not in cpu and cpu["kv_cache_memory_bytes"] == 2 * 2**30
    assert _engine_kwargs(EngineOptions(), cuda=True, kv_env=False)["gpu_memory_utilization"] == 0.3


# -- issue #15: KV block size ----------------------------------------------------------------------
def test_kv_block_tokens_is_validated_and_defaults_to_the_measured_cpu_block():
    for bad in (0, 8, 24, -16, True, 32.0, "32"):
        with pytest.raises(InvalidOptionError, match="kv_block_tokens"):
            EngineOptions(kv_block_tokens=bad)
    assert _engine_kwargs(EngineOptions(), cuda=False, kv_env=False)["block_size"] == CPU_KV_BLOCK_TOKENS
    assert "block_size" not in _engine_kwargs(EngineOptions(), cuda=True, kv_env=False)  # vLLM's own
    for cuda in (False, True):
        kw = _engine_kwargs(EngineOptions(kv_block_tokens=128), cuda=cuda, kv_env=False)
        assert kw["block_size"] == 128


def test_auto_dtype_is_float32_on_a_cpu_without_bf16_matrix_hardware(monkeypatch):
    """There torch's bf16 fallback makes prefill several times slower (docs/performance.md)."""
    from livekit_qwen_asr import engine as engine_module

    avx2, zen4, sapphire, graviton = {"avx2", "fma"}, {"avx2", "avx512_bf16"}, {"amx_bf16"}, {"asimd", "bf16"}
    auto = EngineOptions()
    assert engine_dtype(auto, cuda=False, flags=avx2) == "float32"
    for flags in (zen4, sapphire, graviton, set()):  # bf16 hardware, or flags unknown: the checkpoint's
        assert engine_dtype(auto, cuda=False, flags=flags) == "auto"
    assert engine_dtype(auto, cuda=True, flags=avx2) == "auto"
    for explicit in ("bfloat16", "float32", "float16"):  # an explicit dtype is kept everywhere
        assert engine_dtype(EngineOptions(dtype=explicit), cuda=False, flags=avx2) == explicit
    # and it is what vLLM gets
    monkeypatch.setattr(engine_module, "cpu_flags", lambda: avx2)
    assert _engine_kwargs(auto, cuda=False, kv_env=False)["dtype"] == "float32"
    assert _engine_kwargs(auto, cuda=True, kv_env=False)["dtype"] == "auto"
    monkeypatch.setattr(engine_module, "cpu_flags", lambda: zen4)
    assert _engine_kwargs(auto, cuda=False, kv_env=False)["dtype"] == "auto"


def test_cpu_threads_wins_over_the_environment_which_wins_over_all_cores(monkeypatch):
    # e.g. left by the caller, or by an earlier engine in this process before the binding was scoped
    monkeypatch.setenv(OMP_BIND_ENV, "0-1")
    assert omp_binding(EngineOptions(cpu_threads="0")) == "0"
    assert omp_binding(EngineOptions()) == "0-1"
    monkeypatch.delenv(OMP_BIND_ENV)
    assert omp_binding(EngineOptions()) == f"0-{(os.cpu_count() or 1) - 1}"


# vLLM 0.32's own texts (v1/core/kv_cache_utils.py, v1/worker/utils.py, v1/worker/gpu_worker.py)
_VLLM_MEMORY_ERRORS = [
    "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
    "when initializing the engine (this flag also controls CPU memory reservation on the CPU backend, "
    "despite its name).",
    "ValueError: To serve at least one request with the model's max seq len (8192), (0.88 GiB KV cache "
    "is needed, which is larger than the available KV cache memory (0.41 GiB). Based on the available "
    "memory, the estimated maximum model length is 3808. Try increasing `gpu_memory_utilization` (which "
    "also controls CPU memory on the CPU backend) or decreasing `max_model_len` when initializing the "
    "engine.",
    "ValueError: Free memory on device cuda:0 (5.1/23.6 GiB) on startup is less than desired GPU memory "
    "utilization (0.3, 7.08 GiB). Decrease GPU memory utilization or reduce GPU memory used by other "
    "processes.",
    "ValueError: Cannot auto-fit max_model_len: not enough GPU memory available to serve even a single "
    "token. Try increasing `gpu_memory_utilization`.",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
    "of 23.6 GiB of which 1.2 GiB is free.",
]


@pytest.mark.parametrize("child_log", _VLLM_MEMORY_ERRORS)
def test_vllm_memory_errors_name_the_option_and_its_value(child_log):
    generic = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    options = EngineOptions(gpu_memory_utilization=0.3)
    err = _map_start_error(generic, options, cuda=True, child_log=child_log)
    assert isinstance(err, EngineUnavailableError)
    assert "gpu_memory_utilization=0.3" in str(err), err
    # no reason found: the generic message plus the EngineCore's last error line
    other = _map_start_error(generic, options, cuda=True, child_log="ERROR x\nKeyError: 'thinker'\n")
    assert "gpu_memory_utilization" not in str(other) and "KeyError: 'thinker'" in str(other)


# -- item 5 (engine side): logprobs of the generated tokens -----------------------------------------
async def test_token_logprobs_one_per_generated_token_outputs_unchanged(engine, speech16k):
    prompt = engine.base_prompt("")
    for seconds, reuse in ((2, False), (5, True), (11, True), (11, False)):
        request = StepRequest(prompt, _speech(speech16k, seconds), 12, f"lp{seconds}{reuse}", reuse)
        with_lp = await engine.step(request)
        assert len(with_lp.token_logprobs) == with_lp.generated_tokens > 0
        assert all(math.isfinite(x) and x <= 0.0 for x in with_lp.token_logprobs)
        engine._logprobs = False  # the same request without logprobs: same greedy output
        try:
            without = await engine.step(request)
        finally:
            engine._logprobs = True
        assert without.token_logprobs == ()
        assert (without.text, without.generated_tokens) == (with_lp.text, with_lp.generated_tokens)
        engine.release_stream(request.stream_id)
