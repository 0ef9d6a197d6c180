"""`fasttune port`: only the import rule is applied; the rest of the file is kept; the input is never overwritten."""

from __future__ import annotations

import json

import pytest

from fasttune.cli import main
from fasttune.port import port_file, port_source

SCRIPT = '''import os
from unsloth import FastLanguageModel, is_bfloat16_supported  # the model
from unsloth.chat_templates import (get_chat_template,
                                    train_on_responses_only)
import unsloth, numpy as np
import trl
from trl import SFTTrainer, SFTConfig
from trl.trainer import utils
text = "from unsloth import X"  # strings and comments: from trl import Y
café = "é"; import trl as T
if True:
    from trl import DPOTrainer
print(trl.__version__)
'''

EXPECTED = '''import os
from fasttune import FastLanguageModel, is_bfloat16_supported  # the model
from fasttune.chat_templates import (get_chat_template,
                                    train_on_responses_only)
import fasttune, numpy as np
import fasttune.trl as trl
from fasttune.trl import SFTTrainer, SFTConfig
from trl.trainer import utils
text = "from unsloth import X"  # strings and comments: from trl import Y
café = "é"; import fasttune.trl as T
if True:
    from fasttune.trl import DPOTrainer
print(trl.__version__)
'''


def test_only_import_statements_change():
    new, changes = port_source(SCRIPT)
    assert new == EXPECTED
    assert [c.line for c in changes] == [2, 3, 5, 6, 7, 10, 12]
    assert str(changes[0]) == ("line 2: from unsloth import FastLanguageModel, is_bfloat16_supported  ->  "
                               "from fasttune import FastLanguageModel, is_bfloat16_supported")


def _notebook() -> dict:
    return {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["from unsloth import X (prose, not code)\n"]},
        {"cell_type": "code", "execution_count": 3, "metadata": {"id": "a"}, "outputs": [{"text": "ünï"}],
         "source": ["%%capture\n", "!pip install unsloth\n", "from unsloth import FastLanguageModel\n", "x = 1"]},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": "from trl import SFTTrainer\ntrainer = SFTTrainer(model=model)"},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": ["def broken(:\n"]},
    ], "metadata": {"kernelspec": {"name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}


def test_notebook_code_cells_are_ported_and_the_rest_kept_byte_for_byte(tmp_path, capsys):
    path = tmp_path / "nb.ipynb"
    original = json.dumps(_notebook(), indent=1, ensure_ascii=False) + "\n"
    path.write_text(original, encoding="utf-8")
    assert main(["port", str(path)]) == 0
    out = (tmp_path / "nb_fasttune.ipynb").read_text(encoding="utf-8")
    expected = (original.replace('"from unsloth import FastLanguageModel\\n"', '"from fasttune import FastLanguageModel\\n"')
                .replace('"from trl import SFTTrainer\\n', '"from fasttune.trl import SFTTrainer\\n'))
    assert out == expected and out != original
    assert path.read_text(encoding="utf-8") == original
    printed = capsys.readouterr().out
    assert "cell 1, line 3: from unsloth import FastLanguageModel  ->  from fasttune import FastLanguageModel" in printed
    assert "cell 3 is not valid Python" in printed and "pip install" in printed
    assert "2 imports changed" in printed


def test_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / "ported.py"
    assert main(["port", str(path), "-o", str(out)]) == 0 and out.read_text(encoding="utf-8") == EXPECTED
    out.write_text("mine", encoding="utf-8")
    assert main(["port", str(path), "-o", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().out and out.read_text(encoding="utf-8") == "mine"
    assert main(["port", str(path), "-o", str(out), "--force"]) == 0 and out.read_text(encoding="utf-8") == EXPECTED
    with pytest.raises(ValueError, match="is the input file"):
        port_file(path, path, force=True)
    with pytest.raises(ValueError, match="not a .ipynb notebook or .py script"):
        port_file(tmp_path / "notes.txt")
    assert path.read_text(encoding="utf-8") == SCRIPT


def test_vllm_sampling_imports_of_rl_notebooks_come_from_fasttune():
    """RL notebooks import SamplingParams / LoRARequest from vLLM; fasttune provides both (no vLLM needed). Other
    vLLM imports, or a statement mixing names fasttune does not provide, are left alone."""
    source = ("from vllm import SamplingParams\nfrom vllm import LLM, SamplingParams\n"
              "from vllm.lora.request import LoRARequest\nimport vllm\n")
    new, changes = port_source(source)
    assert new == ("from fasttune import SamplingParams\nfrom vllm import LLM, SamplingParams\n"
                   "from fasttune.rl import LoRARequest\nimport vllm\n")
    assert [c.line for c in changes] == [1, 3]
