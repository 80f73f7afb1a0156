"""Start-up check: does the installed vLLM have every surface `engine.py` uses?

The engine drives vLLM's in-process `AsyncLLM` directly, not a stable public API, so a vLLM release
outside the checked range (pyproject's `[gpu]` extra) may rename or drop a name the engine needs.
Without this check that shows up as an AttributeError or TypeError deep inside a step; with it the
engine refuses to start with one error naming `vllm.__version__` and every missing name.

The list mirrors engine.py's vLLM use; keep the two in step. Only names are checked (cheap: no
model, no EngineCore).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from .errors import EngineUnavailableError

TESTED_VLLM = "0.32"  # the release the engine runs on in CI; 0.33's surfaces match by reading


@dataclass(frozen=True)
class Surface:
    module: str  # import path
    attr: str  # dotted attribute path inside the module, "" for the module itself

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}" if self.attr else self.module


# Every vLLM name engine.py touches (imports, classmethods, methods, output attributes).
SURFACES: tuple[Surface, ...] = (
    Surface("vllm", "AsyncEngineArgs"),
    Surface("vllm", "SamplingParams"),
    Surface("vllm.v1.engine.async_llm", "AsyncLLM.from_engine_args"),
    Surface("vllm.v1.engine.async_llm", "AsyncLLM.generate"),
    Surface("vllm.v1.engine.async_llm", "AsyncLLM.get_tokenizer"),
    Surface("vllm.v1.engine.async_llm", "AsyncLLM.shutdown"),
    Surface("vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc"),  # binds the draft proposer
    Surface("vllm.v1.metrics.loggers", "StatLoggerBase"),  # spec_decode.PassCounter
    # engine._map_vllm_error recognises these by class name (a dead EngineCore; a wrapped step error)
    Surface("vllm.v1.engine.exceptions", "EngineDeadError"),
    Surface("vllm.v1.engine.exceptions", "EngineGenerateError"),
)

# AsyncEngineArgs fields VLLMEngine.start passes (a dataclass: a renamed field is a TypeError there).
ENGINE_ARGS_FIELDS: tuple[str, ...] = (
    "model",
    "dtype",
    "max_model_len",
    "enable_prefix_caching",
    "limit_mm_per_prompt",
    "enforce_eager",
    "mm_processor_cache_gb",
    "max_num_seqs",
    "block_size",
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
    "speculative_config",
    "worker_extension_cls",
)

# Constructor parameters engine.py passes (SamplingParams) or reads back (the outputs
# `AsyncLLM.generate` yields, read by VLLMEngine.step).
PARAMETERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm", "SamplingParams", ("temperature", "max_tokens", "logprobs", "extra_args")),
    ("vllm.outputs", "RequestOutput", ("prompt_token_ids", "outputs", "num_cached_tokens")),
    ("vllm.outputs", "CompletionOutput", ("text", "token_ids", "logprobs")),
)

# Used when present, skipped by the engine when not (so never "missing"): listed so that the test
# tying this module to engine.py's vLLM imports knows them. `optional_missing()` reports them.
OPTIONAL_SURFACES: tuple[Surface, ...] = (
    Surface("vllm.tokenizers.detokenizer_utils", "get_leading_space_marker"),  # warmed at start (logprobs)
    Surface("vllm.envs", ""),  # VLLM_CONFIGURE_LOGGING & co: EngineCore error capture
    Surface("vllm.config.logging", "LoggingConfig"),
    Surface("vllm.logger", "DEFAULT_LOGGING_CONFIG"),
    Surface("vllm.v1.engine.async_llm", "AsyncLLM._run_output_handler"),
    # engine._is_client_error tells request errors by these class names, else by ValueError/TypeError
    Surface("vllm.exceptions", "VLLMClientError"),
    Surface("vllm.exceptions", "GracefulHTTPError"),
)
OPTIONAL_ENGINE_ARGS_FIELDS: tuple[str, ...] = ("enable_mm_embeds", "logging_config")

QWEN3_ASR_ARCH = "Qwen3ASRForConditionalGeneration"  # the checkpoint's `architectures`


class UnsupportedVLLMError(EngineUnavailableError):
    """The installed vLLM lacks a name the engine uses: a retry cannot help."""

    retryable = False

    def __init__(self, version: str, missing: list[str]) -> None:
        self.version = version
        self.missing = tuple(missing)
        super().__init__(
            f"vLLM {version} is not supported by livekit-qwen-asr: missing {', '.join(missing)} "
            f"(tested with vLLM {TESTED_VLLM}; install a vLLM inside the range of the [gpu] extra)"
        )


Importer = Callable[[str], ModuleType]


def _resolve(importer: Importer, surface: Surface) -> object | None:
    try:
        obj: object = importer(surface.module)
    except ImportError:
        return None
    for part in filter(None, surface.attr.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _init_params(cls: object) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(cls).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return set()


def missing_surfaces(importer: Importer = importlib.import_module) -> list[str]:
    """The vLLM names the engine uses that this vLLM does not have (empty: all there)."""
    missing = [s.name for s in SURFACES if _resolve(importer, s) is None]
    args = _resolve(importer, Surface("vllm", "AsyncEngineArgs"))
    if args is not None:
        fields = getattr(args, "__dataclass_fields__", None) or _init_params(args)
        missing += [f"vllm.AsyncEngineArgs({f}=)" for f in ENGINE_ARGS_FIELDS if f not in fields]
    for module, name, params in PARAMETERS:
        cls = _resolve(importer, Surface(module, name))
        if cls is None:
            if f"{module}.{name}" not in missing:
                missing.append(f"{module}.{name}")
            continue
        have = _init_params(cls)
        missing += [f"{module}.{name}({p}=)" for p in params if p not in have]
    registry = _resolve(importer, Surface("vllm", "ModelRegistry"))
    archs = getattr(registry, "get_supported_archs", None)
    if archs is None or QWEN3_ASR_ARCH not in archs():
        missing.append(f"vllm.ModelRegistry[{QWEN3_ASR_ARCH}]")
    return missing


def optional_missing(importer: Importer = importlib.import_module) -> list[str]:
    """Optional surfaces this vLLM lacks: the engine runs without them (and says what it skips)."""
    missing = [s.name for s in OPTIONAL_SURFACES if _resolve(importer, s) is None]
    args = _resolve(importer, Surface("vllm", "AsyncEngineArgs"))
    fields = (getattr(args, "__dataclass_fields__", None) or _init_params(args)) if args is not None else {}
    return missing + [f"vllm.AsyncEngineArgs({f}=)" for f in OPTIONAL_ENGINE_ARGS_FIELDS if f not in fields]


def check_vllm(importer: Importer = importlib.import_module) -> str:
    """Return `vllm.__version__`; raise `UnsupportedVLLMError` naming it and every missing surface.

    Raises `EngineUnavailableError` when vLLM is not installed at all."""
    try:
        vllm = importer("vllm")
    except ImportError as e:
        raise EngineUnavailableError(
            "vLLM is not installed: `pip install livekit-qwen-asr[cpu]` (CPU) or `[gpu]`"
        ) from e
    version = str(getattr(vllm, "__version__", "unknown"))
    missing = missing_surfaces(importer)
    if missing:
        raise UnsupportedVLLMError(version, missing)
    return version
