"""Unsloth's RL API on fasttune: PatchFastRL, the from_pretrained RL options, fast_generate with SamplingParams and
vLLM's LoRA semantics, save_lora / load_lora; and an Unsloth GRPO notebook's cells run with only the imports changed."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from rl_helpers import fast_model

from fasttune import FastLanguageModel, PatchFastRL, SamplingParams
from fasttune.config import ConfigError, RLOptions
from fasttune.port import port_source
from fasttune.state import model_state

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _perturb_lora(model, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _greedy_text(model, tokenizer, prompt, max_new_tokens=8):
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_patch_fast_rl_checks_the_algorithm():
    PatchFastRL("GRPO", FastLanguageModel)
    PatchFastRL("dpo", FastLanguageModel)
    with pytest.raises(ValueError, match=r"algorithm: 'GRPOO' is not a known RL algorithm; choose one of \["):
        PatchFastRL("GRPOO", FastLanguageModel)


def test_from_pretrained_rl_options(tiny_model_dir):
    model_dir = str(tiny_model_dir("llama"))
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization: 1.5 must be in \(0, 1\]"):
        FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False, gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="max_lora_rank: 0 must be a positive integer"):
        FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False, max_lora_rank=0)
    model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False, fast_inference=True, max_lora_rank=8,
                                                 gpu_memory_utilization=0.6)
    with pytest.raises(ValueError, match="r: 16 is above max_lora_rank=8"):
        FastLanguageModel.get_peft_model(model, r=16)
    state = model_state(FastLanguageModel.get_peft_model(model, r=8))  # the options stay with the model
    assert state.rl == RLOptions(fast_inference=True, max_lora_rank=8, gpu_memory_utilization=0.6)


def test_fast_generate_follows_vllm_lora_semantics(tiny_model_dir, tmp_path):
    """lora_request=None samples the base model (adapters off); load_lora(path) samples that saved adapter; the live
    adapter is left as it was."""
    model, tokenizer = fast_model(tiny_model_dir("llama"))
    FastLanguageModel.for_inference(model)
    prompt = "Count to five:"
    with model.disable_adapter():
        base_text = _greedy_text(model, tokenizer, prompt)
    _perturb_lora(model, seed=1)
    saved_text = _greedy_text(model, tokenizer, prompt)
    model.save_lora(tmp_path / "saved")
    _perturb_lora(model, seed=2)  # training went on after the save
    live = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    current_text = _greedy_text(model, tokenizer, prompt)
    assert len({base_text, saved_text, current_text}) == 3  # the adapters matter for this prompt

    out = model.fast_generate([prompt], sampling_params=GREEDY, lora_request=None)
    assert out[0].outputs[0].text == base_text
    request = model.load_lora(str(tmp_path / "saved"))
    assert request.lora_path == str(tmp_path / "saved") and request.lora_int_id > 0
    out = model.fast_generate(prompt, sampling_params=GREEDY, lora_request=request)
    assert out[0].outputs[0].text == saved_text and out[0].prompt == prompt
    for name, param in model.named_parameters():
        if name in live:
            assert torch.equal(param, live[name]), name


def test_load_lora_rejects_adapters_of_another_shape(tiny_model_dir, tmp_path):
    model, tokenizer = fast_model(tiny_model_dir("llama"))  # r=8
    other, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False, dtype="float32")
    other = FastLanguageModel.get_peft_model(other, r=4, lora_alpha=16)
    other.save_lora(tmp_path / "r4")
    with pytest.raises(ValueError, match=r"lora_request: .* has r=4 but the model's adapter has r=8"):
        model.load_lora(tmp_path / "r4")
    with pytest.raises(FileNotFoundError, match="holds no saved adapter"):
        model.load_lora(tmp_path / "nothing")


def test_a_save_lora_folder_loads_with_the_base_models_tokenizer(tiny_model_dir, tmp_path):
    """model.save_lora writes the adapter alone; from_pretrained(that folder) took the tokenizer from it and failed."""
    model, tokenizer = fast_model(tiny_model_dir("llama"))
    model.save_lora(tmp_path / "lora")
    assert not (tmp_path / "lora" / "tokenizer_config.json").exists()
    again, again_tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "lora"), load_in_4bit=False,
                                                               dtype="float32")
    assert again_tokenizer("Count 1:")["input_ids"] == tokenizer("Count 1:")["input_ids"]
    trained = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    loaded = dict(again.named_parameters())
    assert trained and all(torch.equal(p.detach(), loaded[n].detach()) for n, p in trained.items())


def test_load_lora_refuses_non_finite_and_damaged_adapters(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = fast_model(tiny_model_dir("llama"))
    model.save_lora(tmp_path / "good")
    assert model.load_lora(tmp_path / "good").tensors
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    shutil.copytree(tmp_path / "good", tmp_path / "nan")
    save_file(tensors, tmp_path / "nan" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} in .*nan/adapter_model.safetensors' has 1 NaN "
                                         "and 0 inf values"):
        model.load_lora(tmp_path / "nan")
    shutil.copytree(tmp_path / "good", tmp_path / "cut")
    weights = tmp_path / "cut" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut/adapter_model.safetensors' cannot be read .*damaged or truncated"):
        model.load_lora(tmp_path / "cut")
    shutil.copytree(tmp_path / "good", tmp_path / "json")
    (tmp_path / "json" / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"json/adapter_config.json' is not valid JSON"):
        model.load_lora(tmp_path / "json")


# An Unsloth GRPO notebook's cells (Qwen3 (4B)-GRPO / Llama3.1 (8B)-GRPO) as Unsloth wrote them, sizes shrunk for a
# tiny CPU model; the test ports them with `fasttune port`'s rule (only import lines change) and runs the result.
NOTEBOOK = '''
from unsloth import FastLanguageModel, PatchFastRL
PatchFastRL("GRPO", FastLanguageModel)
max_seq_length = 96
lora_rank = 8
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = MODEL_DIR,
    max_seq_length = max_seq_length,
    load_in_4bit = True,
    fast_inference = True,
    max_lora_rank = lora_rank,
    gpu_memory_utilization = 0.6,
)
model = FastLanguageModel.get_peft_model(
    model,
    r = lora_rank,
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha = lora_rank,
    use_gradient_checkpointing = "unsloth",
    random_state = 3407,
)
from datasets import Dataset
SYSTEM_PROMPT = "Answer with a number."
dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                                         {"role": "user", "content": f"What is {a} plus {a}?"}],
                              "answer": str(a + a)} for a in range(8)])
def correctness_reward_func(prompts, completions, answer, **kwargs):
    responses = [completion[0]["content"] for completion in completions]
    return [2.0 if r.strip() == a else 0.0 for r, a in zip(responses, answer)]
def int_reward_func(completions, **kwargs):
    responses = [completion[0]["content"] for completion in completions]
    return [0.5 if r.strip().isdigit() else 0.0 for r in responses]
from trl import GRPOConfig, GRPOTrainer
training_args = GRPOConfig(
    learning_rate = 5e-6,
    adam_beta1 = 0.9,
    adam_beta2 = 0.99,
    weight_decay = 0.1,
    warmup_ratio = 0.1,
    lr_scheduler_type = "cosine",
    optim = "adamw_torch",
    logging_steps = 1,
    per_device_train_batch_size = 4,
    gradient_accumulation_steps = 1,
    num_generations = 4,
    max_prompt_length = 64,
    max_completion_length = 16,
    max_steps = 2,
    save_steps = 250,
    max_grad_norm = 0.1,
    report_to = "none",
    output_dir = OUTPUT_DIR,
    use_cpu = True,
)
trainer = GRPOTrainer(
    model = model,
    processing_class = tokenizer,
    reward_funcs = [int_reward_func, correctness_reward_func],
    args = training_args,
    train_dataset = dataset,
)
trainer.train()
text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}],
                                     tokenize = False, add_generation_prompt = True)
from vllm import SamplingParams
sampling_params = SamplingParams(temperature = 0.8, top_p = 0.95, max_tokens = 16)
output = model.fast_generate([text], sampling_params = sampling_params, lora_request = None)[0].outputs[0].text
model.save_lora(LORA_DIR)
output_lora = model.fast_generate(text, sampling_params = sampling_params,
                                  lora_request = model.load_lora(LORA_DIR))[0].outputs[0].text
model.save_pretrained_merged(MERGED_DIR, tokenizer, save_method = "merged_16bit")
'''


def test_unsloth_grpo_notebook_runs_with_only_imports_changed(tiny_model_dir, tmp_path):
    from fasttune.chat_templates import get_chat_template
    from fasttune.tiny import build_tiny_model, build_tokenizer

    tokenizer = get_chat_template(build_tokenizer("qwen3"), chat_template="qwen3")  # a real Qwen3 ships one
    model_dir = build_tiny_model("qwen3", tmp_path / "base", tokenizer=tokenizer)
    ported, changes = port_source(NOTEBOOK)
    assert [c.new.split(" import")[0] for c in changes] == ["from fasttune", "from fasttune.trl", "from fasttune"]
    assert [ln for ln in ported.splitlines() if "import" not in ln] == [
        ln for ln in NOTEBOOK.splitlines() if "import" not in ln]
    assert not re.search(r"^\s*(from|import)\s+(unsloth|trl|vllm)\b", ported, re.M)
    scope = {"MODEL_DIR": str(model_dir), "OUTPUT_DIR": str(tmp_path / "outputs"), "LORA_DIR": str(tmp_path / "lora"),
             "MERGED_DIR": str(tmp_path / "merged")}
    exec(compile(ported, "grpo_notebook", "exec"), scope)
    assert [h["step"] for h in scope["trainer"].state.log_history if "reward" in h] == [1, 2]
    assert isinstance(scope["output"], str) and isinstance(scope["output_lora"], str)
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
