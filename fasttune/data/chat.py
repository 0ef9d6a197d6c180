"""`get_chat_template`: put a chat format on a tokenizer (template, end-of-turn EOS, role/content key mapping).

After ``tokenizer = get_chat_template(tokenizer, "llama-3.1")``:

- ``tokenizer.chat_template`` is the format's Jinja (with ``{% generation %}`` around assistant spans);
- ``tokenizer.eos_token`` is the format's end-of-turn token (``map_eos_token=True``), so generation stops and the
  model is trained to emit it;
- ``tokenizer.fasttune_template`` is the `ChatTemplate` bound to this tokenizer (its EOS/BOS placeholders filled in,
  the default system prompt replaced by ``system_message`` if given): export reads ``ollama_template``,
  ``stop_strings`` and ``eos_token`` from it, and `train_on_responses_only` reads its markers.

When the end-of-turn token is not one token of the vocabulary, it is **added** as a special token and a warning says
that the model's embeddings must be resized (``model.resize_token_embeddings(len(tokenizer))``) and that the new
row is untrained; ``tokenizer.fasttune_added_tokens`` lists what was added.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from fasttune.data.infer_template import TemplateInferenceError, infer_template
from fasttune.data.ollama import modelfile_text, runtime_template, special_tokens_added
from fasttune.data.spec import EOS_PLACEHOLDER, ChatTemplate, jinja_string, system_prelude
from fasttune.data.templates import resolve_template

logger = logging.getLogger(__name__)

_MAPPING_KEYS = ("role", "content", "user", "assistant", "system")


def _mapping_prelude(mapping: Mapping[str, str]) -> str:
    """Jinja that rewrites ``messages`` from the dataset's keys/role names to role/content (Unsloth's ``mapping``).

    Messages already in role/content form pass through unchanged, so the template works on both.
    """
    unknown = sorted(set(mapping) - set(_MAPPING_KEYS))
    if unknown:
        raise ValueError(f"mapping: keys {unknown} are not understood; allowed keys are {list(_MAPPING_KEYS)}")
    role_key = jinja_string(mapping.get("role", "role"))
    content_key = jinja_string(mapping.get("content", "content"))
    pairs = ", ".join(
        f"{jinja_string(mapping[r])}: {jinja_string(r)}" for r in ("system", "user", "assistant") if r in mapping
    )
    return (
        "{%- set role_names = {" + pairs + "} -%}{%- set ns_map = namespace(items=[]) -%}"
        "{%- for m in messages -%}"
        "{%- set r = m[" + role_key + "] if " + role_key + " in m else m['role'] -%}"
        "{%- set c = m[" + content_key + "] if " + content_key + " in m else m['content'] -%}"
        "{%- set ns_map.items = ns_map.items + [{'role': role_names.get(r, r), 'content': c}] -%}"
        "{%- endfor -%}{%- set messages = ns_map.items -%}"
    )


def _custom_template(jinja: str, eos_token: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """A `ChatTemplate` for a user ``(jinja, eos_token)`` pair; ``eos_token="eos_token"`` keeps the tokenizer's."""
    if not isinstance(jinja, str) or not jinja.strip():
        raise ValueError("chat_template: the first item of a (jinja, eos_token) tuple must be a Jinja template string")
    if eos_token == "eos_token":
        eos_token = tokenizer.eos_token
    if not isinstance(eos_token, str) or not eos_token:
        raise ValueError(f"chat_template: eos_token {eos_token!r} of the (jinja, eos_token) tuple must be a string")
    return ChatTemplate(
        name="custom", jinja=jinja, eos_token=eos_token, stop_strings=(eos_token,), instruction_part="",
        response_part="", ollama_template="", source="user-supplied (jinja, eos_token)",
    )


def _ensure_single_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    """Make ``token`` one token of the vocabulary; True when it had to be added (embeddings must be resized)."""
    if token in tokenizer.get_vocab():
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    logger.warning(
        "The end-of-turn token %r was not in the vocabulary; it was added as a special token (vocabulary now %d). "
        "Call model.resize_token_embeddings(len(tokenizer)) before training; its embedding row starts untrained, "
        "so train the embeddings (modules_to_save) or expect the model to learn to stop slowly.",
        token, len(tokenizer),
    )
    return True


