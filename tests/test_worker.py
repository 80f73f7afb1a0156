"""agent.py and examples/voice_agent.py as livekit-agents 1.8.9 runs workers: a module-level
`AgentServer` its CLI discovers (`lk agent ...`, `python -m livekit.agents start <file>`), no
deprecated `cli.run_app`, the worker logger under `livekit.`, and helpers imported from the package.

No LiveKit server exists here, so nothing is run: discovery and the CLI's dispatch are exercised
up to the point where the worker would start (`_dispatch` is replaced by a recorder).
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import pytest
from livekit.agents import AgentServer, JobExecutorType
from livekit.agents.cli.discover import get_import_data

from livekit_qwen_asr import LoopThreadEngine
from livekit_qwen_asr.worker import FLAGS, WorkerSettings, livekit_argv, logger

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [REPO / "agent.py", REPO / "examples" / "voice_agent.py"]


@pytest.fixture
def clean_import(monkeypatch):
    """Discovery imports the file as a top-level module and prepends its directory to sys.path:
    undo both, and start from no QWEN_ASR_* settings (restored afterwards)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for _flag, env, _typ, _help in FLAGS:
        monkeypatch.delenv(env, raising=False)
    for name in ("agent", "voice_agent"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield monkeypatch
    for name in ("agent", "voice_agent"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_cli_discovers_a_module_level_agent_server(clean_import, script):
    """What `python -m livekit.agents start <file>` and `lk agent` do (cli/discover.py)."""
    data = get_import_data(path=script)
    assert data.app_name == "server" and data.import_string == f"{script.stem}:server"
    module = sys.modules[script.stem]
    server = module.server
    assert isinstance(server, AgentServer)
    assert server.setup_fnc is module.prewarm and server._entrypoint_fnc is module.entrypoint


def test_the_discovered_server_takes_its_settings_from_the_environment(clean_import):
    clean_import.setenv("QWEN_ASR_EXECUTOR", "process")
    clean_import.setenv("QWEN_ASR_LOAD_TIMEOUT", "42")
    get_import_data(path=REPO / "agent.py")
    server = sys.modules["agent"].server
    assert server._job_executor_type == JobExecutorType.PROCESS
    assert server._initialize_process_timeout == 42.0


def _load_as_main_script(path: Path):
    """`python agent.py` runs the file as __main__; discovery then imports it again as `agent`."""
    spec = importlib.util.spec_from_file_location("__qwen_asr_script__", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_agent_py_runs_through_the_current_cli_with_our_flags(clean_import):
    import livekit.agents.__main__ as lk_main

    calls = []
    clean_import.setattr(lk_main, "_dispatch", lambda server, args: calls.append((server, args)))
    script = _load_as_main_script(REPO / "agent.py")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = script.main(
            ["--model", "/models/q", "dev", "--executor", "process", "--url", "ws://lk.example:7880"]
        )
    assert rc == 0 and len(calls) == 1
    server, args = calls[0]
    assert args.command == "start" and args.dev is True and args.log_level == "DEBUG"
    assert args.url == "ws://lk.example:7880" and args.entrypoint == str(REPO / "agent.py")
    # the server run is the module-level one, built after our flags were exported
    assert server is sys.modules["agent"].server
    assert server._job_executor_type == JobExecutorType.PROCESS
    assert WorkerSettings.from_env().model == "/models/q"
    deprecated = [w for w in caught if issubclass(w.category, DeprecationWarning) and "CLI" in str(w.message)]
    assert not deprecated, [str(w.message) for w in deprecated]


def test_livekit_argv():
    script = "/srv/agent.py"
    assert livekit_argv(script, []) == ["--help"]
    assert livekit_argv(script, ["--help"]) == ["--help"]
    assert livekit_argv(script, ["start"]) == ["start", script]
    assert livekit_argv(script, ["start", "--url", "u"]) == ["start", script, "--url", "u"]
    assert livekit_argv(script, ["dev"]) == ["start", script, "--dev", "--log-level", "DEBUG"]
    assert livekit_argv(script, ["dev", "--log-level", "INFO"]) == [
        "start",
        script,
        "--dev",
        "--log-level",
        "INFO",
    ]
    assert livekit_argv(script, ["download-files"]) == ["download-files"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_deprecated_run_app_and_no_sys_path_tricks(script):
    tree = ast.parse(script.read_text())
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "run_app" not in names  # livekit-agents 1.8.9: "the built-in Python CLI is deprecated"
    assert not [
        n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path" and _is_sys(n.value)
    ], "no sys.path manipulation: import from the package"
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert "agent" not in imported


def _is_sys(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "sys"


def test_worker_logger_is_under_livekit(clean_import):
    assert logger.name == "livekit.plugins.qwen_asr.worker"
    # so livekit-agents' log setup (the plugin logger's level, its handlers) applies to it
    assert logger.parent is logging.getLogger("livekit.plugins.qwen_asr")
    get_import_data(path=REPO / "agent.py")
    assert sys.modules["agent"].logger is logger


def test_loop_thread_engine_lives_in_the_package():
    from livekit.plugins import qwen_asr

    assert LoopThreadEngine.__module__ == "livekit_qwen_asr.loop_thread"
    assert qwen_asr.LoopThreadEngine is LoopThreadEngine


def test_engine_url_settings_run_jobs_against_servers(clean_import):
    """--engine-url: no engine in the worker, LiveKit's default process executor, STTs on the servers."""
    from livekit_qwen_asr import STT

    clean_import.setenv("QWEN_ASR_BASE_URL", "http://gpu1:8000, http://gpu2:8000/")
    clean_import.setenv("QWEN_ASR_API_KEY", "k")
    clean_import.delenv("QWEN_ASR_EXECUTOR", raising=False)
    settings = WorkerSettings.from_env()
    assert settings.remote and settings.executor_type == JobExecutorType.PROCESS
    assert settings.load_engine() is None  # nothing to load: prewarm returns at once
    stt = settings.make_stt(None)
    assert isinstance(stt, STT) and stt.engine is None
    assert stt._base_url == ["http://gpu1:8000", "http://gpu2:8000"] and stt._api_key == "k"
    get_import_data(path=REPO / "agent.py")
    assert sys.modules["agent"].server._job_executor_type == JobExecutorType.PROCESS


def test_engine_flags_become_env_and_bad_values_fail_up_front(clean_import, capsys):
    import os

    from livekit_qwen_asr.worker import apply_cli

    for env in ("QWEN_ASR_BASE_URL", "QWEN_ASR_API_KEY", "QWEN_ASR_CAPACITY"):
        clean_import.setenv(env, "")  # restored after the test, though apply_cli sets it
    rest = apply_cli(
        [
            "--engine-url",
            "http://h:8000",
            "--engine-api-key",
            "s3",
            "--capacity",
            "12",
            "start",
            "--api-key",
            "lk",
        ]
    )
    assert rest == ["start", "--api-key", "lk"]  # --api-key stays LiveKit's
    assert os.environ["QWEN_ASR_BASE_URL"] == "http://h:8000" and os.environ["QWEN_ASR_API_KEY"] == "s3"
    assert WorkerSettings.from_env().capacity == 12
    for bad in (["--engine-url", "h:8000", "start"], ["--capacity", "0", "start"]):
        with pytest.raises(SystemExit):
            apply_cli(bad)
    assert "http(s)" in capsys.readouterr().err


def test_capacity_makes_livekit_load_the_streams_per_capacity(clean_import):
    from livekit_qwen_asr import load

    clean_import.setenv("QWEN_ASR_CAPACITY", "4")
    get_import_data(path=REPO / "agent.py")
    server = sys.modules["agent"].server
    assert server._load_threshold == 1.0 and server.load_fnc is not None

    class RunningJobs:  # AgentServer.active_jobs exists once the server runs (needs a LiveKit server)
        active_jobs = [object()] * 3
        _proc_pool = object()

    base = load.open_streams()
    assert server.load_fnc(RunningJobs()) == max(base, 3) / 4  # process executor: jobs count
    for _ in range(6):
        load.stream_opened()
    try:
        assert server.load_fnc(server) == 1.0  # capped: LiveKit marks the worker full
    finally:
        for _ in range(6):
            load.stream_closed()
    assert load.open_streams() == base
    with pytest.raises(ValueError):
        load.worker_load_fnc(0)
