"""Fixtures for the save reliability tests (test_saves*.py, test_kill*.py).

``saves_fork`` runs a function in a forked child that can SIGKILL itself at a chosen file-system step: a real
``kill -9`` (no ``finally``, no cleanup) at a deterministic point, without paying an interpreter start-up per kill.
Steps are the calls of ``os.rename/replace/mkdir/rmdir/unlink/remove``, fasttune's atomic exchange and the data
writers (safetensors, GGUF, ``Path.write_text``); a writer step is killed half way (the file is truncated to half).
``saves_tree`` reads a folder into ``{relative path: bytes}`` to compare exports byte for byte.
"""

from __future__ import annotations

import os
import signal
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

_FS_CALLS = ("rename", "replace", "mkdir", "rmdir", "unlink", "remove")


@dataclass
class ForkResult:
    killed: bool  # the child died by SIGKILL at the requested step
    steps: list[str]  # every step the child reached, in order (the killed one last), then any error text
    targets: list[str]  # for each step, the name of the path it acts on (the destination of a rename)


class _KillSwitch:
    """Wrap the step functions in this (child) process; kill before the ``n``-th call of ``label``."""

    def __init__(self, kill_at: tuple[str, int] | None, report: Callable[[str], None]):
        self.kill_at, self.report, self.counts = kill_at, report, Counter()

    def _step(self, label: str, path: Any = "") -> bool:
        self.counts[label] += 1
        self.report(f"{label}\t{os.path.basename(os.fsdecode(path))}")
        return self.kill_at == (label, self.counts[label])

    def wrap_fs(self, module: Any, name: str, label: str) -> None:
        real = getattr(module, name)

        def step(*args: Any, **kwargs: Any) -> Any:
            path = next((a for a in reversed(args) if isinstance(a, (str, bytes, os.PathLike))), "")
            if self._step(label, path):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(module, name, step)

    def wrap_writer(self, module: Any, name: str, label: str, path_of: Callable[..., Path]) -> None:
        real = getattr(module, name)

        def step(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            path = Path(path_of(*args, **kwargs))
            if self._step(label, path):
                os.truncate(path, path.stat().st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        setattr(module, name, step)

    def install(self) -> None:
        import gguf
        import peft.peft_model
        import transformers.modeling_utils

        import fasttune.export.atomic as atomic
        import fasttune.export.hf as hf

        for name in _FS_CALLS:
            self.wrap_fs(os, name, f"os.{name}")
        self.wrap_fs(atomic, "_exchange", "exchange")
        for module, name in ((hf, "save_file"), (transformers.modeling_utils, "safe_save_file"),
                             (peft.peft_model, "safe_save_file")):
            self.wrap_writer(module, name, "write:safetensors", lambda state, path, *a, **k: path)
        self.wrap_writer(Path, "write_text", "write:text", lambda self_, *a, **k: self_)

        def gguf_path(writer: Any, *a: Any, **k: Any) -> Path:
            for fout in writer.fout:
                fout.flush()
            return writer.path

        self.wrap_writer(gguf.GGUFWriter, "write_tensors_to_file", "write:gguf", gguf_path)


def _child(fn: Callable[[], Any], kill_at: tuple[str, int] | None, prepare: Callable[[], Any] | None,
           uid: int | None, out: int) -> None:
    """Body of the forked child: never returns (``os._exit``)."""
    code = 0
    try:
        import torch

        torch.set_num_threads(1)  # GNU OpenMP's pool does not survive fork
        if uid is not None:
            os.setgid(uid)
            os.setuid(uid)
        if prepare is not None:
            prepare()
        _KillSwitch(kill_at, lambda label: os.write(out, f"{label}\n".encode())).install()
        fn()
        os.write(out, b"=ok\n")
    except BaseException as err:  # reported to the parent, which fails the test with it
        os.write(out, ("=error " + "".join(traceback.format_exception(err)).replace("\n", "\\n") + "\n").encode())
        code = 1
    finally:
        os._exit(code)


def _run_forked(fn: Callable[[], Any], kill_at: tuple[str, int] | None = None, prepare: Callable[[], Any] | None = None,
                uid: int | None = None, expect_error: bool = False) -> ForkResult:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _child(fn, kill_at, prepare, uid, write)
    os.close(write)
    chunks = []
    with os.fdopen(read, "rb") as pipe:
        for chunk in iter(lambda: pipe.read(65536), b""):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    lines = b"".join(chunks).decode().splitlines()
    errors = [line[7:].replace("\\n", "\n") for line in lines if line.startswith("=error ")]
    if errors and not expect_error:
        raise AssertionError(f"the forked save failed:\n{errors[0]}")
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if kill_at is not None and not killed and "=ok" not in lines and not expect_error:
        raise AssertionError(f"the child neither finished nor was killed at {kill_at}: status {status}")
    steps = [line.split("\t") for line in lines if not line.startswith("=")]
    return ForkResult(killed, [step[0] for step in steps] + errors, [step[-1] for step in steps])


@pytest.fixture
def saves_fork() -> Callable[..., ForkResult]:
    """``saves_fork(fn, kill_at=("os.rename", 2), prepare=None, uid=None, expect_error=False) -> ForkResult``."""
    return _run_forked


def _read_tree(folder: Path, hidden: bool = False) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``folder`` (folders as ``b"<dir>"``); fasttune's hidden
    scratch / backup entries are left out unless ``hidden``."""
    from fasttune.export.atomic import _BACKUP_RE, _SIBLING_RE

    tree: dict[str, bytes] = {}
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        if not hidden and rel == Path("."):
            dirs[:] = [d for d in dirs if not (_SIBLING_RE.match(d) or _BACKUP_RE.match(d))]
            files = [f for f in files if not _SIBLING_RE.match(f)]
        for name in dirs:
            tree[str(rel / name)] = b"<dir>"
        for name in files:
            tree[str(rel / name)] = (Path(root) / name).read_bytes()
    return tree


@pytest.fixture
def saves_tree() -> Callable[..., dict[str, bytes]]:
    """``saves_tree(folder, hidden=False) -> {relative path: bytes}``."""
    return _read_tree


def _leftovers(folder: Path) -> list[str]:
    """fasttune's hidden entries in ``folder`` and beside it (there should be none once a save has finished)."""
    from fasttune.export.atomic import _BACKUP_RE, _SIBLING_RE

    found = [p for p in (folder.iterdir() if folder.is_dir() else []) if _SIBLING_RE.match(p.name)
             or _BACKUP_RE.match(p.name)]
    found += [p for p in folder.parent.iterdir() if _SIBLING_RE.match(p.name) and p.name.startswith(f".{folder.name}.")]
    return sorted(str(p) for p in found)


@pytest.fixture
def saves_leftovers() -> Callable[[Path], list[str]]:
    """``saves_leftovers(folder) -> [paths]``: hidden scratch / backup / old entries in and beside ``folder``."""
    return _leftovers


@pytest.fixture(scope="session")
def saves_lora_model(tiny_model_dir):
    """``saves_lora_model(seed) -> peft LoRA model`` (eval, fp32) over the tiny llama; each seed gives different,
    non-zero adapters, so exports of two seeds differ in every weight file. Cached per seed: do not modify."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cache: dict[int, Any] = {}

    def make(seed: int) -> Any:
        if seed not in cache:
            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
            torch.manual_seed(seed)
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.copy_(0.05 * torch.randn(param.shape, generator=gen))
            cache[seed] = model.eval()
        return cache[seed]

    return make


@pytest.fixture
def saves_chat_tokenizer(tiny_tokenizer):
    """A private copy of the tiny llama tokenizer with the llama-3 chat template (GGUF and Ollama need one)."""
    import copy

    from fasttune.data.chat import get_chat_template

    return get_chat_template(copy.deepcopy(tiny_tokenizer("llama")), "llama-3")
