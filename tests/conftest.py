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


@pytest.fixture
def failing_writes(monkeypatch):
    """``fail(error, room=100)``: from then on, every file written through
    :func:`falkon_convrfm.persistence.atomic_file` raises ``error`` once ``room`` bytes are written
    (``OSError(errno.ENOSPC, ...)``: a full disk; ``KeyboardInterrupt()``: Ctrl-C in a write)."""
    import builtins

    import falkon_convrfm.persistence as persistence

    def fail(error: BaseException, room: int = 100):
        class Full:
            def __init__(self, real):
                self.real, self.written = real, 0

            def write(self, data):
                self.written += len(data)
                if self.written > room:
                    raise error
                return self.real.write(data)

            def __getattr__(self, name):
                return getattr(self.real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.real.close()

        monkeypatch.setattr(persistence, "open", lambda *a, **k: Full(builtins.open(*a, **k)), raising=False)

    return fail


@pytest.fixture
def read_only():
    """``read_only(folder)``: the folder made read-only (writable again after the test);
    pytest.skip where that does not stop writes (running as root)."""
    folders = []

    def make(path):
        path.chmod(0o500)
        folders.append(path)
        try:
            (path / "probe").write_text("")
        except PermissionError:
            return path
        (path / "probe").unlink()
        pytest.skip("a read-only folder is still writable here (running as root)")

    yield make
    for path in folders:
        path.chmod(0o700)
