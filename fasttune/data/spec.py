"""`ChatTemplate`: one chat format as plain data (Jinja for transformers, Go template for Ollama, masking markers).

Contract between the two renderings (the export code relies on it): for a conversation ``messages`` of
``system``/``user``/``assistant`` messages,

    render_jinja(messages, add_generation_prompt = messages[-1]["role"] != "assistant")
        == template.bos_token + render_go(System=<system content, or default_system, or "">, Messages=messages)

(``Messages`` may include the system message, as Ollama passes it: the Go templates skip system-role messages and
print ``.System``. ``reasoning_content`` / ``thinking`` in Jinja are ``.Thinking`` in Go.)

``bos_token`` is left out of the Go template because llama.cpp / Ollama add the BOS token themselves when they tokenize.
Content is rendered verbatim (never trimmed), which is what the published formats produce for content without leading
or trailing whitespace, and what Ollama's ``{{ .Content }}`` produces.

Some formats (alpaca, vicuna, unsloth) close a turn with *the tokenizer's own* EOS: their raw table entry holds
``EOS_PLACEHOLDER`` (and ``BOS_PLACEHOLDER``) in the string fields; ``ChatTemplate.bind(eos, bos)`` (done by
``get_chat_template``) returns a concrete copy. The Jinja text uses the ``eos_token``/``bos_token`` variables that
transformers passes, so it is valid as is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

EOS_PLACEHOLDER = "{EOS_TOKEN}"
BOS_PLACEHOLDER = "{BOS_TOKEN}"
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format. Every string field is literal text (after ``bind`` for tokenizer-dependent formats)."""

    name: str = field(metadata={"help": "canonical name, e.g. 'llama-3.1'"})
    jinja: str = field(metadata={"help": "transformers chat template; assistant spans wrapped in {% generation %}"})
    eos_token: str = field(metadata={"help": "end-of-turn token that becomes the tokenizer's eos (map_eos_token)"})
    stop_strings: tuple[str, ...] = field(metadata={"help": "strings that end generation (Ollama PARAMETER stop)"})
    instruction_part: str = field(metadata={"help": "text that opens a user turn (train_on_responses_only)"})
    response_part: str = field(metadata={"help": "text after which the assistant's tokens start"})
    ollama_template: str = field(metadata={"help": "the same format as an Ollama Go template (.System, .Messages)"})
    default_system: str | None = field(default=None, metadata={"help": "system prompt used when none is given"})
    aliases: tuple[str, ...] = field(default=(), metadata={"help": "other names resolve_template accepts"})
    bos_token: str = field(default="", metadata={"help": "literal text the Jinja rendering starts with"})
    response_end_parts: tuple[str, ...] = field(
        default=(), metadata={"help": "texts that close an assistant turn (kept in the loss); default (eos_token,)"}
    )
    source: str = field(default="", metadata={"help": "where the published format comes from"})

    def __post_init__(self) -> None:
        problems = []
        for name in ("name", "jinja", "eos_token"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                problems.append(f"{name}: {getattr(self, name)!r} must be a non-empty string")
        if self.response_part and self.response_part == self.instruction_part:
            problems.append(f"response_part: {self.response_part!r} must differ from instruction_part")
        for name in ("stop_strings", "aliases", "response_end_parts"):
            if not isinstance(getattr(self, name), tuple):
                problems.append(f"{name}: {getattr(self, name)!r} must be a tuple of strings")
        if problems:
            raise ValueError(f"ChatTemplate {self.name!r}: " + "; ".join(problems))

    @property
    def end_parts(self) -> tuple[str, ...]:
        """The texts that close an assistant turn: ``response_end_parts`` or ``(eos_token,)``."""
        return self.response_end_parts or (self.eos_token,)

    @property
    def is_bound(self) -> bool:
        """True when no field still holds the tokenizer's EOS/BOS placeholder."""
        fields = (self.eos_token, self.bos_token, self.ollama_template, *self.stop_strings, *self.end_parts)
        return not any(EOS_PLACEHOLDER in text or BOS_PLACEHOLDER in text for text in fields)

    def bind(self, eos_token: str, bos_token: str | None) -> ChatTemplate:
        """Replace the tokenizer-EOS/BOS placeholders with the tokenizer's tokens (``bos_token=None``: no BOS)."""

        def sub(text: str) -> str:
            return text.replace(EOS_PLACEHOLDER, eos_token).replace(BOS_PLACEHOLDER, bos_token or "")

        return dataclasses.replace(
            self,
            eos_token=sub(self.eos_token),
            bos_token=sub(self.bos_token),
            stop_strings=tuple(dict.fromkeys(sub(s) for s in self.stop_strings)),
            response_end_parts=tuple(sub(s) for s in self.response_end_parts),
            ollama_template=sub(self.ollama_template),
            instruction_part=sub(self.instruction_part),
            response_part=sub(self.response_part),
        )

    def with_system(self, system_message: str) -> ChatTemplate:
        """A copy whose default system prompt is ``system_message`` (used when a conversation has none)."""
        old = system_prelude(self.default_system)
        if self.jinja.count(old) != 1:
            raise ValueError(
                f"system_message: template {self.name!r} does not declare its default system prompt with "
                f"system_prelude(), so a system_message cannot be set; put a system message in the conversation"
            )
        return dataclasses.replace(
            self, default_system=system_message, jinja=self.jinja.replace(old, system_prelude(system_message))
        )


def jinja_string(text: str) -> str:
    """``text`` as a double-quoted Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def system_prelude(default_system: str | None) -> str:
    """The first Jinja statement of every table template: ``{%- set default_system = ... -%}``."""
    literal = "none" if default_system is None else jinja_string(default_system)
    return "{%- set default_system = " + literal + " -%}"


# Message content given as a list of parts (``[{"type": "text", "text": ...}]``, as the models' own templates and
# multimodal datasets write it) becomes the concatenation of its text parts; any other part is a TemplateError naming
# the message and the part, because these templates render text only. Runs before everything else reads ``messages``.
CONTENT_PARTS = (
    "{%- set ns_parts = namespace(messages=[], text='') -%}"
    "{%- for m in messages -%}"
    "{%- if m is mapping and m['content'] is iterable and m['content'] is not string and m['content'] is not mapping"
    " and m['content'] | length > 0 -%}"
    "{%- set message_index = loop.index0 -%}{%- set ns_parts.text = '' -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part is mapping and part.get('type') == 'text' and part.get('text') is string -%}"
    "{%- set ns_parts.text = ns_parts.text + part['text'] -%}"
    "{%- else -%}"
    "{{- raise_exception('message ' ~ message_index ~ ': content part ' ~ loop.index0 ~ ' is '"
    " ~ ((part.get('type') | string) if part is mapping else 'not a dict')"
    " ~ '; this chat template renders text only, so every part must be {\"type\": \"text\", \"text\": <string>}') -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set ns_parts.messages = ns_parts.messages + [dict(m, content=ns_parts.text)] -%}"
    "{%- else -%}{%- set ns_parts.messages = ns_parts.messages + [m] -%}{%- endif -%}"
    "{%- endfor -%}{%- set messages = ns_parts.messages -%}"
)

# Splits off a leading system message; `system_message` is none when there is neither a message nor a default.
SYSTEM_SPLIT = CONTENT_PARTS + (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_message = default_system -%}{%- set loop_messages = messages -%}{%- endif -%}"
)


def role_guard(allowed: tuple[str, ...] = ("user", "assistant")) -> str:
    """Jinja that raises a clear TemplateError (naming the message) for input this format cannot render: a message
    that is not a dict, a role other than ``allowed`` (``system`` only as the first message), non-string content."""
    names = ", ".join(repr(r) for r in allowed)
    where = "'message ' ~ loop.index0 ~ ': '"
    return (
        "{%- for message in messages -%}"
        "{%- if message is not mapping -%}{{- raise_exception(" + where + " ~ 'must be a dict with role and content') -}}"
        "{%- elif message['role'] not in [" + names + "] and not (message['role'] == 'system' and loop.first) -%}"
        "{{- raise_exception(" + where + " ~ 'role ' ~ message['role'] ~ ' is not supported here; roles are system "
        "(first message only), user, assistant') -}}"
        "{%- elif message['content'] is not string -%}"
        "{{- raise_exception(" + where + " ~ 'content must be a string or a list of text parts') -}}"
        "{%- endif -%}{%- endfor -%}"
    )
