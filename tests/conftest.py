"""Shared fixtures: tiny random models of every supported family and offline tokenizers (no network, ever)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fasttune.tiny import FAMILIES, build_tiny_model, build_tokenizer  # noqa: E402

REPORTED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "kernels",
            "llama-cpp-python")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped with the reason without one); "
                                       "scripts/device_check.sh runs them with -m cuda (tests/cuda_testing.py)")


def pytest_collection_modifyitems(config, items) -> None:
    """``cuda`` cases are skipped, with the reason, where no GPU is present (pytest lists them as skipped)."""
    from cuda_testing import SKIP_REASON, cuda_runs

    if cuda_runs():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cuda_cases_in_true_fp32(request):
    """CUDA cases hold fp32 to fp32 tolerances (and greedy rollouts to exact parity): TF32 products off in them,
    torch's default, whatever an earlier test or library set; restored after."""
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    import torch

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def pytest_terminal_summary(terminalreporter) -> None:
    """At the end of every run, also under ``-q``: the versions under test, and any drift from the pins."""
    for line in _version_lines():
        terminalreporter.write_line(line)


def _version_lines() -> list[str]:
    """The versions under test, and any that differ from the pins (constraints.txt) that scripts/test.sh installs."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    pins = {}
    constraints = Path(__file__).resolve().parents[1] / "constraints.txt"
    for line in constraints.read_text().splitlines() if constraints.is_file() else []:
        if "==" in line and not line.startswith("#"):
            name, pinned = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = pinned.strip()
    have, drift = [], []
    for name in REPORTED:
        try:
            installed = version(name).split("+")[0]
        except PackageNotFoundError:
            continue
        have.append(f"{name} {installed}")
        if name in pins and pins[name] != installed:
            drift.append(f"{name} {installed} (pinned {pins[name]})")
    lines = ["versions: " + ", ".join(have)]
    if drift:
        lines.append("NOT the pinned versions (bash scripts/test.sh installs them): " + ", ".join(drift))
    return lines


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family, **config_overrides) -> Path``: a saved tiny model folder, built once per session."""
    cache: dict[tuple, Path] = {}

    def make(family: str = "llama", **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            name = family + ("-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) if overrides else "")
            cache[key] = build_tiny_model(family, tmp_path_factory.mktemp(name), **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """``tiny_tokenizer(family) -> PreTrainedTokenizerFast`` trained offline, cached per family."""
    cache = {}

    def make(family: str = "llama"):
        if family not in cache:
            cache[family] = build_tokenizer(family)
        return cache[family]

    return make


ALL_FAMILIES = FAMILIES


@pytest.fixture(scope="session")
def go_ollama():
    """Ollama's prompt rendering by Go's real text/template (tests/golang); skipped where no Go toolchain is installed
    (scripts/test.sh installs Debian's golang-go)."""
    from golang.go_ollama import GoOllama

    try:
        return GoOllama.build()
    except FileNotFoundError:
        pytest.skip("no Go toolchain (go) on PATH: scripts/test.sh installs Debian's golang-go")


@pytest.fixture
def eager_kernels_one_thread():
    """Run fasttune.kernels' CPU path uncompiled: torch.compile's first-call cost would dominate short training runs
    (the compiled path has its own parity tests in tests/kernels). One thread: tiny matmuls gain nothing from more,
    and on a shared machine extra threads only wait for each other. Folders of such runs use it autouse."""
    import torch

    from fasttune.kernels.compiling import use_compile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_compile(False):
            yield
    finally:
        torch.set_num_threads(threads)
