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

    @classmethod
    def from_env(cls) -> WorkerSettings:
        env = os.environ
        return cls(
            model=env.get("QWEN_ASR_MODEL") or DEFAULT_MODEL,
            language=env.get("QWEN_ASR_LANGUAGE") or None,
            context=env.get("QWEN_ASR_CONTEXT", ""),
            endpointing_ms=int(env.get("QWEN_ASR_ENDPOINTING_MS") or 500),
            max_utterance_sec=float(env.get("QWEN_ASR_MAX_UTTERANCE_SEC") or 30.0),
            executor=env.get("QWEN_ASR_EXECUTOR") or "thread",
            load_timeout=float(env.get("QWEN_ASR_LOAD_TIMEOUT") or 900.0),
        )

    @property
    def executor_type(self) -> JobExecutorType:
        return JobExecutorType.THREAD if self.executor == "thread" else JobExecutorType.PROCESS

    def engine_options(self) -> EngineOptions:
        return EngineOptions(model=self.model)

    def make_stt(self, engine: ASREngine) -> STT:
        return STT(
            engine=engine,
            language=self.language,
            context=self.context,
            endpointing_ms=self.endpointing_ms,
            max_utterance_sec=self.max_utterance_sec,
        )


FLAGS = (  # flag, env var, type, help
    ("--model", "QWEN_ASR_MODEL", str, f"HF id or local checkpoint dir (default {DEFAULT_MODEL})"),
    ("--language", "QWEN_ASR_LANGUAGE", str, "force a language (en, English, zh-CN...); default: detect"),
    ("--context", "QWEN_ASR_CONTEXT", str, "context text for the model: topic, names, spellings"),
    ("--endpointing-ms", "QWEN_ASR_ENDPOINTING_MS", int, "silence that ends an utterance (default 500)"),
    ("--max-utterance-sec", "QWEN_ASR_MAX_UTTERANCE_SEC", float, "longest utterance before a cut (30)"),
    ("--executor", "QWEN_ASR_EXECUTOR", str, "thread (default: all rooms share one engine) | process"),
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
    settings = WorkerSettings.from_env()
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
