"""Speculative decoding whose draft is the stream's previous hypothesis, inside vLLM's own machinery.

Every streaming step re-writes the tokens the previous step rolled back (and, in the first chunks,
the whole previous decode): the previous raw decode is a ready draft. vLLM verifies drafts in one
forward pass and keeps the longest prefix the model agrees with, plus the token it wanted instead, so
greedy outputs are those of plain decoding (tests/test_spec_decode.py checks this over minutes of
speech) while decoding the draft's tokens costs one pass instead of one per token.

vLLM plumbing (0.32 and 0.33 alike):
- `PreviousTextProposer` is a `speculative_config={"method": "custom_class", "model": <this class>}`
  proposer. vLLM gives such a proposer only token arrays, so a worker extension
  (`worker_extension_cls`, method `bind_previous_text_proposer`, called once through
  `collective_rpc`) hands it the model runner, whose request states carry each request's draft in
  `SamplingParams.extra_args[DRAFT_KEY]`.
- `PassCounter` is a vLLM stat logger: one `record` per engine step, i.e. per forward pass, with the
  scheduler's own draft and acceptance counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DRAFT_KEY = "lkqa_draft_token_ids"
PROPOSER = f"{__name__}.PreviousTextProposer"
WORKER_EXTENSION = f"{__name__}.ProposerBinding"
BIND_METHOD = "bind_previous_text_proposer"


def draft_continuation(generated: list[int], draft: list[int], limit: int, max_match: int = 3) -> list[int]:
    """The draft tokens to propose after `generated` (at most `limit`).

    While the output so far is a prefix of the draft, its next tokens. Once the model has left it
    (it corrected a word), the tokens after the latest place in the draft that ends with the output's
    last tokens (longest match of up to `max_match` tokens first), so one changed word does not lose
    the rest of the draft. A wrong guess costs a little verification work, never output.
    """
    n = len(generated)
    if limit <= 0 or not draft:
        return []
    if draft[:n] == generated:
        return draft[n : n + limit]
    if generated[: len(draft)] == draft:
        return []  # the model wrote all of it and goes on: nothing left to guess
    for m in range(min(max_match, n), 0, -1):
        tail = generated[n - m :]
        for j in range(len(draft) - m - 1, -1, -1):
            if draft[j : j + m] == tail:
                return draft[j + m : j + m + limit]
    return []


class PreviousTextProposer:
    """vLLM custom proposer (runs in the worker process): proposes each request's own draft."""

    def __init__(self, vllm_config: Any) -> None:
        spec = vllm_config.speculative_config
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        self._runner: Any = None

    def bind(self, runner: Any) -> None:
        self._runner = runner

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: Any,
        token_ids_cpu: Any,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        runner = self._runner
        drafts: list[list[int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            draft = self._draft_of(runner, i) if sampled and runner is not None else None
            if not draft:
                drafts.append([])  # partial prefill, or a request without a draft
                continue
            start = int(runner.input_batch.num_prompt_tokens[i])
            generated = token_ids_cpu[i, start : int(num_tokens_no_spec[i])].tolist()
            drafts.append(draft_continuation(generated, draft, self.num_speculative_tokens))
        return drafts

    @staticmethod
    def _draft_of(runner: Any, row: int) -> list[int] | None:
        state = runner.requests.get(runner.input_batch.req_ids[row])
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        return extra.get(DRAFT_KEY)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        pass  # no draft model


class ProposerBinding:
    """vLLM worker extension: connects the proposer to the model runner's request states."""

    def bind_previous_text_proposer(self) -> bool:
        runner = getattr(self, "model_runner", None)
        drafter = getattr(runner, "drafter", None)
        if not isinstance(drafter, PreviousTextProposer):
            return False
        drafter.bind(runner)
        return True


@dataclass
class PassCounts:
    """vLLM's own per-step counts, summed: forward passes (engine steps that ran the model), drafts
    proposed and accepted, tokens generated, and prompt tokens computed (not served by the prefix
    cache)."""

    forward_passes: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    generation_tokens: int = 0
    prefill_tokens: int = 0

    def minus(self, other: PassCounts) -> PassCounts:
        return PassCounts(**{k: getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__})

    def copy(self) -> PassCounts:
        return dataclasses.replace(self)


def pass_counter_factory(counts: PassCounts) -> Any:
    """A vLLM StatLoggerFactory whose loggers add every engine step into `counts`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class PassCounter(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.counts = counts

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            # one call per EngineCoreOutputs, i.e. per engine step; a step that sampled tokens ran one
            # forward pass (prompts here are never split across steps: they are < 2,048 tokens)
            c = self.counts
            if iteration_stats is not None and iteration_stats.num_generation_tokens > 0:
                c.forward_passes += 1
                c.generation_tokens += int(iteration_stats.num_generation_tokens)
                c.prefill_tokens += int(iteration_stats.prompt_token_stats.computed)
            spec = getattr(scheduler_stats, "spec_decoding_stats", None)
            if spec is not None:
                c.drafts += int(spec.num_drafts)
                c.draft_tokens += int(spec.num_draft_tokens)
                c.accepted_tokens += int(spec.num_accepted_tokens)

        def log_engine_initialized(self) -> None:
            pass

    return PassCounter
