"""vLLM's ``SamplingParams`` and the maths that turns one step's logits into sampled tokens.

The field names and defaults are vLLM's, so Unsloth GRPO notebooks (``SamplingParams(temperature=..., top_p=...,
max_tokens=...)``) run unchanged; a vLLM option fasttune does not have is a ``TypeError`` like any unknown keyword.

One step, for logits ``z`` ``(batch, vocab)`` in fp32 (the order is vLLM's):

1. repetition penalty on every token seen in the row (prompt and output): ``z / p`` where ``z > 0``, ``z * p`` else;
2. ``temperature == 0``: greedy, ``argmax z`` (no filtering; ties go to the lowest id, like ``torch.argmax``);
3. otherwise ``z / T``, then top-k (keep the ``k`` largest), top-p (keep the smallest set of most likely tokens whose
   probability reaches ``p``), min-p (drop tokens with ``prob < min_p * max prob``), then one draw from the
   softmax of what is left.

The log-prob returned with each token is taken from ``log_softmax(z)`` of the *unprocessed* logits (vLLM's default
``raw_logprobs``), so it is the model's own probability of the token, whatever the sampling settings were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# vLLM treats temperatures below this as greedy.
GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to sample completions (vLLM's names and defaults). Bad values raise ``ValueError`` naming the field."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass, in (0, 1]; 1 = off
    top_k: int = -1  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens below min_p * (probability of the most likely token); 0 = off
    max_tokens: int | None = 16  # most tokens per completion; None: up to generate's max_length
    min_tokens: int = 0  # eos and stop_token_ids cannot end a completion before this many tokens
    stop: str | list[str] | None = None  # strings that end a completion (trimmed from the text)
    stop_token_ids: list[int] | None = None  # token ids that end a completion (kept in token_ids)
    ignore_eos: bool = False  # keep generating past eos
    seed: int | None = None  # seeds this request's random generator (reproducible runs)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    logprobs: int | None = None  # also return this many top log-probs per position (0: the sampled token's only)
    skip_special_tokens: bool = True  # drop special tokens from the decoded text
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        problems = _problems(self)
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def _problems(p: SamplingParams) -> list[str]:
    """Every bad field of ``p``, each as ``field: value is ...; allowed ...`` (all reported at once)."""
    out = []
    if not isinstance(p.n, int) or p.n < 1:
        out.append(f"n: {p.n!r} must be an integer >= 1")
    if p.temperature < 0:
        out.append(f"temperature: {p.temperature!r} must be >= 0 (0 = greedy)")
    if not 0 < p.top_p <= 1:
        out.append(f"top_p: {p.top_p!r} is outside (0, 1]")
    if not isinstance(p.top_k, int) or p.top_k < -1:
        out.append(f"top_k: {p.top_k!r} must be an integer >= 1, or 0 / -1 to turn it off")
    if not 0 <= p.min_p <= 1:
        out.append(f"min_p: {p.min_p!r} is outside [0, 1]")
    if p.max_tokens is not None and (not isinstance(p.max_tokens, int) or p.max_tokens < 1):
        out.append(f"max_tokens: {p.max_tokens!r} must be an integer >= 1, or None (up to max_length)")
    if not isinstance(p.min_tokens, int) or p.min_tokens < 0:
        out.append(f"min_tokens: {p.min_tokens!r} must be an integer >= 0")
    elif isinstance(p.max_tokens, int) and p.min_tokens > p.max_tokens:
        out.append(f"min_tokens: {p.min_tokens} is larger than max_tokens ({p.max_tokens})")
    if p.repetition_penalty <= 0:
        out.append(f"repetition_penalty: {p.repetition_penalty!r} must be > 0 (1 = off)")
    if p.logprobs is not None and (not isinstance(p.logprobs, int) or p.logprobs < 0):
        out.append(f"logprobs: {p.logprobs!r} must be None or an integer >= 0")
    if any(not isinstance(s, str) or s == "" for s in p.stop):
        out.append(f"stop: {p.stop!r} must be non-empty strings")
    if any(not isinstance(t, int) or t < 0 for t in p.stop_token_ids):
        out.append(f"stop_token_ids: {p.stop_token_ids!r} must be token ids (integers >= 0)")
    return out


@dataclass
class Sampled:
    """One step's draw: ``tokens`` ``(batch,)``, their raw log-probs ``(batch,)``, and, when log-probs are asked for,
    each token's rank (1 = the model's most likely) ``(batch,)`` and the top ``k`` raw log-probs per row,
    ``top_ids`` / ``top_logprobs`` ``(batch, k)``."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` ``(batch, vocab)`` with ``seen`` (bool, same shape) tokens penalised: ``z/p`` if ``z > 0`` else ``z*p``.

    This is vLLM's and transformers' rule; it is applied before temperature."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Temperature-scaled ``logits`` ``(batch, vocab)`` with the tokens top-k, top-p and min-p drop set to ``-inf``.

    top-k keeps the ``k`` largest (ties at the boundary may keep more); top-p keeps the most likely tokens until
    their probability mass reaches ``top_p`` (the token that crosses it is kept, so at least one token stays);
    min-p drops tokens whose probability is below ``min_p`` times the largest one.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = _top_p(logits, top_p)
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        cutoff = probs.amax(dim=-1, keepdim=True) * min_p
        logits = logits.masked_fill(probs < cutoff, float("-inf"))
    return logits


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of the descending-probability order whose mass reaches ``top_p``."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None, banned: torch.Tensor | None = None) -> Sampled:
    """Draw one token per row from fp32 ``logits`` ``(batch, vocab)`` under ``params``.

    ``seen`` ``(batch, vocab)`` bool marks tokens the repetition penalty applies to; ``banned`` ``(batch, vocab)`` bool
    marks tokens that may not be drawn now (eos before ``min_tokens``). ``generator`` makes the draw reproducible
    (None: torch's global generator). The draw is ``argmax(probs / E)`` with ``E ~ Exp(1)``, which picks token ``i``
    with probability ``probs_i`` (vLLM's method: one pass, no cumulative sums).
    """
    raw = torch.log_softmax(logits, dim=-1)
    z = logits
    if seen is not None and params.repetition_penalty != 1.0:
        z = apply_repetition_penalty(z, seen, params.repetition_penalty)
    if banned is not None:
        z = z.masked_fill(banned, float("-inf"))
    if params.greedy:
        tokens = torch.argmax(z, dim=-1)
    else:
        z = filter_logits(z / params.temperature, params.top_k, params.top_p, params.min_p)
        probs = torch.softmax(z, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        tokens = torch.argmax(probs / noise, dim=-1)
    chosen = raw.gather(-1, tokens[:, None])[:, 0]
    if params.logprobs is None:
        return Sampled(tokens, chosen)
    ranks = (raw > chosen[:, None]).sum(-1) + 1
    top = torch.topk(raw, min(params.logprobs, raw.shape[-1]), dim=-1)
    return Sampled(tokens, chosen, ranks, top.indices, top.values)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded from ``params.seed``, or None (torch's global generator) when no seed is given."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)
