"""The folder install itself (``fasttune.export.atomic``), with plain files: a kill -9 before every file-system step
of every install path leaves the old or the new export (or, entry by entry, one without its keystone that the next
save rolls back or forward); injected errors leave the old export and say so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fasttune.export.atomic as atomic
from fasttune.export.atomic import ExportInstallError, atomic_directory, recover_interrupted

OLD = {"config.json": b'{"v": "old"}', "model.safetensors": b"old weights", "tokenizer.json": b"old tok",
       "old-extra.safetensors": b"stale shard"}
NEW = {"config.json": b'{"v": "new"}', "model.safetensors": b"new weights", "tokenizer.json": b"new tok",
       "model.safetensors.index.json": b"{}", "generation_config.json": b"{}"}
FOREIGN = {"notes.txt": b"my notes", "checkpoint-1": b"<dir>", "checkpoint-1/optimizer.pt": b"adam"}


def _managed(name: str) -> bool:
    return not name.startswith(("notes", "checkpoint-"))


def _fill(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = folder / rel
        if data == b"<dir>":
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _save(target: Path) -> None:
    with atomic_directory(target, overwrite=True, managed=_managed) as scratch:
        _fill(scratch, NEW)


def _no_exchange() -> None:
    atomic._exchange = lambda a, b: False  # as on a system without renameat2 (only ever set in a forked child)


@pytest.mark.parametrize("mode", ["exchange", "two_renames", "entry_by_entry", "working_directory"])
def test_kill_before_every_step_leaves_old_or_new(mode, tmp_path, saves_fork, saves_tree, saves_leftovers,
                                                   monkeypatch):
    """entry_by_entry: the scratch is beside the target; working_directory: inside it (the target must not move)."""
    target = tmp_path / "export"
    entry_by_entry = mode in ("entry_by_entry", "working_directory")
    foreign = FOREIGN if entry_by_entry else {}
    prepare = _no_exchange if mode == "two_renames" else None

    def reset() -> None:  # empties the target rather than deleting it: it may be the working directory
        for entry in target.iterdir() if target.exists() else []:
            atomic._remove(entry)
        for leftover in saves_leftovers(target):
            atomic._remove(Path(leftover))
        _fill(target, {**OLD, **foreign})

    reset()
    if mode == "working_directory":
        monkeypatch.chdir(target)
    steps = saves_fork(lambda: _save(target), prepare=prepare).steps
    assert saves_tree(target) == {**NEW, **foreign}
    if mode == "exchange":
        assert "exchange" in steps and "os.rename" not in steps
    elif mode == "two_renames":
        assert steps.count("os.rename") == 2
    else:
        assert steps.count("os.rename") >= 2 * len(NEW)
    if mode == "two_renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    seen = {"old": 0, "new": 0, "no keystone": 0}
    points = [(label, steps[:i + 1].count(label)) for i, label in enumerate(steps)]
    # every step, except inside a run of the same call (the unlinks of one rmtree): its first and last only
    points = [p for i, p in enumerate(points) if i in (0, len(points) - 1)
              or points[i - 1][0] != p[0] or points[i + 1][0] != p[0]]
    for label, n in points:
        reset()
        result = saves_fork(lambda: _save(target), kill_at=(label, n), prepare=prepare)
        assert result.killed, (label, n)
        state = saves_tree(target) if target.exists() else None
        if state is not None:
            assert {k: state.get(k) for k in foreign} == foreign, f"kill at {label} #{n}: foreign files changed"
            visible = {k: v for k, v in state.items() if k not in foreign}
        if state is None:
            assert mode == "two_renames", f"kill at {label} #{n}: the target vanished"
        elif visible in (OLD, NEW):
            seen["old" if visible == OLD else "new"] += 1
        else:
            assert entry_by_entry and "config.json" not in visible, \
                f"kill at {label} #{n}: a loadable mix of old and new: {sorted(visible)}"
            seen["no keystone"] += 1
        recover_interrupted(target)
        recovered = {k: v for k, v in saves_tree(target).items() if k not in foreign}
        assert recovered in (OLD, NEW), f"kill at {label} #{n}: after recovery {sorted(recovered)}"
        assert not saves_leftovers(target), f"kill at {label} #{n}: recovery left {saves_leftovers(target)}"
        _save(target)
        assert saves_tree(target, hidden=True) == {**NEW, **foreign}, f"kill at {label} #{n}: the next save"
    assert seen["old"] and seen["new"], seen
    assert (seen["no keystone"] > 0) == entry_by_entry, seen


def test_error_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch, saves_tree):
    target = tmp_path / "export"
    _fill(target, OLD)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real, calls = os.rename, []

    def rename(src, dst, **kw):
        calls.append(Path(src).name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (injected)")
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ExportInstallError, match="nothing was changed: the previous export is in place"):
        _save(target)
    monkeypatch.setattr(os, "rename", real)
    assert saves_tree(target, hidden=True) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize("fail_at", ["backup", "install"])
def test_error_entry_by_entry_rolls_back_or_says_how_to_finish(fail_at, tmp_path, monkeypatch, saves_tree,
                                                               saves_leftovers):
    target = tmp_path / "export"
    _fill(target, {**OLD, **FOREIGN})
    real = os.rename
    state = {"phase": "backup"}

    def rename(src, dst, **kw):
        if ".fasttune.done-" in str(dst):
            state["phase"] = "install"
        elif state["phase"] == fail_at and Path(src).name == "tokenizer.json":
            raise PermissionError(13, "Permission denied (injected)")
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "rename", rename)
    expected = "previous files were put back" if fail_at == "backup" else "stopped half way.*recover_interrupted"
    with pytest.raises(ExportInstallError, match=expected):
        _save(target)
    monkeypatch.setattr(os, "rename", real)
    if fail_at == "backup":
        assert saves_tree(target, hidden=True) == {**OLD, **FOREIGN}
    else:
        assert "config.json" not in saves_tree(target), "keystones go in last"
        recover_interrupted(target)
        assert saves_tree(target, hidden=True) == {**NEW, **FOREIGN}
    assert not saves_leftovers(target)


def test_live_saves_are_left_alone_and_dead_ones_cleaned(tmp_path, saves_fork, saves_leftovers):
    target = tmp_path / "export"
    _fill(target, OLD)
    saves_fork(lambda: _save(target), kill_at=("exchange", 1))  # dies with its finished scratch folder beside
    dead = saves_leftovers(target)
    assert len(dead) == 1 and ".export.tmp-" in dead[0]
    live = tmp_path / f".export.tmp-{atomic.new_tag()}"  # this process, a save in progress (registered)
    live.mkdir()
    tag = live.name.split(".tmp-")[1]
    atomic._ACTIVE.add(tag)
    try:
        _save(target)
        assert saves_leftovers(target) == [str(live)]
    finally:
        atomic._ACTIVE.discard(tag)
    recover_interrupted(target)
    assert saves_leftovers(target) == []
