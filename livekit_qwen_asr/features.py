"""Qwen3-ASR input features for a growing utterance, computed once per frame — no asyncio, no I/O.

Qwen3-ASR's audio encoder is block-local: its attention runs inside windows of `WINDOW_FRAMES` log-mel
frames (8 s), so the encoder output of a *completed* window does not depend on later audio. If the
engine receives the utterance as one item per window (completed windows + the open one), vLLM hashes
each item separately and serves completed windows from its prefix cache instead of re-encoding and
re-prefilling them every step.

For that to be exact, each window's features must be the very numbers the whole-utterance feature
extractor produces (vLLM computes those for one raw-audio item): features of a window computed on its
own samples differ at the window edges (STFT padding) and in the floor (clip-global max - 8).
`UtteranceFeatures` reproduces `WhisperFeatureExtractor` (torch path, padding=False) bit for bit but
incrementally: a frame whose STFT window lies inside the audio never changes, so only new frames and
the last one (whose window reaches into the reflect padding) are computed per step; the floor is
re-applied when the utterance's maximum rises, which changes earlier windows' features — then those
windows are simply re-encoded, still exact. `self_check` verifies bit-identity on this machine's
FFT/BLAS at engine start (the engine falls back to raw audio if it fails).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where features are computed: importing the plugin stays light
    import torch

N_FFT = 400
HOP = 160
WINDOW_FRAMES = 800  # encoder attention window (`n_window_infer`): 8 s of 10 ms frames
WINDOW_SECONDS = WINDOW_FRAMES * HOP / 16_000
CONV_FRAMES = 100  # conv front-end chunk (`2 * n_window`): 1 s
TOKENS_PER_WINDOW = 104  # audio tokens of one full window (13 per second)
MIN_COLUMNS = 64  # frames recomputed at least per update (see UtteranceFeatures._extend)


def output_tokens(frames: int) -> int:
    """Audio tokens the encoder emits for an item of `frames` log-mel frames (vLLM's
    `_get_feat_extract_output_lengths`)."""
    rest = frames % CONV_FRAMES
    feat = (rest - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // CONV_FRAMES) * 13


def reencoded_seconds(first_pad: int, item_frames: tuple[int, ...], cached_tokens: int) -> float:
    """Seconds of the items (consecutive from prompt position `first_pad`) whose audio tokens reach
    past a prefix-cache hit of `cached_tokens`: those were encoded and prefilled again."""
    pos, seconds = first_pad, 0.0
    for frames in item_frames:
        pos += output_tokens(frames)
        if pos > cached_tokens:
            seconds += frames * HOP / 16_000
    return seconds


@dataclass(frozen=True)
class FeatureItems:
    """An utterance's features split into encoder windows: what vLLM takes as precomputed items."""

    features: torch.Tensor  # [n_mels, frames] float32, the whole utterance
    sizes: tuple[int, ...]  # frames per item: WINDOW_FRAMES each, the last (open) one may be shorter

    def as_mm_data(self) -> dict[str, torch.Tensor]:
        """`multi_modal_data["audio"]` for vLLM's Qwen3-ASR (needs the engine arg enable_mm_embeds).
        All three fields are required: a dict missing one kills vLLM's EngineCore."""
        import torch

        mask = torch.zeros((len(self.sizes), WINDOW_FRAMES), dtype=torch.long)
        for i, s in enumerate(self.sizes):
            mask[i, :s] = 1
        return {
            "input_audio_features": self.features,
            "audio_feature_lengths": torch.tensor(self.sizes, dtype=torch.long),
            "feature_attention_mask": mask,
        }

    @property
    def token_counts(self) -> list[int]:
        return [output_tokens(s) for s in self.sizes]


def split_windows(frames: int) -> tuple[int, ...]:
    if frames <= 0:
        raise ValueError("no audio frames")
    return tuple(min(WINDOW_FRAMES, frames - i) for i in range(0, frames, WINDOW_FRAMES))


