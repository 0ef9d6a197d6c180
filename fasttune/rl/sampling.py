"""vLLM's ``SamplingParams`` and the maths that turns one step's logits into sampled tokens.

The field names and defaults are vLLM's, so Unsloth GRPO notebooks (``SamplingParams(temperature=..., top_p=...,
max_tokens=...)``) run unchanged; a vLLM option fasttune does not have is a ``TypeError`` like any unknown keyword.

One step, for logits ``z`` ``(batch, vocab)`` in fp32 (the order is vLLM's):

1. repetition penalty on every token seen in the row (prompt and output): ``z / p`` where ``z > 0``, ``z * p`` else;
2. ``temperature == 0``: greedy, ``argmax z`` (no filtering; ties go to the lowest id, like ``torch.argmax``);
3. otherwise ``z / T``, then min-p (drop tokens with ``prob < min_p * max prob``), top-k (keep the ``k`` largest),
   top-p (keep the smallest set of most likely tokens whose renormalised probability reaches ``p``), then one draw
   from the softmax of what is left (:func:`filter_logits` is the plain reference; :func:`candidates` computes
   the same without sorting the vocabulary when it can).

The log-prob returned with each token is taken from ``log_softmax(z)`` of the *unprocessed* logits (vLLM's default
``raw_logprobs``), so it is the model's own probability of the token, whatever the sampling settings were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fasttune.config import SEED_RANGE, _help, _is_finite_number, _is_int, _raise_if

# vLLM treats temperatures below this as greedy.
GREEDY_EPS = 1e-5
# With top-p and no top-k, the largest this many logits are tried before sorting the whole vocabulary.
TOP_P_CANDIDATES = 1024


@dataclass
class SamplingParams:
    """How to sample completions (vLLM's names and defaults).

    Bad values raise :class:`fasttune.config.ConfigError` (a ``ValueError``) listing every bad field with its value
    and what is allowed."""

    n: int = _help("completions per prompt", 1)
    temperature: float = _help("softmax temperature; 0 = greedy", 1.0)
    top_p: float = _help("nucleus sampling: keep the most likely tokens up to this mass, in (0, 1]; 1 = off", 1.0)
    top_k: int = _help("keep the k most likely tokens; 0 or -1 = off", -1)
    min_p: float = _help("drop tokens below min_p * (probability of the most likely token), in [0, 1]; 0 = off", 0.0)
    max_tokens: int | None = _help("most tokens per completion; None: up to generate's max_length", 16)
    min_tokens: int = _help("eos and stop_token_ids cannot end a completion before this many tokens", 0)
    stop: str | list[str] | None = _help("strings that end a completion (cut from the text)", None)
    stop_token_ids: list[int] | None = _help("token ids that end a completion (kept in token_ids)", None)
    ignore_eos: bool = _help("keep generating past eos", False)
    seed: int | None = _help("seed of this request's random generator (reproducible runs); None: torch's", None)
    repetition_penalty: float = _help("> 1 discourages tokens already in the prompt or output; 1 = off", 1.0)
    logprobs: int | None = _help("also return this many top log-probs per position (0: the sampled token's)", None)
    skip_special_tokens: bool = _help("drop special tokens from the decoded text", True)
    include_stop_str_in_output: bool = _help("keep the matched stop string (or stop token) in the text", False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _raise_if(_problems(self), "SamplingParams")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def _number_in(value: object, low: float, high: float, low_open: bool = False) -> bool:
    if not _is_finite_number(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def filter_problems(temperature: object, top_p: object, top_k: object, min_p: object,
                    repetition_penalty: object) -> list[str]:
    """The bad ones among the sampling filters, as ``name: value ...; allowed`` (shared with ``GRPOConfig``)."""
    out = []
    if not _number_in(temperature, 0.0, math.inf):
        out.append(f"temperature: {temperature!r} must be a number >= 0 (0 = greedy)")
    if not _number_in(top_p, 0.0, 1.0, low_open=True):
        out.append(f"top_p: {top_p!r} is outside (0, 1]")
    if not _is_int(top_k) or top_k < -1:
        out.append(f"top_k: {top_k!r} must be an integer >= 1, or 0 / -1 to turn it off")
    if not _number_in(min_p, 0.0, 1.0):
        out.append(f"min_p: {min_p!r} is outside [0, 1]")
    if not _number_in(repetition_penalty, 0.0, math.inf, low_open=True):
        out.append(f"repetition_penalty: {repetition_penalty!r} must be a number > 0 (1 = off)")
    return out


def _problems(p: SamplingParams) -> list[str]:
    """Every bad field of ``p``, each as ``field: value ...; what is allowed`` (all reported at once)."""
    out = []
    if not _is_int(p.n) or p.n < 1:
        out.append(f"n: {p.n!r} must be an integer >= 1")
    out += filter_problems(p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty)
    if p.max_tokens is not None and (not _is_int(p.max_tokens) or p.max_tokens < 1):
        out.append(f"max_tokens: {p.max_tokens!r} must be an integer >= 1, or None (up to max_length)")
    if not _is_int(p.min_tokens) or p.min_tokens < 0:
        out.append(f"min_tokens: {p.min_tokens!r} must be an integer >= 0")
    elif _is_int(p.max_tokens) and p.min_tokens > p.max_tokens:
        out.append(f"min_tokens: {p.min_tokens} is larger than max_tokens ({p.max_tokens})")
    if p.logprobs is not None and (not _is_int(p.logprobs) or p.logprobs < 0):
        out.append(f"logprobs: {p.logprobs!r} must be None or an integer >= 0")
    if p.seed is not None and not (_is_int(p.seed) and SEED_RANGE[0] <= p.seed <= SEED_RANGE[1]):
        out.append(f"seed: {p.seed!r} must be None or an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    if any(not isinstance(s, str) or s == "" for s in p.stop):
        out.append(f"stop: {p.stop!r} must be non-empty strings")
    if any(not _is_int(t) or t < 0 for t in p.stop_token_ids):
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
    """Temperature-scaled ``logits`` ``(batch, vocab)`` with the tokens min-p, top-k and top-p drop set to ``-inf``.

    The plain full-vocabulary reference of what :func:`sample` draws from (its fast path must agree with it).
    In vLLM's order: min-p drops tokens whose probability is below ``min_p`` times the largest one; top-k keeps the
    ``k`` largest (ties at the boundary may keep more); top-p then keeps, of what is left (renormalised), the most
    likely tokens until their mass reaches ``top_p`` (the token that crosses it is kept, so one token always stays).
    """
    if min_p > 0.0:
        cutoff = logits.amax(dim=-1, keepdim=True) + math.log(min_p)  # p_i < min_p * p_max  <=>  z_i < z_max + log(min_p)
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        logits = logits.masked_fill(torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted), float("-inf"))
    return logits


def candidates(logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
               min_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`sample` draws from: unnormalised probabilities ``(batch, K)`` and their token ids ``(batch, K)``
    (None: the columns are the whole vocabulary), equal to ``softmax(filter_logits(logits / temperature, ...))``
    on those ids.

    Full-vocabulary passes are what cost on a CPU (sorting ``(64, 32000)`` for top-p takes ~0.1 s on one core), so
    they are avoided: temperature is applied after ``torch.topk`` (it does not change the order); with top-k only
    the ``k`` largest are looked at; with top-p alone the :data:`TOP_P_CANDIDATES` largest are tried first and the
    full sort runs only when some row's top-p set is not inside them (exact either way: that check uses the mass of
    the whole vocabulary).
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        values, ids = torch.topk(logits, top_k, dim=-1)
        return _nucleus(values / temperature, ids, top_p, min_p, total=None)
    z = logits / temperature
    if top_p >= 1.0:
        if min_p > 0.0:
            z = z.masked_fill_(z < z.amax(dim=-1, keepdim=True) + math.log(min_p), float("-inf"))
        return torch.softmax(z, dim=-1), None
    if TOP_P_CANDIDATES < vocab:
        values, ids = torch.topk(z, TOP_P_CANDIDATES, dim=-1)
        probs, ids = _nucleus(values, ids, top_p, min_p, total=z)
        if probs is not None:
            return probs, ids
    values, ids = torch.sort(z, dim=-1, descending=True)
    return _nucleus(values, ids, top_p, min_p, total=None)


def _nucleus(values: torch.Tensor, ids: torch.Tensor, top_p: float, min_p: float,
             total: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """min-p and top-p on descending ``values`` ``(batch, K)`` (ids alongside) -> (probabilities, ids).

    ``total``: the full-vocabulary logits when ``values`` are only its ``K`` largest (top-k off): the mass of
    what min-p keeps is then taken over the whole vocabulary, and (None, ids) comes back if some row's top-p set
    reaches past the ``K`` candidates."""
    floor = values[:, :1] + math.log(min_p) if min_p > 0.0 else None
    if total is None:
        probs = torch.softmax(values, dim=-1)
        kept_mass = None
    else:
        lse = torch.logsumexp(total, dim=-1, keepdim=True)
        probs = torch.exp(values - lse)
        kept = total if floor is None else total.masked_fill(total < floor, float("-inf"))
        kept_mass = torch.exp(torch.logsumexp(kept, dim=-1, keepdim=True) - lse)
    if floor is not None:
        probs = probs.masked_fill(values < floor, 0.0)
    if kept_mass is None:
        kept_mass = probs.sum(dim=-1, keepdim=True)
    if top_p < 1.0:
        cumulative = torch.cumsum(probs, dim=-1)
        if total is not None and not bool((cumulative[:, -1:] >= top_p * kept_mass).all()):
            return None, ids
        keep = cumulative - probs < top_p * kept_mass
        keep[:, 0] = True
        probs = probs * keep
    return probs, ids


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` ``(batch, K)`` (unnormalised, >= 0), with probability proportional to it.

    Inverse CDF: one uniform number per row and a binary search in the running sum. On CPU this is ~20x faster
    than ``torch.multinomial`` or the exponential race for a 32k vocabulary (both make a random number per token).
    When ``K`` splits into blocks of :func:`_block_size` columns the running sum is taken in two levels (the sums of
    the blocks, then within the one block ``u`` falls in), which avoids a ``(batch, K)`` cumulative sum: the same
    inverse CDF, summed in another order.
    """
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    block = _block_size(probs.shape[-1])
    if block == 0:
        cdf = torch.cumsum(probs, dim=-1)
        index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
    else:
        index = _draw_in_blocks(probs, u, block)
    zero = probs.gather(-1, index) <= 0  # u rounded up to the total: take the last token with mass instead
    if bool(zero.any()):
        last = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), -1).amax(-1, keepdim=True)
        index = torch.where(zero, last, index)
    return index[:, 0]


