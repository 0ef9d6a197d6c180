"""What the rollout engine returns, shaped like vLLM's outputs so ``outs[0].outputs[0].text`` works unchanged.

:class:`Completion` is the engine's token-level result (``generate_ids``); :class:`CompletionOutput` and
:class:`RequestOutput` are vLLM's classes of the same names (``generate``), with decoded text.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's raw log-prob (vLLM's ``Logprob``); ``rank`` is 1 for the model's most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class Completion:
    """One sampled completion, as token ids.

    ``token_ids`` are the generated tokens (an eos or stop token that ended it included, as vLLM does);
    ``logprobs[i]`` is ``log_softmax`` of the model's raw logits at the position that produced ``token_ids[i]``;
    ``finish_reason`` is ``"stop"`` (eos, a stop token or a stop string) or ``"length"`` (``max_tokens``);
    ``stop_reason`` is the stop token id or stop string that matched (None for eos and length);
    ``top_logprobs[i]`` maps the top ``SamplingParams.logprobs`` token ids at that position to their log-probs
    and ``ranks[i]`` is the sampled token's rank there (1 = most likely), both None when not asked for; ``text`` is the decoded text when a tokenizer was given (stop string trimmed).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_reason: int | str | None = None
    top_logprobs: list[dict[int, float]] | None = None
    ranks: list[int] | None = None
    text: str | None = None

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class CompletionOutput:
    """vLLM's ``CompletionOutput``: one completion of a request.

    ``logprobs`` is None unless ``SamplingParams.logprobs`` was set; then each position maps token id ->
    :class:`Logprob` (the sampled token plus the top ``logprobs`` ones), and ``cumulative_logprob`` is their sum.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """vLLM's ``RequestOutput``: one prompt and its ``SamplingParams.n`` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    prompt_logprobs: None = None