def get_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | tuple[str, str] = "chatml",
    mapping: Mapping[str, str] | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
) -> PreTrainedTokenizerBase:
    """Set ``chat_template`` on ``tokenizer`` (in place) and return it; see the module docstring.

    A processor (anything with a ``.tokenizer``) gets the template on its tokenizer and on itself.

    ``chat_template`` is a table name (see ``CHAT_TEMPLATES``, aliases accepted) or a ``(jinja, eos_token)`` tuple.
    ``mapping`` renames keys and roles as Unsloth's does, e.g. ``{"role": "from", "content": "value", "user": "human",
    "assistant": "gpt"}``. ``system_message`` replaces the format's default system prompt.
    """
    inner = getattr(tokenizer, "tokenizer", None)
    if not isinstance(tokenizer, PreTrainedTokenizerBase) and isinstance(inner, PreTrainedTokenizerBase):
        get_chat_template(inner, chat_template, mapping, map_eos_token, system_message)  # a processor (VLM)
        tokenizer.chat_template = inner.chat_template
        tokenizer.fasttune_template = inner.fasttune_template
        return tokenizer
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer: expected a transformers tokenizer or processor, got {type(tokenizer).__name__}")
    if isinstance(chat_template, tuple):
        if len(chat_template) != 2:
            raise ValueError(f"chat_template: a tuple must be (jinja, eos_token), got {len(chat_template)} items")
        template = _custom_template(chat_template[0], chat_template[1], tokenizer)
    else:
        template = resolve_template(chat_template)
    if not tokenizer.eos_token and EOS_PLACEHOLDER in template.eos_token:
        raise ValueError(
            f"chat_template: {template.name!r} ends each turn with the tokenizer's own eos token, but this tokenizer "
            "has none; set tokenizer.eos_token first or pick a template with its own end-of-turn token"
        )
    template = template.bind(eos_token=tokenizer.eos_token or "", bos_token=tokenizer.bos_token)
    if system_message is not None:
        if not isinstance(system_message, str):
            raise TypeError(f"system_message: expected a string, got {type(system_message).__name__}")
        template = template.with_system(system_message)
    if mapping:
        template = dataclasses.replace(template, jinja=_mapping_prelude(mapping) + template.jinja)
    added: list[str] = []
    if map_eos_token and template.eos_token != tokenizer.eos_token:
        if _ensure_single_token(tokenizer, template.eos_token):
            added.append(template.eos_token)
        tokenizer.eos_token = template.eos_token
    tokenizer.chat_template = template.jinja
    tokenizer.fasttune_template = template
    tokenizer.fasttune_added_tokens = added
    tokenizer._ollama_modelfile = ollama_modelfile(tokenizer, template)
    return tokenizer


def ollama_modelfile(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> str | None:
    """Unsloth's ``tokenizer._ollama_modelfile``: the Modelfile text for ``template``, ``FROM {__FILE_LOCATION__}``.

    A user ``(jinja, eos_token)`` template has no Go template of its own; it is converted by measuring it
    (`fasttune.data.infer_template`). When that is impossible the attribute is None and a warning says why.
    """
    if not template.ollama_template:
        try:
            converted = infer_template(template.jinja, template.eos_token, tokenizer.bos_token, name=template.name)
        except TemplateInferenceError as error:
            logger.warning("get_chat_template: no Ollama Modelfile for this custom template (tokenizer."
                           "_ollama_modelfile is None): %s", error)
            return None
        template = dataclasses.replace(template, ollama_template=converted.ollama_template,
                                       bos_token=converted.bos_token, default_system=converted.default_system)
    return modelfile_text("{__FILE_LOCATION__}", runtime_template(template, special_tokens_added(tokenizer)[0]))


def template_of(tokenizer: PreTrainedTokenizerBase) -> ChatTemplate | None:
    """The `ChatTemplate` `get_chat_template` put on ``tokenizer``, or None."""
    template = getattr(tokenizer, "fasttune_template", None)
    return template if isinstance(template, ChatTemplate) else None


def sync_model_eos(model: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """Point ``model.config`` and ``model.generation_config`` at the tokenizer's (end-of-turn) eos id."""
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.config.eos_token_id = eos_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = eos_id


__all__ = ["get_chat_template", "ollama_modelfile", "sync_model_eos", "system_prelude", "template_of"]
