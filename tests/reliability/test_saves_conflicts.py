"""Saving into a folder that is not empty: other files stay, conflicting export files are refused (or removed with
overwrite=True), the working directory is protected, read-only folders fail before any work, broken adapters and
bad arguments are refused with errors that name them."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import fasttune.export.atomic as atomic
import fasttune.export.hf as hf
from fasttune.export import NonFiniteWeightError, save_pretrained_gguf, save_pretrained_merged
from fasttune.export.atomic import ExportConflictError

USER_FILES = {"notes.txt": b"lr 2e-4 worked best", "train.py": b"print('train')", "checkpoint-50": b"<dir>",
              "checkpoint-50/trainer_state.json": b'{"global_step": 50}', "data": b"<dir>",
              "data/train.jsonl": b'{"text": "hi"}\n'}


def _fill(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        if data == b"<dir>":
            (folder / rel).mkdir(parents=True, exist_ok=True)
        else:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)


def _logits(model, folder: Path | None = None) -> torch.Tensor:
    ids = torch.arange(3, 27).unsqueeze(0)
    if folder is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_user_files_survive_and_the_export_loads(saves_lora_model, tmp_path, saves_tree, saves_leftovers):
    model = saves_lora_model(0)
    target = tmp_path / "run"
    _fill(target, USER_FILES)
    save_pretrained_merged(model, target, None)
    tree = saves_tree(target)
    assert {k: tree.get(k) for k in USER_FILES} == USER_FILES, "files the save does not write must stay"
    assert {"config.json", "model.safetensors"} <= set(tree)
    assert (_logits(model, target) - _logits(model)).abs().max() < 2e-4
    save_pretrained_merged(saves_lora_model(1), target, None)  # a re-save replaces only its own files
    assert {k: saves_tree(target).get(k) for k in USER_FILES} == USER_FILES
    assert not saves_leftovers(target)


def test_working_directory_is_refused_unless_overwrite(saves_lora_model, tmp_path, monkeypatch, saves_tree):
    project = tmp_path / "project"
    _fill(project, USER_FILES)
    monkeypatch.chdir(project)
    with pytest.raises(ExportConflictError, match="current working directory.*nothing was written.*overwrite=True"):
        save_pretrained_merged(saves_lora_model(0), ".", None)
    assert saves_tree(project, hidden=True) == USER_FILES
    with pytest.raises(ExportConflictError, match="current working directory"):
        save_pretrained_merged(saves_lora_model(0), tmp_path, None)  # a folder above it
    save_pretrained_merged(saves_lora_model(0), ".", None, overwrite=True)
    tree = saves_tree(project, hidden=True)
    assert {k: tree.get(k) for k in USER_FILES} == USER_FILES and "model.safetensors" in tree
    assert Path.cwd() == project


def test_stale_shards_are_refused_then_removed_with_overwrite(saves_lora_model, tmp_path, saves_tree,
                                                              saves_leftovers):
    model = saves_lora_model(0)
    target = tmp_path / "out"
    _fill(target, {"notes.txt": b"keep"})
    save_pretrained_merged(model, target, None, max_shard_size="2MB")
    shards = sorted(p.name for p in target.glob("model-*.safetensors"))
    assert len(shards) > 1
    before = saves_tree(target, hidden=True)
    with pytest.raises(ExportConflictError) as info:
        save_pretrained_merged(model, target, None)  # one file now: the old shards + index would stay beside it
    for name in [*shards, "model.safetensors.index.json"]:
        assert name in str(info.value)
    assert "overwrite=True" in str(info.value) and "nothing was changed" in str(info.value)
    assert saves_tree(target, hidden=True) == before and not saves_leftovers(target)
    save_pretrained_merged(model, target, None, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "generation_config.json",
                                                        "model.safetensors", "notes.txt"]
    assert (_logits(model, target) - _logits(model)).abs().max() < 2e-4


def test_adapter_and_merged_weights_never_share_a_folder(saves_lora_model, tmp_path, monkeypatch):
    model = saves_lora_model(0)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    save_pretrained_merged(model, adapter, None, save_method="lora")
    save_pretrained_merged(model, merged, None)

    def never(*args, **kwargs):
        raise AssertionError("the conflict must be found before merging")

    monkeypatch.setattr(hf, "write_merged_16bit", never)
    with pytest.raises(ExportConflictError, match=r"\['adapter_config.json', 'adapter_model.safetensors'\].*"
                                                  "nothing was written"):
        save_pretrained_merged(model, adapter, None)
    monkeypatch.undo()
    with pytest.raises(ExportConflictError, match="config.json.*model.safetensors"):
        save_pretrained_merged(model, merged, None, save_method="lora")
    save_pretrained_merged(model, merged, None, save_method="lora", overwrite=True)
    assert {p.name for p in merged.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def test_read_only_folder_fails_before_any_work(saves_lora_model, saves_fork, saves_tree):
    """A real permission check: the save runs in a child as an unprivileged user (chmod does not bind root)."""
    model, new = saves_lora_model(0), saves_lora_model(1)
    shared = Path(tempfile.mkdtemp(prefix="fasttune-ro-"))
    try:
        shared.chmod(0o777)  # the parent is writable, the export folder is not: the old code swapped, then failed
        target = shared / "out"
        save_pretrained_merged(model, target, None)
        target.chmod(0o555)
        before = saves_tree(target, hidden=True)
        uid = 65534 if os.geteuid() == 0 else None
        result = saves_fork(lambda: save_pretrained_merged(new, target, None), uid=uid,
                            expect_error=True)
        errors = [line for line in result.steps if "Error" in line]
        assert errors and "PermissionError" in errors[-1], result.steps[-3:]
        assert "is not writable" in errors[-1] and "nothing was written" in errors[-1]
        assert not any(step.startswith("write:") for step in result.steps), "the check must come before the work"
        assert saves_tree(target, hidden=True) == before
        assert sorted(p.name for p in shared.iterdir()) == ["out"]
    finally:
        for root, dirs, _ in os.walk(shared):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(shared)


def test_old_export_that_cannot_be_deleted_is_reported_not_raised(saves_lora_model, tmp_path, monkeypatch, caplog):
    target = tmp_path / "out"
    save_pretrained_merged(saves_lora_model(0), target, None)
    old_weights = (target / "model.safetensors").read_bytes()
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        weights = Path(path) / "model.safetensors"
        if weights.exists() and weights.read_bytes() == old_weights:
            raise PermissionError(13, "Permission denied (injected)", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    with caplog.at_level(logging.WARNING, logger="fasttune.export.atomic"):
        save_pretrained_merged(saves_lora_model(1), target, None)
    monkeypatch.undo()
    assert (target / "model.safetensors").read_bytes() != old_weights
    message = caplog.text
    assert f"the new export is installed in {target}" in message and "could not be deleted" in message
    left = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(left) == 1 and str(left[0]) in message


def test_lora_with_nan_is_refused_naming_the_tensor(saves_lora_model, tmp_path):
    model = saves_lora_model(2)  # a private seed: this test breaks the model
    weight = model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    with torch.no_grad():
        weight[0, 0] = float("nan")
        weight[1, 0] = float("inf")
    with pytest.raises(NonFiniteWeightError, match=r"layers\.1\.self_attn\.v_proj\.lora_B.* 1 NaN and 1 inf.*"
                                                   "nothing was written"):
        save_pretrained_merged(model, tmp_path / "adapter", None, save_method="lora")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, shown", [(None, "got None (NoneType)"), (["q8_0", None], "item 1 of the list is None"),
                                          (8, "got 8 (int)")])
def test_quantization_method_of_wrong_type_is_named(value, shown, saves_lora_model, saves_chat_tokenizer, tmp_path):
    with pytest.raises(TypeError, match=rf"quantization_method: {re.escape(shown)}.*'q8_0'.*\['q4_k_m', 'q8_0'\]"):
        save_pretrained_gguf(saves_lora_model(0), tmp_path / "gguf", saves_chat_tokenizer, quantization_method=value)
    assert list(tmp_path.iterdir()) == []


def test_gguf_into_read_only_folder_fails_before_merging(saves_lora_model, saves_chat_tokenizer, tmp_path,
                                                         monkeypatch):
    folder = tmp_path / "gguf"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(atomic.os, "access", lambda path, mode, **kw: False if Path(path) == folder else
                        real(path, mode, **kw))
    monkeypatch.setattr("fasttune.export.gguf.save.iter_merged_tensors", lambda *a, **k: pytest.fail("merged"))
    with pytest.raises(PermissionError, match="is not writable.*nothing was written"):
        save_pretrained_gguf(saves_lora_model(0), folder, saves_chat_tokenizer, quantization_method="q8_0")


def test_a_file_or_a_dangling_link_as_the_target_is_named_for_what_it_is(saves_lora_model, saves_chat_tokenizer,
                                                                          tmp_path, monkeypatch):
    """Both were reported misleadingly ("is not writable", "exists and is not a folder") before 2026-12-07."""
    monkeypatch.setattr("fasttune.export.gguf.save.iter_merged_tensors", lambda *a, **k: pytest.fail("merged"))
    file = tmp_path / "model.gguf"
    file.write_bytes(b"an earlier export")
    with pytest.raises(FileExistsError, match=r"'.*model.gguf' is a file, not a folder; nothing was written"):
        save_pretrained_gguf(saves_lora_model(0), file, saves_chat_tokenizer, quantization_method="q8_0")
    with pytest.raises(NotADirectoryError, match=r"'.*model.gguf' is a file, so '.*model.gguf/sub' cannot be created"):
        save_pretrained_gguf(saves_lora_model(0), file / "sub", saves_chat_tokenizer, quantization_method="q8_0")
    assert file.read_bytes() == b"an earlier export"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"'.*link' is a symbolic link to '.*gone', which does not exist"):
        save_pretrained_merged(saves_lora_model(0), link, saves_chat_tokenizer)


def test_a_full_disk_is_named_and_leaves_nothing_behind(saves_lora_model, saves_chat_tokenizer, tmp_path,
                                                        monkeypatch):
    """As a full disk reports itself: safetensors' error text (merged export) and numpy's short write (GGUF). Before
    2026-12-07 the first named no path and the second left an empty target folder."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(hf, "save_file", full)
    with pytest.raises(OSError, match=r"no space left on the disk holding '.*': the export stopped, its partial files "
                                      r"were removed and '.*merged' was not changed") as info:
        save_pretrained_merged(saves_lora_model(0), tmp_path / "merged", saves_chat_tokenizer)
    assert info.value.errno == 28 and isinstance(info.value.__cause__, SafetensorError)

    import fasttune.export.gguf.writer as writer

    def short_write(self):
        raise OSError("196608 requested and 151152 written")

    monkeypatch.setattr(writer.GGUFWriter, "write_tensors_to_file", short_write)
    with pytest.raises(OSError, match=r"no space left on the disk holding .*: the partial file was removed"):
        save_pretrained_gguf(saves_lora_model(0), tmp_path / "gguf", saves_chat_tokenizer, quantization_method="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
