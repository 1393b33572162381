"""Shared fixtures: tiny offline models, a seeded rng, figure cleanup."""

from __future__ import annotations

import numpy as np
import pytest

from tests._tiny import CHATML_TEMPLATE, NO_SYSTEM_TEMPLATE, build_tiny_model


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 3-block random Llama with a byte-level BPE tokenizer that adds no BOS."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    """A 3-block random Gemma-3 text model (scaled embeddings, sliding attention)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_gemma"), arch="gemma3")


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has a ChatML chat template with a system role."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_chat"), chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_nosys_chat_dir(tmp_path_factory):
    """A tiny Llama whose chat template rejects the system role (system line must be folded)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_nosys"), chat_template=NO_SYSTEM_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir):
    """The tiny Llama loaded through `load_model` (shared: do not mutate it in tests)."""
    from aligned_probing.models import load_model

    return load_model(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_chat_dir):
    from aligned_probing.models import load_model

    return load_model(tiny_chat_dir)