# Columns per block of the two-level inverse CDF (the largest power of two up to this that divides the width).
DRAW_BLOCK = 256


def _block_size(width: int) -> int:
    """The block width for :func:`draw`: the largest power of two <= :data:`DRAW_BLOCK` dividing ``width`` (0: too
    small or too odd to be worth it, one plain running sum)."""
    block = DRAW_BLOCK
    while block >= 32 and width % block:
        block //= 2
    return block if block >= 32 and width >= 4 * block else 0


def _draw_in_blocks(probs: torch.Tensor, u: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse-CDF index ``(batch, 1)`` for uniforms ``u`` ``(batch, 1)``: find the block, then the column in it."""
    rows, width = probs.shape
    blocks = probs.view(rows, width // block, block)
    block_cdf = torch.cumsum(blocks.sum(-1), dim=-1)  # (batch, blocks)
    target = u * block_cdf[:, -1:]
    b = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[-1] - 1)  # (batch, 1)
    before = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inner = torch.cumsum(blocks[torch.arange(rows, device=probs.device), b[:, 0]], dim=-1)  # (batch, block)
    column = torch.searchsorted(inner, target - before, right=True).clamp_(max=block - 1)
    return b * block + column


def _unfiltered(params: SamplingParams, vocab: int) -> bool:
    """Whether ``params`` draws from the plain tempered softmax (no top-k / top-p / min-p, no top log-probs)."""
    return (params.top_p >= 1.0 and params.min_p == 0.0 and not 0 < params.top_k < vocab
            and params.logprobs is None)


def _sample_unfiltered(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
                       banned: torch.Tensor | None, scratch: torch.Tensor | None) -> Sampled | None:
    """:func:`sample` with no filter, in three passes over the vocabulary instead of eight: ``w = exp((z - max z) / T)``
    written once (into ``scratch`` when given: a fresh ``(batch, vocab)`` buffer per step costs page faults on CPU),
    banned tokens' ``w`` set to 0, :func:`draw` on ``w``; at ``T == 1`` the raw log-prob's normaliser is read from the
    same ``w`` (``logsumexp z = max z + log sum w``, banned tokens' ``w`` included). None when every allowed
    ``w`` underflows to 0 (a banned token dominates by > ~87 nats): the caller then takes the plain path."""
    top = logits.amax(dim=-1, keepdim=True)
    w = torch.sub(logits, top, out=scratch) if scratch is not None else logits - top
    if temperature != 1.0:
        w.mul_(1.0 / temperature)
    w.exp_()
    banned_mass = None
    if banned is not None and banned.numel():
        banned_mass = w.index_select(-1, banned).sum(-1)
        w.index_fill_(-1, banned, 0.0)
    block = _block_size(w.shape[-1])
    allowed = w.view(w.shape[0], -1, block).sum(-1).sum(-1) if block else w.sum(-1)
    if not bool((allowed > 0).all()):
        return None
    tokens = draw(w, generator)
    chosen = logits.gather(-1, tokens[:, None])[:, 0]
    if temperature != 1.0:
        return Sampled(tokens, chosen - torch.logsumexp(logits, dim=-1))
    total = allowed if banned_mass is None else allowed + banned_mass
    return Sampled(tokens, chosen - top[:, 0] - torch.log(total))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None, banned: torch.Tensor | None = None,
           scratch: torch.Tensor | None = None) -> Sampled:
    """Draw one token per row from fp32 ``logits`` ``(batch, vocab)`` under ``params`` (``logits`` is not changed).

    ``seen`` ``(batch, vocab)`` bool marks tokens the repetition penalty applies to; ``banned`` ``(n,)`` holds token
    ids that may not be drawn now (eos before ``min_tokens``). ``generator`` makes the draw reproducible (None:
    torch's global generator). The returned log-probs are ``log_softmax(logits)`` at the drawn tokens. ``scratch``:
    an optional buffer shaped like ``logits`` that the unfiltered path may overwrite.
    """
    penalised = seen is not None and params.repetition_penalty != 1.0
    if not params.greedy and not penalised and _unfiltered(params, logits.shape[-1]):
        drawn = _sample_unfiltered(logits, params.temperature, generator, banned, scratch)
        if drawn is not None:
            return drawn
    z = logits
    if penalised:
        z = apply_repetition_penalty(z, seen, params.repetition_penalty)
    if banned is not None and banned.numel():
        z = z.index_fill(-1, banned, float("-inf"))
    if params.greedy:
        tokens = torch.argmax(z, dim=-1)
    else:
        probs, ids = candidates(z, params.temperature, params.top_k, params.top_p, params.min_p)
        tokens = draw(probs, generator)
        if ids is not None:
            tokens = ids.gather(-1, tokens[:, None])[:, 0]
    chosen = logits.gather(-1, tokens[:, None])[:, 0]
    if params.logprobs is None:  # one pass over the vocabulary, not a (batch, vocab) log_softmax
        return Sampled(tokens, chosen - torch.logsumexp(logits, dim=-1))
    raw = torch.log_softmax(logits, dim=-1)
    chosen = raw.gather(-1, tokens[:, None])[:, 0]
    ranks = (raw > chosen[:, None]).sum(-1) + 1
    top = torch.topk(raw, min(params.logprobs, raw.shape[-1]), dim=-1)
    return Sampled(tokens, chosen, ranks, top.indices, top.values)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded from ``params.seed``, or None (torch's global generator) when no seed is given."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)
