"""use_backend / use_compile hold per-context state: another thread or asyncio task keeps its own setting."""

from __future__ import annotations

import asyncio
import threading

import torch

from fasttune.kernels import select_backend, use_backend
from fasttune.kernels.compiling import compile_enabled, use_compile


def _in_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_a_block_in_one_thread_does_not_reach_another(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNEL_BACKEND", "reference")
    monkeypatch.setenv("FASTTUNE_COMPILE", "0")
    x = torch.zeros(1)
    with use_backend("torch"), use_compile(True):
        assert (select_backend(x), compile_enabled()) == ("torch", True)
        assert _in_thread(lambda: (select_backend(x), compile_enabled())) == ("reference", False)
    with use_compile(False):
        assert _in_thread(lambda: _nested_in_thread(x)) == [True, "torch", "reference"]
        assert not compile_enabled()


def _nested_in_thread(x: torch.Tensor) -> list:
    """Blocks entered and left inside a thread while the main thread sits in its own ``use_compile(False)``."""
    seen: list = []
    with use_compile(True):
        seen.append(compile_enabled())
        with use_backend("torch"):
            seen.append(select_backend(x))
        seen.append(select_backend(x))
    return seen


def test_interleaved_asyncio_tasks_keep_their_own_backend(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNEL_BACKEND", "auto")
    x = torch.zeros(1)

    async def run(name: str, first: asyncio.Event, second: asyncio.Event) -> list[str]:
        with use_backend(name):
            seen = [select_backend(x)]
            first.set()
            await second.wait()  # the other task enters its own block meanwhile
            seen.append(select_backend(x))
        seen.append(select_backend(x))
        return seen

    async def main() -> tuple[list[str], list[str]]:
        a_in, b_in = asyncio.Event(), asyncio.Event()
        task_a = asyncio.create_task(run("reference", a_in, b_in))
        await a_in.wait()
        task_b = asyncio.create_task(run("torch", b_in, a_in))
        return await task_a, await task_b

    seen_a, seen_b = asyncio.run(main())
    assert seen_a == ["reference", "reference", "torch"]  # auto on a CPU tensor -> torch once outside the block
    assert seen_b == ["torch", "torch", "torch"]
