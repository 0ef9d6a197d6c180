"""Unsloth's dataset ``apply_chat_template``: a chat format written as one example prompt, applied to a dataset.

The Alpaca/Ollama notebooks write the format they want as text with placeholders::

    chat_template = '''Below are some instructions that describe some tasks. Write responses that appropriately
    complete each request.

    ### Instruction:
    {INPUT}

    ### Response:
    {OUTPUT}'''
    dataset = apply_chat_template(dataset, tokenizer=tokenizer, chat_template=chat_template)

and get a tokenizer whose chat template renders conversations that way, an Ollama Modelfile for it
(``tokenizer._ollama_modelfile``) and the dataset with a ``text`` column. How the text is read:

- ``{INPUT}`` is a user message, ``{OUTPUT}`` an assistant message, ``{SYSTEM}`` (optional, before the first
  ``{INPUT}``) the system prompt: the conversation's system message, else ``default_system_message`` (required then).
- The text before the first ``{INPUT}`` is a *head* written once (system block, header) followed by the *user prefix*
  written before every user message. With two examples (``{INPUT}..{OUTPUT}..{INPUT}..{OUTPUT}``) the split is exact:
  the user prefix is what the second example repeats. With one example it is inferred: the user prefix starts where
  the last occurrence of the assistant prefix's first non-blank characters starts (``### `` above, so the head is the
  sentence and ``\\n\\n### Instruction:\\n`` opens every user turn). The split chosen is logged.
- Between ``{INPUT}`` and ``{OUTPUT}``: the user suffix (the text after ``{OUTPUT}`` when this starts with it, as
  ``<|eot_id|>`` in Llama-3-style prompts) then the assistant prefix, which is also the generation prompt.
- After ``{OUTPUT}``: the assistant turn's end. When it does not end with the tokenizer's EOS (or one of
  ``extra_eos_tokens``), the EOS is appended (and logged), so the model learns to stop.
- A system message in a conversation whose format has no ``{SYSTEM}`` is an error naming the message; fasttune never
  drops text silently.

The ``text`` column is the rendering without the leading BOS when the tokenizer adds the BOS itself (SFTTrainer
tokenizes text with special tokens; otherwise every row would start with two BOS); ``tokenizer.apply_chat_template``
renders it with the BOS, as generation needs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

from datasets import Dataset
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from fasttune.data.check import find_conversation_column
from fasttune.data.ollama import SAMPLE_CONVERSATIONS, check_template, modelfile_text
from fasttune.data.spec import SYSTEM_SPLIT, ChatTemplate, jinja_string, role_guard, system_prelude

logger = logging.getLogger("fasttune")

ALPACA_PROMPT = """Below are some instructions that describe some tasks. Write responses that appropriately complete \
each request.

### Instruction:
{INPUT}

