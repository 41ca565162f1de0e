"""Backend choice: nothing can crash the process, and ``auto`` picks what can run."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from falkon_convrfm import ConvMahalanobisKernel
from falkon_convrfm.ops import backends

SEGFAULT = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]


@pytest.fixture
def fresh_probe(monkeypatch, tmp_path):
    """A private probe cache, warnings not yet given, pykeops 'importable' and Triton absent."""
    monkeypatch.setenv("FALKON_CONVRFM_CACHE", str(tmp_path))
    backends.keops_health.cache_clear()
    monkeypatch.setattr(backends, "keops_importable", lambda: True)
    monkeypatch.setattr(backends, "triton_status", lambda: (False, "no triton (test)"))
    calls = []
    real_run = subprocess.run

    def counting_run(cmd, *a, **kw):
        calls.append(cmd)
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(backends.subprocess, "run", counting_run)
    yield calls
    backends.keops_health.cache_clear()


def test_crashing_keops_probe_leaves_process_alive_and_auto_picks_torch(fresh_probe, monkeypatch):
    monkeypatch.setattr(backends, "keops_probe_command", lambda device_type: SEGFAULT)
    with pytest.warns(RuntimeWarning, match="killed by SIGSEGV"):
        assert backends.choose_backend("auto", "cuda", torch.float32) == "torch"
    assert len(fresh_probe) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per process
        assert backends.choose_backend("auto", "cuda", torch.float32) == "torch"
    assert len(fresh_probe) == 1, "the probe result is cached, not rerun"
    assert "SIGSEGV" in backends._cache_file().read_text()


def test_passing_probe_lets_auto_pick_keops_on_cuda_only(fresh_probe, monkeypatch):
    monkeypatch.setattr(backends, "keops_probe_command", lambda device_type: [sys.executable, "-c", "pass"])
    assert backends.choose_backend("auto", "cuda", torch.float32) == "keops"
    assert backends.choose_backend("auto", "cpu", torch.float32) == "torch"
    assert backends.choose_backend("auto", "cuda", torch.float32, keops_active="no") == "torch"


def test_force_skips_the_probe(fresh_probe, monkeypatch):
    monkeypatch.setattr(backends, "keops_probe_command", lambda device_type: SEGFAULT)
    assert backends.choose_backend("auto", "cuda", torch.float32, keops_active="force") == "keops"
    assert backends.choose_backend("keops", "cpu", torch.float64) == "keops"
    assert fresh_probe == []


def test_triton_is_the_cuda_default_for_float32(monkeypatch):
    monkeypatch.setattr(backends, "triton_status", lambda: (True, "triton (test)"))
    assert backends.choose_backend("auto", "cuda", torch.float32) == "triton"
    assert backends.choose_backend("auto", "cpu", torch.float32) == "torch"
    monkeypatch.setattr(backends, "keops_health", lambda device_type: (False, "test"))
    assert backends.choose_backend("auto", "cuda", torch.float64) == "torch"
    with pytest.warns(RuntimeWarning, match="float32 only"):
        assert backends.choose_backend("triton", "cuda", torch.float64) == "torch"


def test_bad_backend_names_and_unavailable_triton(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.choose_backend("cuda", "cpu", torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        ConvMahalanobisKernel(None, (1, 6, 6), 3, backend="fast")
    with pytest.raises(ValueError, match="precision must be one of"):
        ConvMahalanobisKernel(None, (1, 6, 6), 3, precision="bf16")
    monkeypatch.setattr(backends, "triton_status", lambda: (False, "triton is not importable (test)"))
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: triton is not importable"):
        backends.choose_backend("triton", "cpu", torch.float32)


def test_report_names_every_device():
    lines = backends.backend_report()
    assert lines[0].startswith("cpu: torch")
    assert any(line.startswith("cuda") for line in lines)
