"""The LiveKit Agents `Plugin` of livekit-qwen-asr, and its `download_files` step.

`python -m livekit.agents download-files` imports every package under `livekit.plugins` (ours is
`livekit.plugins.qwen_asr`, which imports this package and so registers the plugin) and calls each
registered plugin's `download_files()`. Ours fetches the model the worker will load into the Hugging
Face cache, so a container image can be built with it and a worker can start without the hub.

The hub may be unreachable (air-gapped hosts, CI): a short probe runs first so the command fails
with a clear message instead of waiting on network timeouts, and a model already in the cache counts
as downloaded.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from livekit.agents import Plugin

from .engine import DEFAULT_MODEL
from .errors import QwenASRError
from .log import logger
from .version import __version__

PLUGIN_PACKAGE = "livekit.plugins.qwen_asr"  # the public import path (livekit-agents preloads it)
MODEL_ENV = "QWEN_ASR_MODEL"  # the same variable agent.py reads: download what the worker loads
HUB_PROBE_TIMEOUT_S = 10.0


class ModelDownloadError(QwenASRError, RuntimeError):
    """The model could not be fetched: the hub is unreachable or offline mode is on, and the model
    is not in the local cache; or huggingface_hub is not installed."""


class QwenASRPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(PLUGIN_PACKAGE, __version__, PLUGIN_PACKAGE, logger)

    def download_files(self) -> None:
        """Fetch `$QWEN_ASR_MODEL` (default Qwen/Qwen3-ASR-0.6B) into the Hugging Face cache."""
        download_model()


def register_plugin() -> None:
    """Register with livekit-agents once per process, however many import paths lead here."""
    if not any(isinstance(p, QwenASRPlugin) for p in Plugin.registered_plugins):
        Plugin.register_plugin(QwenASRPlugin())


def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None if `endpoint` answers HTTP within `timeout` seconds (any status), else why not.

    urllib honours HTTPS_PROXY / NO_PROXY like huggingface_hub does, so a proxied hub counts as
    reachable; the timeout bounds the wait where packets are silently dropped."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # an HTTP answer, even an error status: the hub is there
    except (OSError, ValueError) as e:  # URLError, timeouts, refused, DNS; ValueError: bad URL
        return f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
    return None


def _cached_snapshot(model: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached (or a partial snapshot): the caller decides what that means
        return None


def download_model(model: str | None = None, *, probe_timeout: float = HUB_PROBE_TIMEOUT_S) -> Path:
    """Make `model` (default: `$QWEN_ASR_MODEL`, else `DEFAULT_MODEL`) available locally and return
    its directory. A local checkpoint directory is returned as is. Raises `ModelDownloadError` when
    it cannot be fetched and is not cached."""
    model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    local = Path(model).expanduser()
    if local.is_dir():
        logger.info("model %s is a local directory: nothing to download", local)
        return local
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:
        raise ModelDownloadError(
            f"cannot download {model}: huggingface_hub is not installed (pip install huggingface_hub), "
            f"or set {MODEL_ENV} to a local checkpoint directory"
        ) from e
    cached = _cached_snapshot(model)
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        if cached is not None:
            logger.info("HF_HUB_OFFLINE is set: using the cached %s (%s)", model, cached)
            return cached
        raise ModelDownloadError(
            f"cannot download {model}: HF_HUB_OFFLINE is set and it is not in {where}. Unset "
            f"HF_HUB_OFFLINE where the hub is reachable, or set {MODEL_ENV} to a local checkpoint directory"
        )
    why = hub_unreachable(constants.ENDPOINT, probe_timeout)
    if why is not None:
        if cached is not None:
            logger.warning(
                "the hub at %s is unreachable (%s): keeping the cached %s", constants.ENDPOINT, why, model
            )
            return cached
        raise ModelDownloadError(
            f"cannot download {model}: the Hugging Face Hub at {constants.ENDPOINT} is unreachable ({why}) "
            f"and it is not in {where}. Run download-files where the hub is reachable (HF_ENDPOINT for "
            f"a mirror), or set {MODEL_ENV} to a local checkpoint directory"
        )
    logger.info("downloading %s from %s", model, constants.ENDPOINT)
    try:
        path = Path(snapshot_download(model))
    except Exception as e:  # e.g. unknown repo, gated model without a token, a proxy answering instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if cached is not None:
            logger.warning(
                "could not refresh %s (%s: %s): keeping the cached copy", model, type(e).__name__, first
            )
            return cached
        raise ModelDownloadError(
            f"cannot download {model} from {constants.ENDPOINT}: {type(e).__name__}: {first}"
        ) from e
    logger.info("%s is in %s", model, path)
    return path
