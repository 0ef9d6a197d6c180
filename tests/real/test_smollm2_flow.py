"""SmolLM2-135M-Instruct end to end, as the quickstart runs it (fasttune/quickstart/real.py) on 6 made-up facts:
4-bit + LoRA, its own ChatML template, responses-only, fused loss, padding-free; then the merged weights, the GGUF
files in llama.cpp and the Ollama Modelfile rendered by Go."""

from __future__ import annotations

import argparse

import pytest
import torch
from golang.go_ollama import check_modelfile
from real_samples import FACTS

from fasttune import FastLanguageModel
from fasttune.quickstart import real
from fasttune.train.padding_free import PaddingFreeCollator

pytestmark = pytest.mark.slow

QUESTIONS = [q for q, _ in FACTS]
ANSWERS = [a for _, a in FACTS]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    args = argparse.Namespace(output_dir=str(out), eval_questions=None, steps=12, learning_rate=3e-3, gguf="q8_0",
                              replay=False, general_questions=4)
    return real.run(args, [{"instruction": q, "output": a} for q, a in FACTS])


def test_the_notebook_flow_learns_facts_it_could_not_know(run):
    trainer = run.trainer
    assert isinstance(trainer.data_collator, PaddingFreeCollator) and trainer.fasttune_fast_loss
    trained = [t for t in trainer.train_dataset[0]["labels"] if t != -100]  # train_on_responses_only's labels
    assert run.tokenizer.decode(trained).startswith(ANSWERS[0]), run.tokenizer.decode(trained)
    assert run.before.facts == 0 and run.loss_before > 2.0, (run.before.answers, run.loss_before)
    assert run.loss_after < 0.3 and run.after.facts >= 5, (run.after.answers, run.loss_after)
    # No assertion on the ordinary questions here: the quickstart reports them, and a 135M model's greedy answer can
    # flip with the batch it is generated in (bf16, left padding): "Rome" alone, "Italy" beside 9 other questions.


@pytest.mark.llama_cpp
def test_gguf_q8_0_answers_like_the_trained_model_in_llama_cpp(run):
    pytest.importorskip("llama_cpp")
    assert run.llama_cpp is not None
    n = len(FACTS)
    assert run.llama_cpp.answers[:n] == run.after.answers[:n]


def test_merged_16bit_answers_like_the_trained_model(run, tmp_path):
    folder = run.model.save_pretrained_merged(str(tmp_path / "merged"), run.tokenizer, save_method="merged_16bit")
    merged, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, load_in_4bit=False,
                                                  max_seq_length=256)
    assert real.ask(merged, run.tokenizer, QUESTIONS) == run.after.answers[:len(FACTS)]


@pytest.mark.llama_cpp
def test_gguf_f16_and_q4_k_m_in_llama_cpp_with_llama_cpps_fallback_types(run, tmp_path):
    """f16 answers as the trained model; q4_k_m keeps the facts; its per-tensor types (row length 576 is not a
    multiple of 256, so llama.cpp falls back for those tensors) equal what llama.cpp's own quantizer picks."""
    pytest.importorskip("llama_cpp")
    import ctypes

    import gguf
    import llama_cpp

    from fasttune.export.gguf.mixes import FTYPES

    f16, q4 = run.model.save_pretrained_gguf(str(tmp_path), run.tokenizer, quantization_method=["f16", "q4_k_m"],
                                             validate=True)
    n = len(FACTS)
    assert real.ask_llama_cpp(f16, run.tokenizer, QUESTIONS) == run.after.answers[:n]
    q4_answers = real.ask_llama_cpp(q4, run.tokenizer, QUESTIONS)
    assert sum(a == b for a, b in zip(q4_answers, ANSWERS)) >= n - 2, q4_answers

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES["q4_k_m"][1]
    params.nthread = 2
    theirs_path = tmp_path / "llama_cpp.Q4_K_M.gguf"
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs_path).encode(), ctypes.byref(params)) == 0
    ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q4)).tensors}
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(theirs_path)).tensors}
    assert ours == theirs
    assert {"Q4_K", "Q5_0"} <= set(ours.values()), sorted(set(ours.values()))  # fallbacks happened, as in llama.cpp


def test_the_modelfile_in_go_feeds_the_trained_tokens(run, go_ollama):
    import gguf

    reader = gguf.GGUFReader(str(run.gguf))
    field = reader.fields["tokenizer.ggml.add_bos_token"]
    adds_bos = bool(field.parts[field.data[0]][0])
    assert adds_bos is False  # SmolLM2: its BOS <|im_start|> opens every turn; the template writes it
    modelfile = (run.gguf.parent / "Modelfile").read_text()
    assert 'TEMPLATE """<|im_start|>' in modelfile
    conversations = [
        [{"role": "user", "content": QUESTIONS[0]}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTIONS[1]}],
        [{"role": "user", "content": QUESTIONS[2]}, {"role": "assistant", "content": ANSWERS[2]}],
    ]
    assert check_modelfile(go_ollama, run.tokenizer, modelfile, conversations, adds_bos=adds_bos) == 3
