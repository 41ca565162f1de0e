"""Shared fixtures and markers for the falkon_convrfm test suite."""
from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch

# tests/naive.py is imported as a plain module by the test files.
sys.path.insert(0, os.path.dirname(__file__))

import falkon_convrfm  # noqa: E402
from falkon_convrfm._compat import FALKON_INSTALL_HINT  # noqa: E402

# Small problems: a couple of threads is enough and avoids oversubscription on CI runners.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

HAS_FALKON = falkon_convrfm.HAS_FALKON

requires_falkon = pytest.mark.skipif(
    not HAS_FALKON,
    reason=f"{FALKON_INSTALL_HINT} (see README.md, 'Falkon is optional and not on PyPI')",
)
requires_keops = pytest.mark.skipif(
    not falkon_convrfm.keops_available(),
    reason="pykeops is not importable (pip install pykeops; needs a C++ compiler)",
)


from falkon_convrfm._compat import make_options  # noqa: E402  (FalkonOptions or KernelOptions)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def rng():
    """A fresh, seeded numpy Generator."""
    return np.random.default_rng(12345)


@pytest.fixture
def options():
    """Factory for the right options class (see :func:`make_options`)."""
    return make_options


@pytest.fixture(scope="module")
def one_thread():
    """Tiny problems: one intra-op thread is faster than two, and much faster on a shared
    (oversubscribed) machine. Restored afterwards. Use with ``pytest.mark.usefixtures``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
