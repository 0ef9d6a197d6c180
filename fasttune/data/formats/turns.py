"""Build a `ChatTemplate` (Jinja + Ollama Go template) from one table row of per-role affixes.

Most chat formats are "prefix + content + suffix" per role; writing them as such data and generating both template
languages from it keeps the Jinja and the Go rendering identical by construction. A row says:

    bos  [system block]  for each message:  user:      user_prefix [system + system_join] content user_suffix
                                            assistant: assistant_prefix {% generation %} assistant_content_prefix
                                                       content assistant_end {% endgeneration %} assistant_after
    [generation_prompt when add_generation_prompt]

``system_mode`` says where the system prompt goes: ``"block"`` (its own block, before the turns), ``"first_user"``
(folded into the first user message, as Gemma 3 does) or ``"last_user"`` (folded into the last user message, as
Mistral v3 does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fasttune.data.spec import (
    BOS_PLACEHOLDER,
    EOS_PLACEHOLDER,
    SYSTEM_SPLIT,
    ChatTemplate,
    jinja_string,
    role_guard,
    system_prelude,
)


@dataclass(frozen=True)
class TurnFormat:
    """One row of the template table; literal strings may hold EOS_PLACEHOLDER / BOS_PLACEHOLDER."""

    name: str
    eos_token: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_end: str
    instruction_part: str
    response_part: str
    stop_strings: tuple[str, ...]
    bos: str = ""
    system_mode: Literal["block", "first_user", "last_user"] = "block"
    system_prefix: str = ""
    system_suffix: str = ""
    system_join: str = "\n\n"
    assistant_content_prefix: str = ""
    assistant_after: str = ""
    generation_prompt: str | None = None
    default_system: str | None = None
    aliases: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if self.system_mode not in ("block", "first_user", "last_user"):
            raise ValueError(
                f"system_mode: {self.system_mode!r} is not allowed; use 'block', 'first_user' or 'last_user'"
            )

    @property
    def gen_prompt(self) -> str:
        return self.assistant_prefix if self.generation_prompt is None else self.generation_prompt


def _jexpr(text: str) -> str:
    """A Jinja expression for ``text``; placeholders become the tokenizer's eos_token / bos_token variables."""
    parts: list[str] = []
    for i, eos_piece in enumerate(text.split(EOS_PLACEHOLDER)):
        if i:
            parts.append("eos_token")
        for j, piece in enumerate(eos_piece.split(BOS_PLACEHOLDER)):
            if j:
                parts.append("(bos_token if bos_token is defined and bos_token else '')")
            if piece:
                parts.append(jinja_string(piece))
    return " + ".join(parts) if parts else "''"


def _emit(text: str) -> str:
    return "{{- " + _jexpr(text) + " -}}" if text else ""


def _fold_index_jinja(mode: str) -> str:
    if mode == "block":
        return ""
    keep_first = " and ns.fold < 0" if mode == "first_user" else ""
    return (
        "{%- set ns = namespace(fold=-1) -%}{%- for m in loop_messages -%}"
        "{%- if m['role'] == 'user'" + keep_first + " -%}{%- set ns.fold = loop.index0 -%}{%- endif -%}"
        "{%- endfor -%}"
    )


def build_jinja(fmt: TurnFormat) -> str:
    """The Jinja chat template of ``fmt`` (see the module docstring for the layout)."""
    out = [system_prelude(fmt.default_system), SYSTEM_SPLIT, role_guard(), _emit(fmt.bos)]
    if fmt.system_mode == "block":
        out.append(
            "{%- if system_message is not none -%}"
            "{{- " + _jexpr(fmt.system_prefix) + " + system_message + " + _jexpr(fmt.system_suffix) + " -}}"
            "{%- endif -%}"
        )
    out.append(_fold_index_jinja(fmt.system_mode))
    fold = ""
    if fmt.system_mode != "block":
        fold = (
            "{%- if system_message and loop.index0 == ns.fold -%}"
            "{{- system_message + " + _jexpr(fmt.system_join) + " -}}{%- endif -%}"
        )
    out.append(
        "{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}"
        + _emit(fmt.user_prefix)
        + fold
        + "{{- message['content'] + " + _jexpr(fmt.user_suffix) + " -}}"
        + "{%- else -%}"
        + _emit(fmt.assistant_prefix)
        + "{%- generation -%}{{- "
        + _jexpr(fmt.assistant_content_prefix) + " + message['content'] + " + _jexpr(fmt.assistant_end)
        + " -}}{%- endgeneration -%}"
        + _emit(fmt.assistant_after)
        + "{%- endif -%}{%- endfor -%}"
    )
    if fmt.gen_prompt:
        out.append("{%- if add_generation_prompt -%}" + _emit(fmt.gen_prompt) + "{%- endif -%}")
    return "".join(out)


def build_go(fmt: TurnFormat) -> str:
    """The Ollama Go template of ``fmt``: no trim markers, so every literal is output exactly as written."""
    out = []
    if fmt.system_mode == "block":
        block = fmt.system_prefix + "{{ $.System }}" + fmt.system_suffix
        out.append(block if fmt.default_system is not None else "{{ if $.System }}" + block + "{{ end }}")
        fold = ""
    else:
        pick = '(eq $m.Role "user")' if fmt.system_mode == "last_user" else '(and (eq $m.Role "user") (lt $fold 0))'
        out.append("{{ $fold := -1 }}{{ range $i, $m := $.Messages }}{{ if " + pick + " }}{{ $fold = $i }}{{ end }}")
        out.append("{{ end }}")
        fold = "{{ if and $.System (eq $i $fold) }}{{ $.System }}" + fmt.system_join + "{{ end }}"
    out.append(
        '{{ $lastRole := "" }}{{ range $i, $m := $.Messages }}{{ $lastRole = $m.Role }}'
        '{{ if eq $m.Role "user" }}' + fmt.user_prefix + fold + "{{ $m.Content }}" + fmt.user_suffix
        + '{{ else if eq $m.Role "assistant" }}' + fmt.assistant_prefix + fmt.assistant_content_prefix
        + "{{ $m.Content }}" + fmt.assistant_end + fmt.assistant_after + "{{ end }}{{ end }}"
    )
    if fmt.gen_prompt:
        out.append('{{ if ne $lastRole "assistant" }}' + fmt.gen_prompt + "{{ end }}")
    return "".join(out)


def build(fmt: TurnFormat) -> ChatTemplate:
    """The `ChatTemplate` of one table row."""
    return ChatTemplate(
        name=fmt.name,
        jinja=build_jinja(fmt),
        eos_token=fmt.eos_token,
        stop_strings=fmt.stop_strings,
        instruction_part=fmt.instruction_part,
        response_part=fmt.response_part,
        ollama_template=build_go(fmt),
        default_system=fmt.default_system,
        aliases=fmt.aliases,
        bos_token=fmt.bos,
        response_end_parts=(fmt.assistant_end,),
        source=fmt.source,
    )