### Response:
{OUTPUT}"""

_SLOTS = ("{INPUT}", "{OUTPUT}", "{SYSTEM}")


@dataclass(frozen=True)
class PromptParts:
    """The pieces of a prompt template; ``system_after`` is None when the head has no ``{SYSTEM}``."""

    head: str
    system_after: str | None
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_end: str


def _check_slots(text: str) -> int:
    """How many examples (1 or 2) the template holds; every other shape is a ValueError saying what is allowed."""
    n_in, n_out, n_sys = (text.count(s) for s in _SLOTS)
    order = re.findall(r"\{INPUT\}|\{OUTPUT\}", text)
    if n_in != n_out or n_in not in (1, 2) or order != ["{INPUT}", "{OUTPUT}"] * n_in:
        raise ValueError(
            f"chat_template: found {n_in} {{INPUT}} and {n_out} {{OUTPUT}} in {text[:80]!r}...; write one example "
            "'...{INPUT}...{OUTPUT}...' or two in a row (two make the turn boundary exact)"
        )
    if n_sys > 1 or (n_sys == 1 and text.index("{SYSTEM}") > text.index("{INPUT}")):
        raise ValueError("chat_template: {SYSTEM} may appear once, before the first {INPUT}")
    return n_in


def _infer_user_prefix(pre: str, assistant_prefix: str) -> int:
    """Where the user prefix starts in ``pre`` (one example): see the module docstring."""
    stripped = assistant_prefix.lstrip()
    lead = assistant_prefix[: len(assistant_prefix) - len(stripped)]
    searchable = pre.split("{SYSTEM}")[-1]
    offset = len(pre) - len(searchable)
    best = ""
    for j in range(1, len(stripped) + 1):
        if stripped[:j] not in searchable:
            break
        best = stripped[:j]
    if not best.strip():
        if "{SYSTEM}" in pre:
            raise ValueError(
                "chat_template: cannot tell where the system block ends and the user turn starts; write the "
                "example twice ('...{SYSTEM}...{INPUT}...{OUTPUT}...{INPUT}...{OUTPUT}...')"
            )
        return 0  # no head: every user turn repeats everything before {INPUT}
    start = offset + searchable.rfind(best)
    return start - len(lead) if lead and pre[:start].endswith(lead) else start


def parse_prompt_template(text: str, eos_tokens: tuple[str, ...]) -> PromptParts:
    """Split a ``{SYSTEM}``/``{INPUT}``/``{OUTPUT}`` prompt into its parts (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"chat_template: expected a string with {{INPUT}} and {{OUTPUT}}, got {type(text).__name__}")
    text = text.lstrip()
    count = _check_slots(text)
    i1, o1 = text.index("{INPUT}"), text.index("{OUTPUT}")
    pre, mid = text[:i1], text[i1 + 7:o1]
    if count == 2:
        i2, o2 = text.index("{INPUT}", o1), text.index("{OUTPUT}", o1 + 8)
        tail, between = text[o2 + 8:], text[o1 + 8:i2]
        if text[i2 + 7:o2] != mid or not between.startswith(tail) or not pre.endswith(between[len(tail):]):
            raise ValueError("chat_template: the two examples differ; the second {INPUT}...{OUTPUT} must repeat the "
                             f"first exactly (between them: {mid!r} vs {text[i2 + 7:o2]!r})")
        user_start = len(pre) - len(between) + len(tail)
    else:
        tail = text[o1 + 8:]
    user_suffix = tail if tail and mid.startswith(tail) else ""
    assistant_prefix = mid[len(user_suffix):]
    if count == 1:
        user_start = _infer_user_prefix(pre, assistant_prefix)
    end = tail if tail.endswith(eos_tokens) else tail + eos_tokens[0]
    if end != tail:
        logger.info("fasttune: apply_chat_template: the text after {OUTPUT} does not end with %r; it is appended so "
                    "the model learns to stop", eos_tokens[0])
    head = pre[:user_start]
    before, _, after = head.partition("{SYSTEM}")
    return PromptParts(before, after if "{SYSTEM}" in head else None, pre[user_start:], user_suffix,
                       assistant_prefix, end)


def _jinja(parts: PromptParts, bos: str) -> str:
    """The Jinja chat template of ``parts`` (assistant spans in ``{% generation %}``)."""
    lit = jinja_string
    if parts.system_after is None:
        head = ("{%- if system_message is not none -%}{{- raise_exception('message 0: this chat format has no "
                "{SYSTEM} slot, so a system message cannot be rendered; remove it or add {SYSTEM} to the "
                "chat_template') -}}{%- endif -%}" + ("{{- " + lit(parts.head) + " -}}" if parts.head else ""))
    else:
        head = "{{- " + lit(parts.head) + " + system_message + " + lit(parts.system_after) + " -}}"
    return (
        SYSTEM_SPLIT + role_guard() + ("{{- " + lit(bos) + " -}}" if bos else "") + head
        + "{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}"
        + "{{- " + lit(parts.user_prefix) + " + message['content'] + " + lit(parts.user_suffix) + " -}}"
        + "{%- else -%}{{- " + lit(parts.assistant_prefix) + " -}}{%- generation -%}"
        + "{{- message['content'] + " + lit(parts.assistant_end) + " -}}{%- endgeneration -%}"
        + "{%- endif -%}{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{{- " + lit(parts.assistant_prefix) + " -}}{%- endif -%}"
    )


def _go(parts: PromptParts) -> str:
    """The same format as an Ollama Go template (no trim markers: every literal is output as written)."""
    head = parts.head if parts.system_after is None else parts.head + "{{ $.System }}" + parts.system_after
    return (
        head + '{{ $lastRole := "" }}{{ range $i, $m := $.Messages }}{{ $lastRole = $m.Role }}'
        '{{ if eq $m.Role "user" }}' + parts.user_prefix + "{{ $m.Content }}" + parts.user_suffix
        + '{{ else if eq $m.Role "assistant" }}' + parts.assistant_prefix + "{{ $m.Content }}" + parts.assistant_end
        + '{{ end }}{{ end }}{{ if ne $lastRole "assistant" }}' + parts.assistant_prefix + "{{ end }}"
    )


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("A")["input_ids"][:1] == [bos]


