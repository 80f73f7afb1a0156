"""Write the shipped test model from the training state: only what was trained.

    .venv-official/bin/python -m training.export

``training/state/state.pt`` (weights + optimizer, for resuming) -> ``livekit_qwen_asr/assets/
test_model.safetensors`` (float32, ~8 MB): the small transformer, the used vocabulary rows of
``embed_tokens`` / ``lm_head``, the one ``other`` row every unused ``lm_head`` row equals, the used ids,
and in the metadata the full ``config.json`` and what training has reached (steps, CPU hours, the last
held-out WER).  ``livekit_qwen_asr.test_model`` expands it to the official checkpoint layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.corpus import load_words
from training.model import model_config
from training.train import STATE_DIR

OUT = Path(__file__).resolve().parents[1] / "livekit_qwen_asr" / "assets" / "test_model.safetensors"
FORMAT = "1"


def last_eval(log: Path) -> dict:
    evals = [json.loads(line) for line in log.read_text().splitlines() if '"event": "eval"' in line]
    if not evals:
        return {}
    e = evals[-1]
    return {k: e[k] for k in ("step", "cpu_h", "test_wer", "test_unseen_wer", "test_noise_wer") if k in e}


def export(state_path: Path = STATE_DIR / "state.pt", out: Path = OUT) -> dict:
    st = torch.load(state_path, map_location="cpu")
    tensors = {f"model.{k}": v.float().contiguous() for k, v in st["model"].items()}
    tensors["used_ids"] = torch.tensor(st["vocab"], dtype=torch.int64)
    tensors["heads.emb"] = st["heads"]["emb"].float().contiguous()
    tensors["heads.out"] = st["heads"]["out"].float().contiguous()
    tensors["heads.other"] = st["heads"]["other"].float().contiguous()
    trained = {
        "steps": st["step"],
        "cpu_h": round(st["cpu_s"] / 3600, 3),
        "words": len(load_words()),  # the domain: what the model can write
        "last_eval": last_eval(STATE_DIR / "log.jsonl"),
    }
    meta = {
        "format": FORMAT,
        "config": json.dumps(model_config(st["arch"])),
        "trained": json.dumps(trained),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(out)
    return {"out": str(out), "bytes": out.stat().st_size, "tensors": len(tensors), **trained}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", type=Path, default=STATE_DIR / "state.pt")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    print(json.dumps(export(a.state, a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
