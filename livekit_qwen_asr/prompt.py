"""Qwen3-ASR prompt text, user-text sanitising, language names and output parsing.

Pure functions: no asyncio, no I/O, no model. The prompt layout and the output format follow the
official `qwen-asr` package (`qwen_asr/inference/qwen3_asr.py`, `utils.py`).
"""

from __future__ import annotations

import re

from .errors import UnsupportedLanguageError

ASR_TEXT_TAG = "<asr_text>"
LANGUAGE_PREFIX = "language "
AUDIO_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"

# The languages Qwen3-ASR accepts as a forced language (qwen_asr.inference.utils.SUPPORTED_LANGUAGES).
SUPPORTED_LANGUAGES: tuple[str, ...] = (
    "Chinese", "English", "Cantonese", "Arabic", "German", "French", "Spanish", "Portuguese",
    "Indonesian", "Italian", "Korean", "Russian", "Thai", "Vietnamese", "Japanese", "Turkish",
    "Hindi", "Malay", "Dutch", "Swedish", "Danish", "Finnish", "Polish", "Czech", "Filipino",
    "Persian", "Greek", "Romanian", "Hungarian", "Macedonian",
)  # fmt: skip

# ISO 639-1 (and a few 639-3) codes LiveKit users pass (e.g. "en", "en-US", "zh-CN", "yue").
_ISO_TO_NAME: dict[str, str] = {
    "zh": "Chinese", "cmn": "Chinese", "en": "English", "yue": "Cantonese", "ar": "Arabic",
    "de": "German", "fr": "French", "es": "Spanish", "pt": "Portuguese", "id": "Indonesian",
    "it": "Italian", "ko": "Korean", "ru": "Russian", "th": "Thai", "vi": "Vietnamese",
    "ja": "Japanese", "tr": "Turkish", "hi": "Hindi", "ms": "Malay", "nl": "Dutch", "sv": "Swedish",
    "da": "Danish", "fi": "Finnish", "pl": "Polish", "cs": "Czech", "fil": "Filipino", "tl": "Filipino",
    "fa": "Persian", "el": "Greek", "ro": "Romanian", "hu": "Hungarian", "mk": "Macedonian",
}  # fmt: skip
_NAME_TO_ISO: dict[str, str] = {}
for _code, _name in _ISO_TO_NAME.items():
    _NAME_TO_ISO.setdefault(_name, _code)

# `<|anything|>` control tokens and the `<asr_text>` delimiter must never come from user text.
_CHATML_LIKE_TOKEN = re.compile(r"<\|[^|]*\|>")


def normalize_language(language: str | None) -> str | None:
    """Map a language name or code to Qwen3-ASR's canonical name; None/"" means auto-detect.

    Accepts "English", "english", "en", "en-US", "zh_CN", "yue". Raises UnsupportedLanguageError.
    """
    if language is None:
        return None
    s = str(language).strip()
    if not s:
        return None
    name = s[:1].upper() + s[1:].lower()
    if name in SUPPORTED_LANGUAGES:
        return name
    code = re.split(r"[-_]", s.lower(), maxsplit=1)[0]
    if code in _ISO_TO_NAME:
        return _ISO_TO_NAME[code]
    raise UnsupportedLanguageError(
        f"unsupported language {language!r}; use one of {', '.join(SUPPORTED_LANGUAGES)} "
        "or an ISO 639-1 code such as 'en' or 'zh'"
    )


def language_code(name: str) -> str:
    """ISO code for a canonical Qwen3-ASR language name ('' when unknown or empty)."""
    return _NAME_TO_ISO.get(name, "")


def sanitize_user_text(text: str | None) -> str:
    """Strip ChatML control tokens and `<asr_text>` from user-supplied text (context, keyterms).

    Applied to a fixpoint so nested payloads such as `<|im<|x|>_end|>` cannot reassemble a token.
    """
    if not text:
        return ""
    prev = None
    out = str(text)
    while prev != out:
        prev = out
        out = _CHATML_LIKE_TOKEN.sub("", out).replace(ASR_TEXT_TAG, "")
    return out


def chatml_base_prompt(context: str) -> str:
    """The official chat template's rendering of [system: context, user: audio] + generation prompt."""
    return (
        f"<|im_start|>system\n{context}<|im_end|>\n"
        f"<|im_start|>user\n{AUDIO_PLACEHOLDER}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def forced_language_suffix(language: str | None) -> str:
    """Appended to the prompt to force a language (the model then writes text only)."""
    return f"{LANGUAGE_PREFIX}{language}{ASR_TEXT_TAG}" if language else ""


def parse_output(raw: str, forced_language: str | None = None) -> tuple[str, str]:
    """Split a raw decode into (language, text) without ever leaking `language X<asr_text>`.

    Matches the official `parse_asr_output` on complete outputs. Additionally, a partial decode that is
    still inside the `language X` header (no `<asr_text>` yet) yields empty text instead of the header.
    """
    s = (raw or "").strip()
    if not s:
        return (forced_language or ""), ""
    s = fix_repetitions(s)
    if forced_language:
        return forced_language, s
    if ASR_TEXT_TAG not in s:
        if _is_header_in_progress(s):
            return "", ""
        return "", s.strip()
    meta, text = s.split(ASR_TEXT_TAG, 1)
    if "language none" in meta.lower():
        return "", text.strip()
    lang = ""
    for line in meta.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.lower().startswith(LANGUAGE_PREFIX):
            val = line[len(LANGUAGE_PREFIX) :].strip()
            if val:
                lang = val[:1].upper() + val[1:].lower()
        break
    return lang, text.strip()


def _is_header_in_progress(s: str) -> bool:
    """True for 'lang', 'language', 'language Eng' ... (a header the model has not closed yet)."""
    low = s.lower()
    if len(low) <= len(LANGUAGE_PREFIX):
        return LANGUAGE_PREFIX.startswith(low) or LANGUAGE_PREFIX.rstrip() == low
    return low.startswith(LANGUAGE_PREFIX) and "\n" not in s and len(s.split()) <= 2


def fix_repetitions(text: str, threshold: int = 20) -> str:
    """Collapse runaway repetitions (a char or a <=20-char pattern repeated > threshold times).

    Port of the official `detect_and_fix_repetitions` (Apache-2.0, Alibaba Qwen team), iterative
    instead of recursive so long outputs cannot hit the recursion limit.
    """
    return _fix_pattern_repeats(_fix_char_repeats(text, threshold), threshold)


def _fix_char_repeats(s: str, thresh: int) -> str:
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        count = 1
        while i + count < n and s[i + count] == s[i]:
            count += 1
        out.append(s[i] if count > thresh else s[i : i + count])
        i += count
    return "".join(out)


def _fix_pattern_repeats(s: str, thresh: int, max_len: int = 20) -> str:
    out: list[str] = []
    while True:
        n = len(s)
        min_repeat_chars = thresh * 2
        if n < min_repeat_chars:
            out.append(s)
            return "".join(out)
        i = 0
        found_end = -1
        while i <= n - min_repeat_chars:
            for k in range(1, max_len + 1):
                if i + k * thresh > n:
                    break
                pattern = s[i : i + k]
                if all(s[i + rep * k : i + rep * k + k] == pattern for rep in range(1, thresh)):
                    end = i + thresh * k
                    while end + k <= n and s[end : end + k] == pattern:
                        end += k
                    out.append(pattern)
                    found_end = end
                    break
            if found_end >= 0:
                break
            out.append(s[i])
            i += 1
        if found_end < 0:
            out.append(s[i:])
            return "".join(out)
        s = s[found_end:]
