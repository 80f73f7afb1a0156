"""What a LiveKit worker script on this plugin needs: its settings (flags -> env -> defaults) and a
way to run its module-level `AgentServer` through livekit-agents' current CLI.

livekit-agents 1.8.9 deprecates `cli.run_app` (the rich Python CLI). The supported entry points are
`lk agent dev|start` and `python -m livekit.agents start <file>`, which import the file and run the
`AgentServer` it defines at module level. `run_script` keeps `python agent.py start|dev` working on
top of that: our flags become environment variables (which the imported module, prewarm and every
job read), then the command goes to `livekit.agents.__main__.main`.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from livekit.agents import JobExecutorType

from .engine import DEFAULT_MODEL, ASREngine, EngineOptions
from .load import worker_load_fnc
from .loop_thread import LoopThreadEngine
from .remote import parse_base_urls
from .stt import STT

# under `livekit.` so livekit-agents' log setup (level, JSON format) applies to it
logger = logging.getLogger("livekit.plugins.qwen_asr.worker")


@dataclass(frozen=True)
class WorkerSettings:
    model: str = DEFAULT_MODEL
    language: str | None = None
    context: str = ""
    endpointing_ms: int = 500
    max_utterance_sec: float = 30.0
    executor: str = "thread"
    load_timeout: float = 900.0
    engine_url: str | None = None  # vLLM server(s): no engine in this process
    engine_api_key: str | None = None
    capacity: int | None = None  # streams this worker takes before LiveKit marks it full

    @classmethod
    def from_env(cls) -> WorkerSettings:
        env = os.environ
        url = env.get("QWEN_ASR_BASE_URL") or None
        capacity = env.get("QWEN_ASR_CAPACITY") or None
        return cls(
            model=env.get("QWEN_ASR_MODEL") or DEFAULT_MODEL,
            language=env.get("QWEN_ASR_LANGUAGE") or None,
            context=env.get("QWEN_ASR_CONTEXT", ""),
            endpointing_ms=int(env.get("QWEN_ASR_ENDPOINTING_MS") or 500),
            max_utterance_sec=float(env.get("QWEN_ASR_MAX_UTTERANCE_SEC") or 30.0),
            # a remote engine costs a job process nothing to load: LiveKit's default executor then
            executor=env.get("QWEN_ASR_EXECUTOR") or ("process" if url else "thread"),
            load_timeout=float(env.get("QWEN_ASR_LOAD_TIMEOUT") or 900.0),
            engine_url=url,
            engine_api_key=env.get("QWEN_ASR_API_KEY") or None,
            capacity=int(capacity) if capacity else None,
        )

    @property
    def remote(self) -> bool:
        return bool(self.engine_url)

    @property
    def executor_type(self) -> JobExecutorType:
        return JobExecutorType.THREAD if self.executor == "thread" else JobExecutorType.PROCESS

    def engine_options(self) -> EngineOptions:
        return EngineOptions(model=self.model)

    def load_engine(self) -> LoopThreadEngine | None:
        """For `prewarm`: the process's in-process engine, loaded (blocks up to `load_timeout`);
        None with a remote engine (each job's STT connects to the server(s) itself)."""
        if self.remote:
            return None
        engine = LoopThreadEngine.shared(self.engine_options())
        engine.wait_ready(self.load_timeout)
        return engine

    def make_stt(self, engine: ASREngine | None = None) -> STT:
        """The job's STT: on `engine` (from `load_engine`), or on the vLLM server(s). Close it at the
        end of the job (`await stt.aclose()` also closes its server connection)."""
        return STT(
            engine=None if self.remote else engine,
            base_url=self.engine_url if self.remote else None,
            api_key=self.engine_api_key,
            language=self.language,
            context=self.context,
            endpointing_ms=self.endpointing_ms,
            max_utterance_sec=self.max_utterance_sec,
        )

    def server_options(self) -> dict:
        """`AgentServer(**settings.server_options(), setup_fnc=...)`: executor, process start-up time,
        and with `capacity` LiveKit's load from our streams (`load.worker_load_fnc`)."""
        opts: dict = {
            "job_executor_type": self.executor_type,
            "initialize_process_timeout": self.load_timeout,
        }
        if self.capacity is not None:
            opts["load_fnc"] = worker_load_fnc(self.capacity)
            opts["load_threshold"] = 1.0
        return opts


FLAGS = (  # flag, env var, type, help
    ("--model", "QWEN_ASR_MODEL", str, f"HF id or local checkpoint dir (default {DEFAULT_MODEL})"),
    ("--language", "QWEN_ASR_LANGUAGE", str, "force a language (en, English, zh-CN...); default: detect"),
    ("--context", "QWEN_ASR_CONTEXT", str, "context text for the model: topic, names, spellings"),
    ("--endpointing-ms", "QWEN_ASR_ENDPOINTING_MS", int, "silence that ends an utterance (default 500)"),
    ("--max-utterance-sec", "QWEN_ASR_MAX_UTTERANCE_SEC", float, "longest utterance before a cut (30)"),
    (
        "--engine-url",
        "QWEN_ASR_BASE_URL",
        str,
        "vLLM server(s) to run on instead of an in-process engine (comma-separated; scripts/serve.sh)",
    ),
    ("--engine-api-key", "QWEN_ASR_API_KEY", str, "the vLLM server's API key (--api-key is LiveKit's)"),
    (
        "--capacity",
        "QWEN_ASR_CAPACITY",
        int,
        "streams per worker before it reports full (default: CPU load)",
    ),
    (
        "--executor",
        "QWEN_ASR_EXECUTOR",
        str,
        "thread (default in-process: all rooms share one engine) | process (default with --engine-url)",
    ),
    ("--load-timeout", "QWEN_ASR_LOAD_TIMEOUT", float, "seconds allowed for loading the engine (900)"),
)

COMMANDS = """commands (LiveKit options such as --url, --api-key, --api-secret, --log-level follow them):
  start           production worker         (= python -m livekit.agents start <this file>)
  dev             development worker        (= ... start --dev --log-level DEBUG; `lk agent dev` reloads)
  download-files  fetch the model into the Hugging Face cache (= python -m livekit.agents download-files)
  console         used by `lk agent console`"""


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        add_help=False,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Qwen3-ASR worker options (flags or environment variables; flags win). "
        "The worker command and LiveKit options follow.",
        epilog=COMMANDS,
    )
    for flag, env, typ, text in FLAGS:
        p.add_argument(flag, type=typ, default=None, help=f"{text} [env {env}]")
    return p