def construct_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str = ALPACA_PROMPT,
    default_system_message: str | None = None,
    extra_eos_tokens: list[str] | tuple[str, ...] | None = None,
) -> ChatTemplate:
    """The `ChatTemplate` (Jinja, Ollama Go template, markers) of a ``{SYSTEM}/{INPUT}/{OUTPUT}`` prompt."""
    if not tokenizer.eos_token:
        raise ValueError("tokenizer: has no eos_token; set one so an assistant turn can end")
    extra = [extra_eos_tokens] if isinstance(extra_eos_tokens, str) else list(extra_eos_tokens or ())
    missing = [t for t in extra if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"extra_eos_tokens: {missing} are not single tokens of this tokenizer's vocabulary")
    parts = parse_prompt_template(chat_template, (tokenizer.eos_token, *extra))
    if parts.system_after is not None and default_system_message is None:
        raise ValueError("default_system_message: the chat_template has {SYSTEM}; pass the system prompt to use for "
                         "conversations without a system message")
    if parts.system_after is None and default_system_message is not None:
        raise ValueError(f"default_system_message: {default_system_message[:40]!r} would never be used because the "
                         "chat_template has no {SYSTEM} slot; add {SYSTEM} to it or drop the argument")
    bos = tokenizer.bos_token or ""
    head_bos = bool(bos) and parts.head.startswith(bos)
    if head_bos:
        parts = dataclasses.replace(parts, head=parts.head[len(bos):])
    if not (head_bos or (bos and _adds_bos(tokenizer))):
        bos = ""
    logger.info("fasttune: apply_chat_template: head %r, user turn %r{INPUT}%r, assistant turn %r{OUTPUT}%r",
                parts.head, parts.user_prefix, parts.user_suffix, parts.assistant_prefix, parts.assistant_end)
    return ChatTemplate(
        name="custom-prompt", jinja=system_prelude(default_system_message) + _jinja(parts, bos),
        eos_token=tokenizer.eos_token, stop_strings=tuple(dict.fromkeys((tokenizer.eos_token, *extra))),
        instruction_part=parts.user_prefix, response_part=parts.assistant_prefix, ollama_template=_go(parts),
        default_system=default_system_message, bos_token=bos, response_end_parts=(parts.assistant_end,),
        source="apply_chat_template(chat_template=...)",
    )


def set_prompt_template(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> PreTrainedTokenizerBase:
    """Put ``template`` on ``tokenizer`` (chat_template, fasttune_template, _ollama_modelfile), checked first.

    The Go template is rendered against the Jinja one on sample conversations (with a system message only when the
    format has a ``{SYSTEM}`` slot); a difference is an error, so the Modelfile always matches training.
    """

    samples = [c for c in SAMPLE_CONVERSATIONS if template.default_system is not None or c[0]["role"] != "system"]
    check_template(template, samples)
    tokenizer.chat_template = template.jinja
    tokenizer.fasttune_template = template
    tokenizer.fasttune_added_tokens = []
    tokenizer._ollama_modelfile = modelfile_text("{__FILE_LOCATION__}", template)
    return tokenizer


def apply_chat_template(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chat_template: str = ALPACA_PROMPT,
    default_system_message: str | None = None,
    extra_eos_tokens: list[str] | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Set the chat format written in ``chat_template`` on ``tokenizer`` and add a ``text`` column to ``dataset``.

    ``dataset`` holds conversations (``conversations`` or ``messages``; ShareGPT from/value as `to_sharegpt` writes
    them, or role/content). See the module docstring for how the template text is read and what ``text`` holds.
    """
    from fasttune.data.standardize import standardize_sharegpt

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer: pass the model's tokenizer (tokenizer=tokenizer), got {type(tokenizer).__name__}")
    set_prompt_template(tokenizer, construct_chat_template(tokenizer, chat_template, default_system_message,
                                                           extra_eos_tokens))
    dataset = standardize_sharegpt(dataset, num_proc=num_proc)
    column = find_conversation_column(dataset.column_names)
    strip = tokenizer.bos_token if tokenizer.fasttune_template.bos_token and _adds_bos(tokenizer) else ""

    def render_row(example: dict, row: int) -> dict:
        try:
            text = tokenizer.apply_chat_template(example[column], tokenize=False)
        except TemplateError as error:
            raise ValueError(f"row {row} ({column!r} column): {error}") from error
        return {"text": text[len(strip):] if strip and text.startswith(strip) else text}

    return dataset.map(render_row, with_indices=True, num_proc=num_proc, desc="Applying the chat template")


__all__ = ["ALPACA_PROMPT", "PromptParts", "apply_chat_template", "construct_chat_template", "parse_prompt_template",
           "set_prompt_template"]
