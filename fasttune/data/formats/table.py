"""The turn-based chat formats, one row each (the published prompt formats, written as data).

Sources: each row's ``source`` names the model card / reference chat template the format follows. Differences from
the reference Jinja, all deliberate: content is never trimmed (Ollama cannot trim, and training text should be what
the dataset holds); Gemma 1/2 fold a system prompt into the first user turn as Gemma 3 does instead of raising;
tools are not rendered.
"""

from __future__ import annotations

from fasttune.data.formats.turns import TurnFormat
from fasttune.data.spec import BOS_PLACEHOLDER, EOS_PLACEHOLDER

_IM = dict(
    eos_token="<|im_end|>",
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    user_prefix="<|im_start|>user\n",
    user_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    assistant_after="\n",
    instruction_part="<|im_start|>user\n",
    response_part="<|im_start|>assistant\n",
    stop_strings=("<|im_end|>",),
)

_LLAMA3 = dict(
    bos="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
    system_suffix="<|eot_id|>",
    user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
    user_suffix="<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_end="<|eot_id|>",
    instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
    response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    stop_strings=("<|eot_id|>", "<|eom_id|>"),
)

_PHI3_TAGS = dict(
    system_prefix="<|system|>\n",
    user_prefix="<|user|>\n",
    assistant_prefix="<|assistant|>\n",
    assistant_after="\n",
    instruction_part="<|user|>\n",
    response_part="<|assistant|>\n",
)

TURN_FORMATS: tuple[TurnFormat, ...] = (
    TurnFormat(name="chatml", aliases=("chat_ml", "chat-ml"), source="OpenAI ChatML", **_IM),
    TurnFormat(
        name="qwen-2.5",
        aliases=("qwen2.5", "qwen25", "qwen-25"),
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        source="Qwen/Qwen2.5-*-Instruct tokenizer_config.json chat_template (ChatML + default system)",
        **_IM,
    ),
    TurnFormat(
        name="phi-4",
        aliases=("phi4",),
        eos_token="<|im_end|>",
        system_prefix="<|im_start|>system<|im_sep|>",
        system_suffix="<|im_end|>",
        user_prefix="<|im_start|>user<|im_sep|>",
        user_suffix="<|im_end|>",
        assistant_prefix="<|im_start|>assistant<|im_sep|>",
        assistant_end="<|im_end|>",
        instruction_part="<|im_start|>user<|im_sep|>",
        response_part="<|im_start|>assistant<|im_sep|>",
        stop_strings=("<|im_end|>", "<|endoftext|>"),
        source="microsoft/phi-4 chat_template",
    ),
    TurnFormat(name="llama-3", aliases=("llama3", "llama-3.0"), source="meta-llama/Meta-Llama-3-8B-Instruct", **_LLAMA3),
    TurnFormat(
        name="llama-3.1",
        aliases=("llama-31", "llama3.1", "llama-3.2", "llama-32", "llama3.2", "llama-3.3", "llama-33", "llama3.3"),
        default_system="",
        source="meta-llama/Llama-3.1-8B-Instruct chat_template without tools (date_string default '26 Jul 2024')",
        **{
            **_LLAMA3,
            "system_prefix": "<|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
        },
    ),
    TurnFormat(
        name="mistral",
        aliases=("mistral-v3", "mistral-instruct", "mistral-v0.3"),
        bos="<s>",
        eos_token="</s>",
        system_mode="last_user",
        system_join="\n\n",
        user_prefix="[INST] ",
        user_suffix="[/INST]",
        assistant_prefix="",
        assistant_content_prefix=" ",
        assistant_end="</s>",
        generation_prompt="",
        instruction_part="[INST]",
        response_part="[/INST]",
        stop_strings=("</s>",),
        source="mistralai/Mistral-7B-Instruct-v0.3 (v3 tokenizer: system prompt on the last user turn)",
    ),
    TurnFormat(
        name="gemma",
        aliases=("gemma-1", "gemma2", "gemma-2", "gemma-3", "gemma3"),
        bos="<bos>",
        eos_token="<end_of_turn>",
        system_mode="first_user",
        system_join="\n\n",
        user_prefix="<start_of_turn>user\n",
        user_suffix="<end_of_turn>\n",
        assistant_prefix="<start_of_turn>model\n",
        assistant_end="<end_of_turn>",
        assistant_after="\n",
        instruction_part="<start_of_turn>user\n",
        response_part="<start_of_turn>model\n",
        stop_strings=("<end_of_turn>", "<eos>"),
        source="google/gemma-3-*-it chat_template (system folded into the first user turn)",
    ),
    TurnFormat(
        name="phi-3",
        aliases=("phi3", "phi-3.5", "phi-35", "phi3.5"),
        eos_token="<|end|>",
        system_suffix="<|end|>\n",
        user_suffix="<|end|>\n",
        assistant_end="<|end|>",
        stop_strings=("<|end|>", "<|endoftext|>"),
        source="microsoft/Phi-3-mini-4k-instruct and Phi-3.5-mini-instruct chat_template",
        **_PHI3_TAGS,
    ),
    TurnFormat(
        name="zephyr",
        eos_token="</s>",
        system_suffix="</s>\n",
        user_suffix="</s>\n",
        assistant_end="</s>",
        stop_strings=("</s>",),
        source="HuggingFaceH4/zephyr-7b-beta chat_template",
        **_PHI3_TAGS,
    ),
    TurnFormat(
        name="vicuna",
        aliases=("vicuna-1.1", "vicuna_v1.1"),
        bos=BOS_PLACEHOLDER,
        eos_token=EOS_PLACEHOLDER,
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        system_suffix=" ",
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT:",
        assistant_content_prefix=" ",
        assistant_end=EOS_PLACEHOLDER,
        instruction_part="USER:",
        response_part="ASSISTANT:",
        stop_strings=(EOS_PLACEHOLDER,),
        source="FastChat vicuna_v1.1 conversation template",
    ),
    TurnFormat(
        name="alpaca",
        bos=BOS_PLACEHOLDER,
        eos_token=EOS_PLACEHOLDER,
        default_system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.",
        system_suffix="\n\n",
        user_prefix="### Instruction:\n",
        user_suffix="\n\n",
        assistant_prefix="### Response:\n",
        assistant_end=EOS_PLACEHOLDER,
        assistant_after="\n\n",
        instruction_part="### Instruction:\n",
        response_part="### Response:\n",
        stop_strings=(EOS_PLACEHOLDER,),
        source="tatsu-lab/stanford_alpaca prompt, multi-turn as in Unsloth's alpaca template",
    ),
    TurnFormat(
        name="unsloth",
        bos=BOS_PLACEHOLDER,
        eos_token=EOS_PLACEHOLDER,
        default_system="You are a helpful assistant to the user",
        system_suffix="\n",
        user_prefix=">>> User: ",
        user_suffix="\n",
        assistant_prefix=">>> Assistant: ",
        assistant_end=EOS_PLACEHOLDER,
        assistant_after="\n",
        instruction_part=">>> User: ",
        response_part=">>> Assistant: ",
        stop_strings=(EOS_PLACEHOLDER,),
        source="Unsloth's own 'unsloth' chat template",
    ),
)