def apply_cli(argv: list[str], prog: str = "agent.py") -> list[str]:
    """Take our flags out of `argv` (anywhere), export them as env vars (job processes and threads
    read settings from the environment), and return the rest for the LiveKit CLI."""
    parser = _parser(prog)
    args, rest = parser.parse_known_args(argv)
    for flag, env, _typ, _text in FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            os.environ[env] = str(value)
    try:
        settings = WorkerSettings.from_env()
        if settings.capacity is not None:
            worker_load_fnc(settings.capacity)
        if settings.remote:
            parse_base_urls(settings.engine_url or "")
    except ValueError as e:
        parser.error(str(e))
    if settings.executor not in ("thread", "process"):
        parser.error(f"--executor must be thread or process, got {settings.executor!r}")
    if "-h" in rest or "--help" in rest or not rest:
        parser.print_help()
        print()
    return rest


def livekit_argv(script: str, rest: list[str]) -> list[str]:
    """`<command> [LiveKit options]` for `python <script>` -> argv for `python -m livekit.agents`."""
    if not rest or rest[0] in ("-h", "--help"):
        return ["--help"]
    command, *options = rest
    if command == "dev":  # the deprecated CLI's dev: a dev-mode worker with debug logs
        level = [] if any(o.startswith("--log-level") for o in options) else ["--log-level", "DEBUG"]
        return ["start", script, "--dev", *level, *options]
    if command in ("start", "console"):
        return [command, script, *options]
    return [command, *options]  # download-files; anything else gets the CLI's own usage error


def run_script(script: str, argv: list[str]) -> int:
    """Run `python <script> [our flags] <command> [LiveKit options]`; `script` must define a
    module-level `AgentServer` built from `WorkerSettings.from_env()` (the CLI imports it)."""
    from livekit.agents.__main__ import main as livekit_main

    rest = apply_cli(argv, prog=os.path.basename(script))
    return livekit_main(livekit_argv(os.path.abspath(script), rest))
