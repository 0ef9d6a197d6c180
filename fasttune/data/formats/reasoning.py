"""Formats with reasoning (thinking) rules that do not fit the per-role affix table: Qwen-3 and gpt-oss (harmony).

Qwen-3 (Qwen/Qwen3-* chat_template, tools left out): ChatML; an assistant turn after the last user message renders
``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` when it is the last message or carries reasoning (taken from
``reasoning_content`` or from ``<think>...</think>`` in its content); earlier turns render their answer only. The
generation prompt ends with an empty think block when ``enable_thinking=False``.

gpt-oss (openai/gpt-oss-* chat_template, harmony, tools left out): a fixed system header (model identity, knowledge
cutoff, ``current_date`` (default ``GPT_OSS_DEFAULT_DATE``, where the reference uses today's date, so that training
text is reproducible), ``reasoning_effort`` (default medium), valid channels); the system prompt becomes the developer
message ``# Instructions``; assistant turns are ``final``-channel messages closed by ``<|end|>``, except the last one
of a training conversation, closed by ``<|return|>`` and preceded by its ``thinking`` as an analysis message.

In the Ollama templates the reasoning is the message's ``.Thinking`` and content is printed as is (no stripping).
"""

from __future__ import annotations

from fasttune.data.spec import SYSTEM_SPLIT, ChatTemplate, role_guard, system_prelude

GPT_OSS_DEFAULT_DATE = "2025-06-28"

_QWEN3_JINJA = (
    system_prelude(None) + SYSTEM_SPLIT + role_guard() + r"""
{%- if system_message is not none -%}{{- '<|im_start|>system\n' + system_message + '<|im_end|>\n' -}}{%- endif -%}
{%- set ns = namespace(last_query=-1) -%}
{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'user' -%}
{{- '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' -}}
{%- else -%}
{%- set content = message['content'] -%}
{%- if message['reasoning_content'] is string -%}
{%- set reasoning = message['reasoning_content'] -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- else -%}
{%- set reasoning = '' -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' -}}
{%- generation -%}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
{%- else -%}
{{- content -}}
{%- endif -%}
{{- '<|im_end|>' -}}
{%- endgeneration -%}
{{- '\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}"""
)

_QWEN3_GO = (
    "{{ if $.System }}<|im_start|>system\n{{ $.System }}<|im_end|>\n{{ end }}"
    "{{ $lastQuery := -1 }}{{ $lastIdx := -1 }}{{ range $i, $m := $.Messages }}{{ $lastIdx = $i }}"
    '{{ if eq $m.Role "user" }}{{ $lastQuery = $i }}{{ end }}{{ end }}'
    '{{ $lastRole := "" }}{{ range $i, $m := $.Messages }}{{ $lastRole = $m.Role }}'
    '{{ if eq $m.Role "user" }}<|im_start|>user\n{{ $m.Content }}<|im_end|>\n'
    '{{ else if eq $m.Role "assistant" }}<|im_start|>assistant\n'
    "{{ if and (gt $i $lastQuery) (or (eq $i $lastIdx) $m.Thinking) }}"
    "<think>\n{{ with $m.Thinking }}{{ . }}{{ end }}\n</think>\n\n{{ end }}"
    "{{ $m.Content }}<|im_end|>\n{{ end }}{{ end }}"
    '{{ if ne $lastRole "assistant" }}<|im_start|>assistant\n'
    "{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}{{ end }}"
)

QWEN3 = ChatTemplate(
    name="qwen-3",
    jinja=_QWEN3_JINJA,
    eos_token="<|im_end|>",
    stop_strings=("<|im_end|>",),
    instruction_part="<|im_start|>user\n",
    response_part="<|im_start|>assistant\n",
    ollama_template=_QWEN3_GO,
    aliases=("qwen3", "qwen-3-thinking", "qwen3-thinking"),
    response_end_parts=("<|im_end|>",),
    source="Qwen/Qwen3-8B chat_template (tools left out)",
)

_HARMONY_HEADER = (
    "You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: "
)
_HARMONY_CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."

_GPT_OSS_JINJA = (
    system_prelude(None) + SYSTEM_SPLIT + role_guard() + r"""
{%- set date = current_date if current_date is defined else '""" + GPT_OSS_DEFAULT_DATE + r"""' -%}
{%- set effort = reasoning_effort if reasoning_effort is defined else 'medium' -%}
{{- '<|start|>system<|message|>""" + _HARMONY_HEADER.replace("\n", "\\n") + r"""' + date + '\n\nReasoning: ' -}}
{{- effort + '\n\n""" + _HARMONY_CHANNELS + r"""<|end|>' -}}
{%- if system_message -%}
{{- '<|start|>developer<|message|># Instructions\n\n' + system_message + '\n\n<|end|>' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'user' -%}
{{- '<|start|>user<|message|>' + message['content'] + '<|end|>' -}}
{%- elif loop.last and not add_generation_prompt -%}
{%- if message['thinking'] is string and message['thinking'] -%}
{{- '<|start|>assistant' -}}
{%- generation -%}{{- '<|channel|>analysis<|message|>' + message['thinking'] + '<|end|>' -}}{%- endgeneration -%}
{%- endif -%}
{{- '<|start|>assistant' -}}
{%- generation -%}{{- '<|channel|>final<|message|>' + message['content'] + '<|return|>' -}}{%- endgeneration -%}
{%- else -%}
{{- '<|start|>assistant' -}}
{%- generation -%}{{- '<|channel|>final<|message|>' + message['content'] + '<|end|>' -}}{%- endgeneration -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"""
)

_GPT_OSS_GO = (
    "<|start|>system<|message|>" + _HARMONY_HEADER + GPT_OSS_DEFAULT_DATE + "\n\nReasoning: medium\n\n"
    + _HARMONY_CHANNELS + "<|end|>"
    "{{ if $.System }}<|start|>developer<|message|># Instructions\n\n{{ $.System }}\n\n<|end|>{{ end }}"
    "{{ $lastIdx := -1 }}{{ range $i, $m := $.Messages }}{{ $lastIdx = $i }}{{ end }}"
    '{{ $lastRole := "" }}{{ range $i, $m := $.Messages }}{{ $lastRole = $m.Role }}'
    '{{ if eq $m.Role "user" }}<|start|>user<|message|>{{ $m.Content }}<|end|>'
    '{{ else if eq $m.Role "assistant" }}{{ if eq $i $lastIdx }}'
    "{{ with $m.Thinking }}<|start|>assistant<|channel|>analysis<|message|>{{ . }}<|end|>{{ end }}"
    "<|start|>assistant<|channel|>final<|message|>{{ $m.Content }}<|return|>"
    "{{ else }}<|start|>assistant<|channel|>final<|message|>{{ $m.Content }}<|end|>{{ end }}{{ end }}{{ end }}"
    '{{ if ne $lastRole "assistant" }}<|start|>assistant{{ end }}'
)

GPT_OSS = ChatTemplate(
    name="gpt-oss",
    jinja=_GPT_OSS_JINJA,
    eos_token="<|return|>",
    stop_strings=("<|return|>", "<|call|>"),
    instruction_part="<|start|>user<|message|>",
    response_part="<|start|>assistant",
    ollama_template=_GPT_OSS_GO,
    aliases=("gpt_oss", "gptoss", "harmony"),
    response_end_parts=("<|end|>", "<|return|>"),
    source="openai/gpt-oss-20b chat_template (harmony; tools and tool calls left out)",
)

REASONING_TEMPLATES: tuple[ChatTemplate, ...] = (QWEN3, GPT_OSS)