class UtteranceFeatures:
    """Whisper log-mel of one growing utterance, bit-identical to `WhisperFeatureExtractor(audio,
    padding=False, truncation=False)` on all the audio so far. Thread-safe (one lock per utterance).

    `update(audio)` takes the whole utterance (each call's audio starts with the previous call's);
    other audio (a new utterance) starts over.
    """

    def __init__(self, mel_filters: np.ndarray) -> None:
        import torch

        # the transposed view, as the extractor uses it (a contiguous copy may change the BLAS path)
        self._filters_t = torch.from_numpy(np.asarray(mel_filters)).to(torch.float32).T
        self._window = torch.hann_window(N_FFT, dtype=torch.float32)
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        import torch

        self._audio = np.zeros(0, np.float32)
        self._log = torch.zeros((self._filters_t.shape[0], 0))  # log10 mel, before the floor
        self._final = 0  # leading frames of _log that later audio cannot change
        self._max = -math.inf  # max of _log[:, :_final]
        self._out: torch.Tensor | None = None
        self._out_floor = math.nan
        self._out_valid = 0  # leading frames of _out valid for _out_floor
        self.frames_computed = 0  # STFT frames computed so far (for tests and accounting)

    def update(self, audio: np.ndarray) -> torch.Tensor:
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected 1-D audio, got shape {x.shape}")
        n = x.shape[0]
        with self._lock:
            old = self._audio.shape[0]
            if n < old or not np.array_equal(x[:old], self._audio):
                self._clear()
            frames = n // HOP
            if frames == 0:
                raise ValueError(f"audio too short for one feature frame: {n} samples")
            self._extend(x, frames)
            self._audio = x.copy()  # a caller may reuse its buffer; the prefix check needs our own
            return self._normalized(frames)

    def _extend(self, x: np.ndarray, frames: int) -> None:
        import torch

        # Recompute every frame that was not final, and at least MIN_COLUMNS frames: the BLAS matmul
        # rounds a column the same whatever the column count only from about 12 columns up.
        start = min(self._final, frames - MIN_COLUMNS)
        if start < 2 or x.shape[0] <= N_FFT:
            # the first frames use the left reflect padding: compute everything exactly as the
            # extractor does (same batched shapes)
            spec = torch.stft(
                torch.from_numpy(x)[None], N_FFT, HOP, window=self._window, return_complex=True
            )[..., :frames]
            start = 0
        else:
            # frames >= 2 read original samples only on the left; reflect-pad the right end as
            # torch.stft(center=True) does on the whole signal
            seg = x[start * HOP - N_FFT // 2 :]
            right = x[-N_FFT // 2 - 1 : -1][::-1]
            padded = torch.from_numpy(np.concatenate([seg, right]))[None]
            spec = torch.stft(padded, N_FFT, HOP, window=self._window, center=False, return_complex=True)
            spec = spec[..., : frames - start]
        mags = (spec.abs() ** 2).contiguous()
        log = torch.clamp(self._filters_t @ mags, min=1e-10).log10()[0]
        self.frames_computed += log.shape[1]
        self._log = torch.cat([self._log[:, :start], log], dim=1)
        # frame i's STFT window ends at sample i*HOP + N_FFT/2: final once that is inside the audio
        # (so at most the last frame is not final)
        final = min(frames, max(0, (x.shape[0] - N_FFT // 2) // HOP + 1))
        if final > self._final:
            self._max = max(self._max, float(self._log[:, self._final : final].max()))
            self._final = final
        self._out_valid = min(self._out_valid, start)

    def _normalized(self, frames: int) -> torch.Tensor:
        import torch

        tail_max = float(self._log[:, self._final : frames].max()) if frames > self._final else -math.inf
        floor = max(self._max, tail_max) - 8.0
        if self._out is None or floor != self._out_floor:
            self._out_valid = 0
        if self._out_valid < frames:
            done = self._out[:, : self._out_valid] if self._out is not None else self._log[:, :0]
            new = (torch.maximum(self._log[:, self._out_valid : frames], torch.tensor(floor)) + 4.0) / 4.0
            self._out = torch.cat([done, new], dim=1)
        self._out_floor = floor
        self._out_valid = frames
        return self._out[:, :frames]


def self_check(mel_filters: np.ndarray, extractor: object, seed: int = 0) -> str | None:
    """Compare incremental features with `extractor` (a WhisperFeatureExtractor) on noise grown in
    steps of 1 frame to 2 s; None when bit-identical, else what differed."""
    import torch

    rng = np.random.default_rng(seed)
    audio = (rng.standard_normal(6 * 16_000) * 0.1).astype(np.float32)
    audio[4 * 16_000 : 4 * 16_000 + 4000] *= 8  # a louder stretch later: the floor rises
    uf = UtteranceFeatures(mel_filters)
    for end in (401, 1_202, 3_200, 3_360, 3_500, 12_000, 12_161, 12_330, 16_000, 48_000, 48_160, 96_000):
        got = uf.update(audio[:end])
        ref = extractor(
            audio[:end], sampling_rate=16_000, return_tensors="np", padding=False, truncation=False
        )
        ref = torch.from_numpy(ref["input_features"][0])
        if got.shape != ref.shape or not torch.equal(got, ref):
            diff = (got - ref).abs().max().item() if got.shape == ref.shape else "shape"
            return f"incremental features differ from the extractor at {end} samples (max diff {diff})"
    return None


class FeatureCache:
    """Per-stream `UtteranceFeatures`, least recently used first out. Thread-safe."""

    def __init__(self, mel_filters: np.ndarray, max_streams: int = 64) -> None:
        self._filters = mel_filters
        self._max = max_streams
        self._items: OrderedDict[str, UtteranceFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def items_for(self, stream_id: str, audio: np.ndarray) -> FeatureItems:
        if not stream_id:
            feats = UtteranceFeatures(self._filters).update(audio)  # anonymous: nothing to reuse
        else:
            with self._lock:
                uf = self._items.pop(stream_id, None) or UtteranceFeatures(self._filters)
                self._items[stream_id] = uf
                while len(self._items) > self._max:
                    self._items.popitem(last=False)
            feats = uf.update(audio)
        return FeatureItems(feats, split_windows(feats.shape[1]))

    def forget(self, stream_id: str) -> None:
        with self._lock:
            self._items.pop(stream_id, None)
