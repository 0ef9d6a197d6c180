"""The rollout engine: batched sampling with a KV cache over the model as it is now (live LoRA adapters included).

``generate(model, tokenizer, prompts, SamplingParams(...))`` answers like vLLM's ``LLM.generate`` (a list of
:class:`~fasttune.rl.outputs.RequestOutput`); :func:`generate_ids` is the token-level core GRPO calls.

Why it is faster than ``model.generate`` for RL rollouts (each measured in ``bench/bench_rollout.py``):

* each distinct prompt is prefilled once and its KV cache copied to its ``n`` samples (``model.generate`` on TRL's
  repeated prompts prefills every copy);
* the loop is a plain forward per step with an explicit cache, left padding with matching ``position_ids``, and the
  LM head applied to the last position only (``logits_to_keep=1``); no logits processors, stopping criteria or
  generation-config merging;
* rows that finished are dropped from the batch and from the cache (once they are an eighth of it, so the cache is
  not copied at every finish), so late steps compute only live rows;
* the KV cache is written in place into buffers that double when full (:class:`GrowingLayer`), where
  ``DynamicLayer`` copies the whole cache at every step to append one position;
* no padding mask at all when every prompt has the same length (attention then needs no mask);
* sampling never sorts the vocabulary when it can help it and draws with one random number per row
  (:mod:`fasttune.rl.sampling`; with no filter, three passes over the vocabulary into a reused buffer); on one CPU
  core ``model.generate``'s top-p sort and ``torch.multinomial`` cost ~125 ms and ~35 ms per step for 64 rows of a
  32k vocabulary.

* each decoder projection runs as one product with a weight built when the rollout starts (LoRA merged, 4-bit
  dequantized once; q/k/v and gate/up as one product each: :mod:`fasttune.rl.decode`), where training's fused LoRA
  path runs three products and a dequantization per projection per step.

The model's own weights are never merged or changed: the decode weights are built from its active adapters as they
are when the rollout starts and dropped when it ends, so the completions come from the weights being trained. It runs under ``torch.no_grad`` in eval mode (no
dropout); every module's train/eval flag is put back afterwards. Gradient checkpointing is left untouched: it only
runs when gradients are enabled, so a model in the middle of training (train mode, checkpointing on, ``use_cache``
off in its config) generates with the cache and is left exactly as it was found.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from fasttune.lora.unwrap import base_model

from .decode import decode_weights
from .outputs import Completion, CompletionOutput, Logprob, RequestOutput
from .sampling import SamplingParams, make_generator, sample

# Tokens decoded at the end of each row to look for stop strings: the longest stop string plus this many.
STOP_TAIL_SLACK = 8
# New-token positions the KV cache holds before it first grows (it doubles when full, up to max_tokens).
FIRST_ALLOCATION = 256
# Finished rows leave the batch (and the cache is copied without them) once they are 1/COMPACT_WHEN_DEAD of it:
# compacting at every finish costs a full cache copy per step when rows end one by one.
COMPACT_WHEN_DEAD = 8


# ---- the model ------------------------------------------------------------------------------------------------------
def causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` to run: the model itself, or a ``PeftModel``'s base model (its LoRA layers stay active)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        raise ValueError(f"model: a PeftModel with a {type(config).__name__} (prompt learning) is not supported by the "
                         "rollout engine; use LoRA adapters or model.generate")
    return base_model(model)


@contextmanager
def _rollout_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.no_grad`` for the rollout; each module's training flag is restored after.

    Flags are saved per module (not ``model.train(was_training)``) so a model with some submodules deliberately in
    eval mode comes back exactly as it was.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():  # not inference_mode: caches built here (4-bit, RoPE) are reused by training
            yield
    finally:
        for module, training in flags:
            module.training = training


# ---- the KV cache ---------------------------------------------------------------------------------------------------
class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in preallocated buffers: ``update`` writes the new positions in
    place and returns views, where ``DynamicLayer`` concatenates (copies the whole cache) at every step.

    Buffers are ``(batch, kv_heads, capacity, head_dim)``; ``keys`` / ``values`` are the filled ``[:, :, :length]``
    views, so everything that reads a ``DynamicLayer`` (masks, ``get_seq_length``) sees the same thing. A buffer that
    fills up is reallocated at twice its size (at most ``limit``), so a rollout whose rows all stop early never holds
    room for ``max_tokens`` it did not use, and the copies stay amortised O(1) per position.
    """

    def __init__(self, capacity: int, limit: int):
        super().__init__()
        self.capacity, self.limit, self.length = min(capacity, limit), limit, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1])
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            if end > self.limit:
                raise RuntimeError(f"GrowingLayer: {end} positions are more than the {self.limit} this rollout needs")
            self._reallocate(None, min(self.limit, max(end, 2 * self.capacity)))
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _reallocate(self, rows: torch.Tensor | None, capacity: int) -> None:
        """New buffers of ``capacity`` positions holding the filled part of ``rows`` (None: every row)."""
        def moved(buffer: torch.Tensor) -> torch.Tensor:
            kept = buffer[:, :, :self.length] if rows is None else buffer[rows, :, :self.length]
            new = buffer.new_empty(kept.shape[0], buffer.shape[1], capacity, buffer.shape[-1])
            new[:, :, :self.length] = kept
            return new

        self.key_buffer, self.value_buffer, self.capacity = moved(self.key_buffer), moved(self.value_buffer), capacity
        self._views()

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._reallocate(indices, self.capacity)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self.key_buffer.shape[0], device=self.key_buffer.device)
            self._reallocate(rows.repeat_interleave(repeats), self.capacity)

    def reset(self) -> None:
        self.length = 0
        self.keys = self.values = self.key_buffer = self.value_buffer = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GrowingLayer: the rollout cache only grows")


