"""Every backend keeps the one interface (falkon_convrfm.ops.interface) and agrees with the naive
float64 reference of tests/naive.py: backend × base kernel × pooling window × dtype, in the style
of GPyTorch's shared kernel test cases (one set of checks, run for every implementation).

- ``test_backend_interface``: the backend's own ``matrix`` / ``mmv`` / ``memory`` on transformed
  patches, against κ by the textbook formulas.
- ``test_kernel_on_backend``: ConvMahalanobisKernel(backend=...) — K, ``compute`` into a
  non-contiguous block (the way Falkon calls it), mmv and dmmv (for backends with a direct mmv
  also with v or w None, and mmv in row chunks under a small memory budget) and the diagonal —
  against the reference on
  images (``naive.conv_kernel``; ``naive.pooled_conv_kernel`` for a pooling window).

Tolerances (max |error| / max |reference|): 1e-10 for float64, 1e-5 for float32 (float32 inputs
against the reference on the same float32 values); the diagonal of ntk, where patches coincide,
as in tests/test_kernel.py (COINCIDENT_TOL).

Triton runs float32 only, natively on CUDA or in its CPU interpreter. The interpreter flag must
be set before triton's first import (see tests/test_triton.py), so without CUDA the Triton cases
skip here and ``test_triton_cases_in_interpreter_subprocess`` (slow) runs them in a fresh process
with TRITON_INTERPRET=1. KeOps cases compile a formula per case (slow) and need pykeops.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import naive
from conftest import HAS_FALKON, make_options
from falkon_convrfm import ConvMahalanobisKernel, keops_available
from falkon_convrfm.base_kernels import BASE_KERNELS
from falkon_convrfm.memory import chunk_rows
from falkon_convrfm.ops import BACKENDS, BackendOptions
from falkon_convrfm.ops import triton as triton_module
from test_kernel import COINCIDENT_TOL

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = {"f64": torch.float64, "f32": torch.float32}
WINDOWS = (1, 3)
TRITON_RUNNABLE = triton_module.INTERPRETED or (torch.cuda.is_available() and triton_module.triton is not None)
DEVICE = "cuda" if torch.cuda.is_available() and not triton_module.INTERPRETED else "cpu"
SHAPE, Q, STRIDE, PADDING = (2, 6, 5), 3, 1, 0  # a 4×3 grid: 3×3 windows cross every edge
N1, N2 = 5, 4


def _cases():
    """(backend, kind, window, dtype id) with the marks of each backend; Triton is float32 only."""
    for backend in BACKENDS:
        marks = {
            "torch": [],
            "triton": [pytest.mark.skipif(not TRITON_RUNNABLE, reason="runs in the interpreter subprocess")],
            "keops": [pytest.mark.slow,
                      pytest.mark.skipif(not keops_available(), reason="pykeops is not importable")],
        }[backend]
        for kind in BASE_KERNELS:
            for window in WINDOWS:
                for dtype in DTYPES:
                    if backend == "triton" and dtype == "f64":
                        continue
                    yield pytest.param(backend, kind, window, dtype, marks=marks,
                                       id=f"{backend}-{kind}-w{window}-{dtype}")


CASES = list(_cases())
INTERFACE_CASES = [pytest.param(*c.values[:2], c.values[3], marks=c.marks, id=c.id.replace("-w1", ""))
                   for c in CASES if c.values[2] == 1]


def _options(**fields):
    """Kernel options that keep float32 blocks in float32 under Falkon (no_single_kernel=False)."""
    return make_options(no_single_kernel=False, **fields) if HAS_FALKON else make_options(**fields)


# ---------------------------------------------------------------------------------------------- interface
def _patch_reference(T1, T2, kind, sigma, weights) -> np.ndarray:
    """K_ij = Σ_p ω_p κ(T1[p, i], T2[p, j]) by naive.patch_kernel (identity metric), float64."""
    T1, T2, w = (np.asarray(t.detach().cpu().double()) for t in (T1, T2, weights))
    eye = np.eye(T1.shape[2])
    K = np.zeros((T1.shape[1], T2.shape[1]))
    for p in range(T1.shape[0]):
        for i in range(T1.shape[1]):
            for j in range(T2.shape[1]):
                K[i, j] += w[p] * naive.patch_kernel(T1[p, i], T2[p, j], eye, kind, sigma)
    return K


@pytest.mark.parametrize("backend, kind, dtype", INTERFACE_CASES)
def test_backend_interface(backend, kind, dtype, rng):
    """``matrix`` (into ``out`` too), ``mmv`` (or None: Falkon's blocked products) and ``memory``
    of one signature, on transformed patches."""
    impl, dtype, base = BACKENDS[backend], DTYPES[dtype], BASE_KERNELS[kind]
    assert impl.name == backend
    P, n, m, r, t = 6, 7, 5, 4, 3
    T1 = torch.from_numpy(rng.standard_normal((P, n, r))).to(DEVICE, dtype)
    T2 = torch.from_numpy(rng.standard_normal((P, m, r))).to(DEVICE, dtype)
    w = torch.from_numpy(naive.random_weights(P, rng)).to(DEVICE, dtype)
    v = torch.from_numpy(rng.standard_normal((m, t))).to(DEVICE, dtype)
    options, sigma = BackendOptions(), 2.0
    ref = _patch_reference(T1, T2, kind, sigma, w)
    K = impl.matrix(T1, T2, base, sigma, w, options)
    assert K.shape == (n, m) and K.dtype == dtype
    assert naive.relative_error(K.cpu(), ref) <= TOL[dtype]
    out = torch.empty(n, m, dtype=dtype, device=DEVICE)
    assert impl.matrix(T1, T2, base, sigma, w, options, out=out) is out
    assert naive.relative_error(out.cpu(), ref) <= TOL[dtype]
    if impl.mmv is not None:
        Kv = impl.mmv(T1, T2, v, base, sigma, w, options)
        assert Kv.shape == (n, t) and Kv.dtype == dtype
        assert naive.relative_error(Kv.cpu(), ref @ v.cpu().double().numpy()) <= TOL[dtype]
    for outputs in (0, t):
        memory = impl.memory(P, r, outputs)
        assert set(memory) == {"n", "m", "0"} and all(value >= 0 for value in memory.values())
        assert memory["n"] >= P * r  # at least the patches (or their padded copies) per row


def test_precision_is_checked_once_in_the_options():
    with pytest.raises(ValueError, match="precision must be one of"):
        BackendOptions(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        ConvMahalanobisKernel(None, SHAPE, Q, precision="fp16")


# ---------------------------------------------------------------------------------------------- kernel
def _reference(X1, X2, kind, sigma, M, weights, window) -> np.ndarray:
    if window == 1:
        return naive.conv_kernel(X1, X2, SHAPE, Q, STRIDE, PADDING, kind, sigma, M, weights)
    return naive.pooled_conv_kernel(X1, X2, SHAPE, Q, STRIDE, PADDING, window, kind, sigma, M, weights)


@pytest.mark.parametrize("backend, kind, window, dtype", CASES)
def test_kernel_on_backend(backend, kind, window, dtype, rng):
    dtype = DTYPES[dtype]
    tol = TOL[dtype]
    d, P = SHAPE[0] * Q * Q, naive.num_locations(SHAPE, Q, STRIDE, PADDING)
    M, weights = naive.random_psd(d, rank=d - 6, rng=rng), naive.random_weights(P, rng=rng)
    sigma = 2.0 * np.sqrt(d)
    k = ConvMahalanobisKernel(M, SHAPE, Q, STRIDE, PADDING, kind, sigma, weights, opt=_options(), backend=backend,
                              pool_window=window)
    A = torch.from_numpy(rng.standard_normal((N1, int(np.prod(SHAPE))))).to(DEVICE, dtype)
    B = torch.from_numpy(rng.standard_normal((N2, int(np.prod(SHAPE))))).to(DEVICE, dtype)
    v = torch.from_numpy(rng.standard_normal((N2, 2))).to(DEVICE, dtype)
    u = torch.from_numpy(rng.standard_normal((N1, 2))).to(DEVICE, dtype)
    X1, X2, v64, u64 = (np.asarray(x.cpu().double()) for x in (A, B, v, u))
    ref = _reference(X1, X2, kind, sigma, M, k.weights, window)
    assert k.backend_for(A).name == backend

    assert naive.relative_error(k(A, B).cpu(), ref) <= tol
    out = torch.full((N1 + 2, N2 + 3), torch.nan, dtype=dtype, device=DEVICE)
    k.compute(A, B, out[1:-1, 2:-1], diag=False)  # a non-contiguous block, the way Falkon passes it
    assert naive.relative_error(out[1:-1, 2:-1].cpu(), ref) <= tol
    assert naive.relative_error(k.mmv(A, B, v).cpu(), ref @ v64) <= tol
    assert naive.relative_error(k.dmmv(A, B, v, u).cpu(), ref.T @ (ref @ v64 + u64)) <= tol
    diag_ref = [_reference(X1[i : i + 1], X1[i : i + 1], kind, sigma, M, k.weights, window)[0, 0] for i in range(N1)]
    assert naive.relative_error(k(A, A, diag=True).cpu(), np.array(diag_ref)) <= COINCIDENT_TOL[(kind, dtype)]

    impl = BACKENDS[backend]
    if impl.mmv is not None:  # (Falkon's own blocked dmmv cannot take v = None)
        assert naive.relative_error(k.dmmv(A, B, None, u).cpu(), ref.T @ u64) <= tol
        assert naive.relative_error(k.dmmv(A, B, v, None).cpu(), ref.T @ (ref @ v64)) <= tol
        # a budget for two rows' temporaries: the direct mmv runs in row chunks
        memory = impl.memory(P, k.factor.shape[1], v.shape[1])
        itemsize = A.element_size()
        budget = float((memory["m"] * N2 + memory["0"] + 2 * memory["n"]) * itemsize)
        assert chunk_rows(budget, memory, N1, N2, itemsize) == 2
        opt = _options(max_cpu_mem=budget, max_gpu_mem=budget)
        assert naive.relative_error(k.mmv(A, B, v, opt=opt).cpu(), ref @ v64) <= tol


def test_keops_active_force_and_no_pick_the_backend(monkeypatch):
    """``keops_active='force'`` sends products to KeOps' ``mmv``, ``'no'`` keeps them off it."""
    calls = []
    keops = BACKENDS["keops"]
    spy = dataclasses.replace(keops, mmv=lambda *a, **kw: calls.append(1) or keops.mmv(*a, **kw))
    monkeypatch.setitem(BACKENDS, "keops", spy)
    monkeypatch.setattr("falkon_convrfm.ops.backends.keops_importable", lambda: True)
    k = ConvMahalanobisKernel(None, SHAPE, Q)
    X = torch.zeros(2, int(np.prod(SHAPE)), dtype=torch.float64)
    assert k.backend_for(X, make_options(keops_active="force")) is spy
    assert k.backend_for(X, make_options(keops_active="no")).name == "torch"
    if keops_available():
        k.mmv(X, X, torch.ones(2, 1, dtype=torch.float64), opt=make_options(keops_active="force"))
        assert calls == [1]


# ---------------------------------------------------------------------------------------------- Triton
@pytest.mark.slow
@pytest.mark.skipif(TRITON_RUNNABLE or triton_module.triton is None,
                    reason="the Triton cases run in this process (or Triton is not installed)")
def test_triton_cases_in_interpreter_subprocess():
    """No CUDA here and triton was imported without the interpreter flag: run the Triton cases of
    this file in a fresh process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "triton",
           os.path.abspath(__file__)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    summary = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
    assert res.returncode == 0, f"interpreter run failed: {summary}\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    expected = sum(1 for c in CASES if c.values[0] == "triton") + sum(1 for c in INTERFACE_CASES
                                                                       if c.values[0] == "triton")
    assert f"{expected} passed" in summary, summary
