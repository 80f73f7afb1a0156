"""The remote engine over vLLM's own OpenAI-compatible server (issue #13): a real server process on
127.0.0.1 with the tiny synthetic checkpoint; every step's prompt tokens and greedy text must equal the
in-process engine's (the shared float32 `engine` fixture), and HTTP failures map to the plugin's
retryable / non-retryable errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from livekit_qwen_asr import STT
from livekit_qwen_asr.engine import StepRequest
from livekit_qwen_asr.errors import EngineUnavailableError, RequestRejectedError
from livekit_qwen_asr.remote import VLLMServerEngine, float32_wav, split_prompt
from livekit_qwen_asr.streaming import StreamingConfig, StreamingTranscriber

SR = 16000
SERVED = "qwen3-asr-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_checkpoint), "--served-model-name", SERVED,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "4096", "--limit-mm-per-prompt", '{"audio": 4}',
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 480
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"vLLM server not healthy after 480 s:\n{log.read_text()[-3000:]}")
        time.sleep(1)  # polling a process we do not control; not used as synchronisation in a test
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_float32_wav_reaches_the_server_as_the_exact_samples():
    import io

    from vllm.multimodal.media.audio import load_audio_pyav  # the server's own decoder (FFmpeg)

    audio = (np.random.default_rng(0).standard_normal(12345) * 0.3).astype(np.float32)
    data, rate = load_audio_pyav(io.BytesIO(float32_wav(audio)), sr=None)
    assert rate == SR and data.dtype == np.float32 and np.array_equal(data, audio)


def test_prompt_split_and_refusal():
    from livekit_qwen_asr.prompt import chatml_base_prompt

    assert split_prompt(chatml_base_prompt("ctx\nterms") + "language English<asr_text>hi") == (
        "ctx\nterms",
        "language English<asr_text>hi",
    )
    with pytest.raises(RequestRejectedError):
        split_prompt("not a chat prompt")


@pytest.mark.timeout(900)
async def test_every_step_of_a_30_s_stream_equals_the_in_process_engine(server, engine, speech16k):
    # the shared engine starts from empty caches, as in test_window_reuse: in the full suite (stop 17's
    # CI) its first raw step generated '' where a fresh engine and the server generate text
    assert engine.stats.in_flight == 0
    await engine._llm.reset_mm_cache()
    assert await engine._llm.reset_prefix_cache()
    remote = await VLLMServerEngine.start(server)
    try:
        assert remote.model_name == SERVED and remote.is_synthetic  # labelled like the in-process one
        audio = np.tile(speech16k, 2)[: 30 * SR].astype(np.float32) / 32768
        t = StreamingTranscriber(StreamingConfig(), remote.codec, remote.base_prompt)
        t.push_audio(audio)
        steps = 0
        while (plan := t.next_step()) is not None or (plan := t.finish_step()) is not None:
            ours = await engine.step(StepRequest(plan.prompt, plan.audio, 16, "", reuse_windows=False))
            theirs = await remote.step(StepRequest(plan.prompt, plan.audio, 16, "remote"))
            assert theirs.prompt_token_ids == ours.prompt_token_ids, f"step {steps}: prompt tokens differ"
            assert theirs.text == ours.text, f"step {steps}"
            assert len(theirs.token_logprobs) == theirs.generated_tokens
            t.apply(plan, theirs.text)
            steps += 1
            if plan.final:
                break
        assert steps > 10 and remote.stats.steps == steps  # every step of the stream matched
    finally:
        await remote.aclose()


async def test_http_failures_map_to_retryable_and_refused_errors(server, engine):
    with pytest.raises(EngineUnavailableError, match="127.0.0.1:9"):
        await VLLMServerEngine.start("http://127.0.0.1:9", request_timeout=5)  # nothing listens
    with pytest.raises(EngineUnavailableError, match="not 'other'"):
        await VLLMServerEngine.start(server, model="other")
    remote = await VLLMServerEngine.start(server)
    try:
        long_prompt = remote.base_prompt("keyterm " * 5000)  # over --max-model-len: HTTP 400
        with pytest.raises(RequestRejectedError) as e:
            await remote.step(StepRequest(long_prompt, np.zeros(SR, np.float32), 8, "x"))
        assert not e.value.retryable and "400" in str(e.value)
    finally:
        await remote.aclose()


async def test_stt_base_url_streams_through_the_server(server, engine, speech16k):
    from livekit.agents import stt

    from .test_stt_stream import collect, stereo_frames

    async def final_text(plugin: STT) -> str:
        stream = plugin.stream()
        for f in stereo_frames(speech16k[: 5 * SR]):
            stream.push_frame(f)
        stream.end_input()
        events = await collect(stream)
        finals = [e for e in events if e.type == stt.SpeechEventType.FINAL_TRANSCRIPT]
        assert len(finals) == 1
        return finals[0].alternatives[0].text

    remote = STT(base_url=server, vad=None)
    try:
        text = await final_text(remote)
        assert isinstance(remote.engine, VLLMServerEngine) and remote.engine.stats.steps >= 1
    finally:
        if remote.engine is not None:
            await remote.engine.aclose()
    assert text == await final_text(STT(engine=engine, vad=None))  # same final as in-process


def test_the_remote_path_imports_neither_torch_nor_vllm():
    code = (
        "import sys\n"
        "from livekit_qwen_asr import STT\n"
        "from livekit_qwen_asr.remote import VLLMServerEngine, qwen_codec\n"
        "STT(base_url='http://127.0.0.1:9', vad=None)\n"
        "assert qwen_codec().encode('language English<asr_text>') == [11528, 6364, 151704]\n"
        "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