def rollout_cache(config: Any, prompt_width: int, max_new: int) -> DynamicCache:
    """``DynamicCache(config=config)`` whose full-attention layers are :class:`GrowingLayer` s (room for the prompt
    and up to :data:`FIRST_ALLOCATION` new tokens at first, ``max_new`` at most); sliding-window and other special
    layers stay transformers' own."""
    cache = DynamicCache(config=config)
    first, limit = prompt_width + min(max_new, FIRST_ALLOCATION), prompt_width + max_new
    cache.layers = [GrowingLayer(first, limit) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


# ---- checking the request -------------------------------------------------------------------------------------------
def _check_prompts(prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise ValueError(f"prompt_ids: expected a non-empty list of token-id lists, got {type(prompt_ids).__name__}")
    if len(prompt_ids) == 0:
        raise ValueError("prompts: the list is empty; give at least one prompt")
    prompts = []
    for i, ids in enumerate(prompt_ids):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"prompt_ids[{i}]: expected a non-empty list of token ids (ints >= 0), got {ids[:8]!r}")
        prompts.append(ids)
    return prompts


def _token_limits(prompts: list[list[int]], params: SamplingParams, max_length: int | None) -> list[int]:
    """Most new tokens per prompt: ``max_tokens``, or (``max_tokens=None``) what ``max_length`` leaves.

    A prompt that leaves no room for ``max_tokens`` is an error naming it; prompts are never cut."""
    if params.max_tokens is None and max_length is None:
        raise ValueError("max_tokens: None (generate up to the length limit) needs generate's max_length")
    if max_length is None:
        return [params.max_tokens] * len(prompts)
    wanted = params.max_tokens if params.max_tokens is not None else 1
    limit = f"the length limit {max_length} (the model's max_seq_length, set by from_pretrained)"
    if wanted >= max_length:
        raise ValueError(f"max_tokens: {wanted} new tokens do not fit {limit} with any prompt; lower "
                         f"SamplingParams(max_tokens=...) below {max_length}, or load the model with a larger "
                         "max_seq_length")
    for i, ids in enumerate(prompts):
        if len(ids) > max_length - wanted:
            raise ValueError(f"prompts[{i}]: {len(ids)} prompt tokens + max_tokens {wanted} = {len(ids) + wanted}, "
                             f"more than {limit}; shorten the prompt, lower SamplingParams(max_tokens=...) to at most "
                             f"{max_length - len(ids)}, or load the model with a larger max_seq_length")
    return [params.max_tokens or max_length - len(ids) for ids in prompts]


# ---- one rollout ----------------------------------------------------------------------------------------------------
class _Rollout:
    """State of one batched rollout: the live rows, their cache, and what each row generated so far.

    Rows are the ``n`` samples of each prompt (row ``r`` samples prompt ``r // n``); ``alive`` holds the row ids in
    the batch, in the order of the batch dimension of the cache and of every per-row tensor below, and ``live``
    which of them are still generating (finished rows stay until enough of them are there to compact the batch).
    """

    def __init__(self, lm: nn.Module, prompts: list[list[int]], limits: list[int], params: SamplingParams,
                 eos_token_ids: Sequence[int], pad_token_id: int, tokenizer: Any, generator: torch.Generator | None):
        self.lm, self.params, self.tokenizer, self.generator = lm, params, tokenizer, generator
        self.device = next(lm.parameters()).device
        self.prompts = prompts
        n_rows = len(prompts) * params.n
        self.steps = max(limits)
        self.limit = torch.tensor(limits, device=self.device).repeat_interleave(params.n)
        stops = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
        self.stop_ids = torch.tensor(sorted(set(stops)), dtype=torch.long, device=self.device)
        self.pad_token_id = pad_token_id
        self.tokens = torch.full((n_rows, self.steps), pad_token_id, dtype=torch.long, device=self.device)
        self.logprobs = torch.zeros(n_rows, self.steps, dtype=torch.float32, device=self.device)
        # per step, when SamplingParams.logprobs is set: (alive rows, sampled ranks, top ids, top log-probs)
        self.top: list[tuple[torch.Tensor, ...]] = []
        self.lengths = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        self.reasons: list[tuple[str, int | str | None]] = [("length", None)] * n_rows
        self.special_stops = _special_token_stops(tokenizer, params.stop)
        # what ends a row once min_tokens are out: eos, stop token ids and the stop strings that are special tokens
        special_ids = torch.tensor(sorted(self.special_stops), dtype=torch.long, device=self.device)
        self.late_stop_ids = torch.cat([self.stop_ids, special_ids])
        texts = [s for s in params.stop if s not in self.special_stops.values()]
        self.stop_texts = texts
        self.stop_tail = (max(len(s) for s in texts) + STOP_TAIL_SLACK) if texts else 0

    # -- prefill ----------------------------------------------------------------------------------------------------
    def prefill(self) -> torch.Tensor:
        """Run each distinct prompt once, copy its cache to its samples; returns the rows' first logits ``(rows, V)``."""
        unique: dict[tuple[int, ...], int] = {}
        owner = [unique.setdefault(tuple(ids), len(unique)) for ids in self.prompts]
        distinct = [list(ids) for ids in unique]
        width = max(len(ids) for ids in distinct)
        ids = torch.full((len(distinct), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(distinct), width + self.steps, dtype=torch.long)
        for i, row in enumerate(distinct):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        padded = bool((mask[:, :width] == 0).any())
        self.cache = rollout_cache(self.lm.config, width, self.steps)
        logits = self._forward(ids, mask[:, :width] if padded else None, positions)
        rows = torch.tensor(owner, device=self.device).repeat_interleave(self.params.n)
        self.cache.batch_select_indices(rows)
        self.alive = torch.arange(len(rows), device=self.device)
        self.live = torch.ones(len(rows), dtype=torch.bool, device=self.device)
        self.positions = positions[rows, -1:] + 1
        self.width = width
        self.mask = mask[rows] if padded else None
        self.seen = None
        if self.params.repetition_penalty != 1:
            self.seen = self._prompt_tokens(ids[rows], mask[rows, :width], logits.shape[-1])
        return logits[rows]

    def _prompt_tokens(self, ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
        """``(rows, vocab)`` bool: the tokens of each row's prompt (for the repetition penalty)."""
        counts = torch.zeros(ids.shape[0], vocab, dtype=torch.long, device=self.device)
        return counts.scatter_add_(1, ids, mask.long()) > 0

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """One forward over ``ids`` ``(rows, seq)`` with the cache; fp32 logits of the last position ``(rows, V)``."""
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True,
                      logits_to_keep=1)
        return out.logits[:, -1].float()

    # -- decoding ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        logits = self.prefill()
        banned = self._banned(logits.shape[-1])
        scratch = torch.empty_like(logits)  # the sampler's (rows, V) work buffer, reused at every step
        for step in range(self.steps):
            drawn = sample(logits, self.params, self.generator, self.seen,
                           banned if step < self.params.min_tokens else None, scratch[:len(logits)])
            self._record(drawn, step)
            self.live &= ~self._finished(drawn.tokens, step)
            if not bool(self.live.any()):
                return
            tokens = drawn.tokens
            if int((~self.live).sum()) * COMPACT_WHEN_DEAD >= len(self.live):
                tokens = tokens[self.live]
                self._drop(self.live)
            logits = self._decode(tokens, step)

    def _banned(self, vocab: int) -> torch.Tensor | None:
        """The token ids that may not end a row before ``min_tokens`` (eos and stop tokens), or None."""
        if self.params.min_tokens == 0 or self.stop_ids.numel() == 0:
            return None
        return self.stop_ids[self.stop_ids < vocab]

    def _record(self, drawn: Any, step: int) -> None:
        """Store the live rows' draws (rows that finished but are still in the batch are skipped)."""
        rows = self.alive[self.live]
        self.tokens[rows, step] = drawn.tokens[self.live]
        self.logprobs[rows, step] = drawn.logprobs[self.live]
        self.lengths[rows] = step + 1
        if drawn.ranks is not None:
            self.top.append((rows, drawn.ranks[self.live], drawn.top_ids[self.live], drawn.top_logprobs[self.live]))
        if self.seen is not None:
            self.seen.scatter_(1, drawn.tokens[:, None], True)

    def _finished(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """``(batch,)`` bool: live rows that end at this step (stop token, length or stop string); reasons recorded."""
        stop_set = self.stop_ids if step + 1 < self.params.min_tokens else self.late_stop_ids
        by_token = torch.isin(tokens, stop_set) & self.live
        done = by_token | ((self.limit[self.alive] <= step + 1) & self.live)
        for i in by_token.nonzero()[:, 0].tolist():
            self.reasons[int(self.alive[i])] = ("stop", self._stop_reason(int(tokens[i])))
        if self.stop_tail and step + 1 >= self.params.min_tokens:
            for i in (self.live & ~done).nonzero()[:, 0].tolist():
                matched = self._stop_string(int(self.alive[i]), step)
                if matched is not None:
                    done[i] = True
                    self.reasons[int(self.alive[i])] = ("stop", matched)
        return done

    def _stop_reason(self, token: int) -> int | str | None:
        """vLLM's ``stop_reason`` for a row ended by ``token``: the stop string it spells, a stop token id, or None
        (eos)."""
        if token in self.special_stops:
            return self.special_stops[token]
        return token if token in self.params.stop_token_ids else None

    def _stop_string(self, row: int, step: int) -> str | None:
        """The stop string that the end of ``row``'s text contains now, if any (only its last tokens are decoded)."""
        first = max(0, step + 1 - self.stop_tail)
        tail = self.tokenizer.decode(self.tokens[row, first:step + 1].tolist(),
                                     skip_special_tokens=self.params.skip_special_tokens)
        return next((s for s in self.stop_texts if s in tail), None)

    def _drop(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` ``(batch,)`` bool in the batch, in the cache and in every per-row tensor."""
        index = keep.nonzero()[:, 0]
        self.cache.batch_select_indices(index)
        self.alive = self.alive[index]
        self.live = self.live[index]
        self.positions = self.positions[index]
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.mask is not None:
            self.mask = self.mask[index]
            if bool(self.mask[:, :self.width].all()):  # the padded rows are gone: no mask needed any more
                self.mask = None

    def _decode(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed each live row its last token ``(rows,)``; returns the next logits ``(rows, V)``."""
        mask = None if self.mask is None else self.mask[:, :self.width + step + 1]
        logits = self._forward(tokens[:, None], mask, self.positions)
        self.positions = self.positions + 1
        return logits

    # -- results ----------------------------------------------------------------------------------------------------
    def completions(self) -> list[list[Completion]]:
        tokens, logprobs, lengths = self.tokens.tolist(), self.logprobs.tolist(), self.lengths.tolist()
        ranks, tops = self._top_logprobs(len(tokens))
        out = []
        for row, (reason, stop) in enumerate(self.reasons):
            n = lengths[row]
            completion = Completion(tokens[row][:n], logprobs[row][:n], reason, stop)
            if ranks is not None:
                completion.ranks, completion.top_logprobs = ranks[row][:n], tops[row][:n]
            if self.tokenizer is not None:
                completion.text = completion_text(self.tokenizer, completion, self.params)
            out.append(completion)
        n = self.params.n
        return [out[i:i + n] for i in range(0, len(out), n)]

    def _top_logprobs(self, n_rows: int) -> tuple[list[list[int]] | None, list[list[dict[int, float]]] | None]:
        """Per row and position: the sampled token's rank and the top-``logprobs`` ``{id: logprob}``."""
        if not self.top:
            return None, None
        ranks: list[list[int]] = [[] for _ in range(n_rows)]
        tops: list[list[dict[int, float]]] = [[] for _ in range(n_rows)]
        for alive, rank, ids, values in self.top:
            for row, r, row_ids, row_values in zip(alive.tolist(), rank.tolist(), ids.tolist(), values.tolist()):
                ranks[row].append(r)
                tops[row].append(dict(zip(row_ids, row_values)))
        return ranks, tops


def _special_token_stops(tokenizer: Any, stops: list[str]) -> dict[int, str]:
    """Stop strings that are one special token (``stop=[tokenizer.eos_token]`` in Unsloth's GRPO notebooks) ->
    ``{token id: string}``: they end a row by id, since text decoded with ``skip_special_tokens`` never shows them."""
    if tokenizer is None or not stops:
        return {}
    special = set(getattr(tokenizer, "all_special_tokens", []))
    special |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    out = {}
    for text in stops:
        if text in special:
            token = tokenizer.convert_tokens_to_ids(text)
            if isinstance(token, int) and token >= 0:
                out[token] = text
    return out


def completion_text(tokenizer: Any, completion: Completion, params: SamplingParams) -> str:
    """The decoded text of ``completion``, as vLLM gives it.

    The eos or stop token that ended it is not decoded and a matched stop string is cut off (with everything after
    it), unless ``include_stop_str_in_output``."""
    ids = completion.token_ids
    ended_by_token = completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str)
    if ended_by_token and not params.include_stop_str_in_output:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
    if isinstance(completion.stop_reason, str):
        cut = text.find(completion.stop_reason)
        if cut >= 0:
            text = text[:cut + (len(completion.stop_reason) if params.include_stop_str_in_output else 0)]
    return text


# ---- public API -----------------------------------------------------------------------------------------------------
def generate_ids(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    eos_token_ids: Sequence[int] | int,
    pad_token_id: int,
    tokenizer: Any = None,
    max_length: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[Completion]]:
    """Sample ``params.n`` completions of each prompt in ``prompt_ids`` (token-id lists) from ``model`` as it is now.

    ``model`` is a transformers causal LM, a fasttune-patched one or a ``PeftModel`` (its active LoRA adapters are
    used, never merged). ``eos_token_ids`` end a completion (unless ``params.ignore_eos``, and not before
    ``params.min_tokens``); ``pad_token_id`` fills left padding. ``tokenizer`` is needed for ``params.stop``
    strings and fills ``Completion.text``. With ``max_length``, a prompt longer than ``max_length - max_tokens``
    raises ``ValueError``. ``generator`` overrides the one seeded from ``params.seed``.
    Returns, per prompt, ``params.n`` :class:`Completion` objects. The model's train/eval flags are restored.
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params: expected fasttune.rl.SamplingParams, got {type(params).__name__}")
    if params.stop and tokenizer is None:
        raise ValueError(f"stop: {params.stop!r} needs the tokenizer (pass tokenizer=...) to read the generated text")
    if not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id: {pad_token_id!r} must be a token id (an int >= 0); the tokenizer's pad or eos "
                         "id will do, padded positions are masked")
    eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or [])
    prompts = _check_prompts(prompt_ids)
    limits = _token_limits(prompts, params, max_length)
    lm = causal_lm(model)
    if generator is None:
        generator = make_generator(params, next(lm.parameters()).device)
    rollout = _Rollout(lm, prompts, limits, params, eos, pad_token_id, tokenizer, generator)
    with _rollout_mode(model), decode_weights(lm):
        rollout.run()
    return rollout.completions()


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The ids that end a completion: the generation config's eos id(s), else the tokenizer's."""
    config = getattr(causal_lm(model), "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _encode_prompts(tokenizer: Any, prompts: Any) -> tuple[list[str | None], list[list[int]]]:
    """``prompts`` (a string, a list of strings, a list of token-id lists, or vLLM's ``{"prompt_token_ids": ...}``
    dicts) -> (texts or None, token ids). Text that already starts with the bos token is not given a second one."""
    if isinstance(prompts, str) or (isinstance(prompts, dict)):
        prompts = [prompts]
    elif isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        prompts = [prompts]
    texts, ids = [], []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            bos = getattr(tokenizer, "bos_token", None)
            add = not (bos and prompt.startswith(bos))
            texts.append(prompt)
            ids.append(tokenizer(prompt, add_special_tokens=add)["input_ids"])
        elif isinstance(prompt, (Sequence, torch.Tensor)):
            texts.append(None)
            ids.append(list(prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt))
        else:
            raise ValueError(f"prompts[{i}]: expected a string or a list of token ids, got {type(prompt).__name__}")
    return texts, ids


def _request_output(index: int, text: str | None, ids: list[int], completions: list[Completion],
                    params: SamplingParams, tokenizer: Any) -> RequestOutput:
    outputs = []
    for j, c in enumerate(completions):
        logprobs = None if params.logprobs is None else _vllm_logprobs(c, tokenizer)
        outputs.append(CompletionOutput(
            index=j, text=c.text or "", token_ids=c.token_ids,
            cumulative_logprob=None if params.logprobs is None else c.cumulative_logprob,
            logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    return RequestOutput(request_id=str(index), prompt=text, prompt_token_ids=ids, outputs=outputs)


def _vllm_logprobs(completion: Completion, tokenizer: Any) -> list[dict[int, Logprob]]:
    """Per position: the sampled token and the top ``logprobs`` tokens -> :class:`Logprob` (vLLM's layout)."""
    out = []
    for token, logprob, rank, top in zip(completion.token_ids, completion.logprobs, completion.ranks or [],
                                         completion.top_logprobs or []):
        entry = {token: Logprob(logprob, rank, tokenizer.decode([token]))}
        for i, (tid, lp) in enumerate(top.items()):
            entry.setdefault(tid, Logprob(lp, i + 1, tokenizer.decode([tid])))
        out.append(entry)
    return out


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    sampling_params: SamplingParams | None = None,
    *,
    max_length: int | None = None,
) -> list[RequestOutput]:
    """vLLM's ``LLM.generate(prompts, sampling_params)`` over ``model`` as it is now; one ``RequestOutput`` per prompt.

    ``prompts``: a string, a list of strings (tokenized as the tokenizer does; a text that already starts with the
    bos token, e.g. a chat-templated one, gets no second one) or a list of token-id lists. Texts are decoded with
    ``sampling_params.skip_special_tokens``; eos is the model's generation-config eos (or the tokenizer's).
    """
    params = sampling_params if sampling_params is not None else SamplingParams()
    texts, ids = _encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (_eos_ids(model, tokenizer) or [0])[0]
    completions = generate_ids(model, ids, params, eos_token_ids=_eos_ids(model, tokenizer), pad_token_id=pad,
                               tokenizer=tokenizer, max_length=max_length)
    return [_request_output(i, text, p, c, params, tokenizer)
            for i, (text, p, c) in enumerate(zip(texts, ids, completions))]
