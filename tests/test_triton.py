"""The fused Triton backend (falkon_convrfm.ops.triton) against float64 references.

Tolerance: 1e-5 relative (max |error| / max |reference|) in float32, the reference evaluated in
float64 — from the images by tests/naive.py (explicit patch loops, κ in the metric M) or from the
transformed patches by the direct formulas below.

Where the tests run: natively on a CUDA device, or in Triton's CPU interpreter. The interpreter
flag (TRITON_INTERPRET=1) must be set before triton's first import — Triton fixes the mode of
every @triton.jit function, its own tl.zeros included, when it is decorated — and the conftest's
``import falkon_convrfm`` has already imported triton by the time this module loads. So in a
process without CUDA and without the flag, ``test_in_interpreter_subprocess`` re-runs this file
in a subprocess with TRITON_INTERPRET=1 and the other tests skip here; the flag never reaches
other test modules. (``TRITON_INTERPRET=1 pytest tests/test_triton.py`` runs them directly.)
The input checks, the memory formula and the autotune plumbing need no kernel launch and run
everywhere; without a GPU the compiled path is still compiled for sm_90 (Triton ships ptxas),
which type-checks it — the interpreter does not — and checks that it does not spill registers.
ConvMahalanobisKernel(backend="triton") (blocks, products, pooling windows) is checked with the
other backends in tests/test_backend_conformance.py.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import naive  # noqa: E402
from falkon_convrfm.base_kernels import BASE_KERNELS  # noqa: E402
from falkon_convrfm.ops import PRECISIONS, BackendOptions  # noqa: E402
from falkon_convrfm.ops import triton as backend  # noqa: E402
from falkon_convrfm.ops.triton import (  # noqa: E402
    triton_available,
    triton_conv_matrix,
    triton_conv_mmv,
    triton_memory,
)

KINDS = tuple(BASE_KERNELS)
TOL = 1e-5
# Blocks where u = v at some locations: ntk's angle θ = acos(c) at c = 1 − O(eps) is O(√eps), so
# float32 gives ~1e-4 there (as on the torch backend, tests/test_kernel.py COINCIDENT_TOL).
COINCIDENT_TOL = {"laplace": TOL, "gaussian": TOL, "ntk": 2e-4}
RUNNABLE = backend.INTERPRETED or torch.cuda.is_available()
DEVICE = "cpu" if backend.INTERPRETED or not torch.cuda.is_available() else "cuda"
runs_kernels = pytest.mark.skipif(not RUNNABLE, reason="runs in test_in_interpreter_subprocess (TRITON_INTERPRET=1)")
SIGMA = 3.0

# (image shape (c, H, W), q, stride, padding, metric rank r): stride/padding variants, a
# rank-deficient metric (r < d) and a rank above 16 that pads to 32. n = 37, m = 21 rows are
# not multiples of the interpreter's 32 × 16 tile (nor of the GPU tiles).
GEOMETRIES = [
    ((3, 7, 6), 3, 1, 1, 5),
    ((2, 8, 9), 3, 2, 0, 18),
    ((1, 9, 9), 5, 2, 2, 25),
]
N1, N2 = 37, 21


def _factor(M: np.ndarray, rank: int) -> np.ndarray:
    """L (d, rank) with L Lᵀ = M, from the top eigenpairs."""
    vals, vecs = np.linalg.eigh(M)
    return vecs[:, -rank:] * np.sqrt(np.clip(vals[-rank:], 0, None))


def _patches(X: np.ndarray, shape, q, stride, padding, L: np.ndarray) -> torch.Tensor:
    """(P, n, r) float64: Lᵀx_p for every row and location, via unfold."""
    unfolded = F.unfold(torch.from_numpy(X).reshape(-1, *shape), q, padding=padding, stride=stride)  # (n, d, P)
    return torch.einsum("ndp,dr->pnr", unfolded, torch.from_numpy(L))


def reference(T1: torch.Tensor, T2: torch.Tensor, kind: str, sigma: float, weights: torch.Tensor) -> torch.Tensor:
    """K (n, m) in float64 by the direct formulas, one location at a time."""
    T1, T2, weights = T1.double().cpu(), T2.double().cpu(), weights.double().cpu()
    K = torch.zeros(T1.shape[1], T2.shape[1], dtype=torch.float64)
    for p in range(T1.shape[0]):
        u, v = T1[p], T2[p]
        if kind == "ntk":
            a, b = u.norm(dim=1)[:, None], v.norm(dim=1)[None, :]
            ab = a * b
            c = torch.where(ab > 0, (u @ v.T) / torch.where(ab > 0, ab, 1.0), 0.0).clamp(-1, 1)
            theta = torch.acos(c)
            kappa = (u @ v.T) * (math.pi - theta) / math.pi + ab * (torch.sin(theta) + (math.pi - theta) * c) / math.pi
        else:
            dist = torch.cdist(u, v)
            kappa = torch.exp(-dist / sigma) if kind == "laplace" else torch.exp(-dist**2 / (2 * sigma**2))
        K += weights[p] * kappa
    return K


def _random_weights(P: int, rng) -> torch.Tensor:
    return torch.from_numpy(naive.random_weights(P, rng)).float().to(DEVICE)


# ---------------------------------------------------------------------------------------------- in-process
@pytest.mark.slow
@pytest.mark.skipif(RUNNABLE, reason="the kernel tests run in this process")
def test_in_interpreter_subprocess():
    """No CUDA here and triton was imported without the interpreter flag: run this file again
    in a fresh interpreter-mode process (see the module docstring)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    summary = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
    assert res.returncode == 0, f"interpreter run failed: {summary}\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    assert " passed" in summary and "skipped" in summary, summary  # only this test skips there


def test_available_says_why():
    ok, reason = triton_available()
    assert ok == RUNNABLE and "triton" in reason
    if not ok:
        assert "CUDA" in reason


def test_padded_rank_and_memory():
    ranks = (1, 5, 16, 27, 32, 33, 64, 65, 130)
    assert [backend.padded_rank(r) for r in ranks] == [16, 16, 16, 32, 32, 64, 64, 96, 160]
    mem = triton_memory(900, 27, 10)
    assert mem["n"] == 900 * 33 + 10 and mem["m"] == 900 * 33
    assert mem["0"] >= 900 * 33 and set(mem) == {"n", "m", "0"}
    assert triton_memory(900, 27)["n"] == 900 * 33  # compute: no v columns


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(T1=torch.ones(2, 3, 4, dtype=torch.float64)), TypeError, "float32 only"),
        (dict(weights=torch.ones(3)), ValueError, "weights must have shape"),
        (dict(T2=torch.ones(2, 3, 5)), ValueError, r"\(P, n, r\)"),
        (dict(T1=torch.ones(0, 3, 4), T2=torch.ones(0, 3, 4), weights=torch.ones(0)), ValueError, "P ≥ 1"),
        (dict(base=object()), TypeError, "triton_map"),
    ],
    ids=["float64", "weights", "rank", "no-locations", "base"],
)
def test_bad_input_is_refused(change, error, match):
    """(A bad precision is refused by BackendOptions: tests/test_backend_conformance.py.)"""
    args = dict(T1=torch.ones(2, 3, 4), T2=torch.ones(2, 5, 4), base=BASE_KERNELS["laplace"], sigma=1.0,
                weights=torch.ones(2) / 2)
    args.update(change)
    with pytest.raises(error, match=match):
        triton_conv_matrix(**args)
    with pytest.raises(error, match=match):
        triton_conv_mmv(v=torch.ones(args["T2"].shape[1], 2), **args)


def test_bad_v_and_out_are_refused():
    T1, T2, w, base = torch.ones(2, 3, 4), torch.ones(2, 5, 4), torch.ones(2) / 2, BASE_KERNELS["gaussian"]
    with pytest.raises(ValueError, match=r"v must be \(5, t\)"):
        triton_conv_mmv(T1, T2, torch.ones(4, 2), base, 1.0, w)
    with pytest.raises(TypeError, match="v must be a float32"):
        triton_conv_mmv(T1, T2, torch.ones(5, 2, dtype=torch.float64), base, 1.0, w)
    with pytest.raises(ValueError, match="out must be a float32"):
        triton_conv_matrix(T1, T2, base, 1.0, w, out=torch.empty(3, 4))


def test_large_problems_are_tuned_once_on_a_slice(monkeypatch):
    """Compiled mode (simulated: the launcher is recorded, nothing runs): a problem larger than
    the tuning problem is first launched on a slice of it with the same autotune keys (so the
    autotuner tunes there), once per size class; then in full."""
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                n, m, P, t = args[7:11]
                calls.append(((n, m, P, t), args[-3:], grid({"BM": 64, "BN": 64}), tuple(args[6].shape)))
            return launch

    monkeypatch.setattr(backend, "INTERPRETED", False)
    monkeypatch.setattr(backend, "_launcher", lambda mmv: Recorder())
    monkeypatch.setattr(backend, "_TUNED", set())
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    P, n, m = 900, 5000, 100
    A, B, NA, NB, W = torch.zeros(P, n, 32), torch.zeros(P, m, 32), torch.zeros(P, n), torch.zeros(P, m), torch.zeros(P)
    out = torch.zeros(n, m)
    args = (False, A, B, NA, NB, W, out, out, (n, m, P, 0), (m, 1), 1.0, BASE_KERNELS["laplace"].triton_map, 32, "ieee")
    backend._launch(*args)
    keys = (backend.TUNE_ROWS, 128, backend.TUNE_LOCATIONS)
    assert calls == [((backend.TUNE_ROWS, m, backend.TUNE_LOCATIONS, 0), keys, (64, 2), (backend.TUNE_ROWS, m)),
                     ((n, m, P, 0), keys, (79, 2), (n, m))]
    backend._launch(*args)  # tuned: one launch
    assert len(calls) == 3 and calls[-1] == calls[1]
    backend._launch(*args[:8], (300, m, 20, 0), *args[9:])  # within the tuning problem: tuned on the call

    assert len(calls) == 4 and calls[-1][0] == (300, m, 20, 0)


def test_autotune_tries_the_tiles_screened_for_the_precision():
    configs = backend._configs()
    for precision in PRECISIONS:
        chosen = {(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages)
                  for c in backend._configs_for(configs, {}, PRECISION=precision)}
        assert chosen == set(backend._TILES["ieee" if precision == "ieee" else "tensor cores"])


def _sm90_resources(kind, mmv, precision, tile):
    """(registers, spill bytes) of the kernel compiled for sm_90 (no GPU needed: Triton ships ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, warps, stages = tile
    pointers = {"A", "B", "NA", "NB", "W", "V", "OUT"}
    signature = {a: "*fp32" if a in pointers else "fp32" if a == "param" else "i32" for a in backend._kernel.arg_names}
    const = dict(MAP=BASE_KERNELS[kind].triton_map, MMV=mmv, R=32, BK=32, BT=backend.VALUES,
                 LB=backend.LOCATION_BLOCK, PRECISION=precision, BM=bm, BN=bn)
    signature.update({k: "constexpr" for k in const})
    options = dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True)  # as _launch compiles it
    compiled = triton.compile(ASTSource(backend._kernel, signature, constexprs=const),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(found.group(1)), int(found.group(2))


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@pytest.mark.skipif(backend.INTERPRETED or not os.path.exists(CUOBJDUMP),
                    reason="needs compiled mode and Triton's CUDA tools")
@pytest.mark.parametrize("kind", KINDS)
def test_compiles_for_sm90_without_spills(kind):
    """The compiled (GPU) path type-checks — the interpreter does not — in both modes, with exact
    and tensor-core inner products; laplace and gaussian fit in registers (a spilling tile runs
    up to 30× slower). One tile per precision kind, to keep this fast."""
    for precision, mmv in (("ieee", False), ("ieee", True), ("tf32x3", True)):
        tile = backend._TILES["ieee" if precision == "ieee" else "tensor cores"][0]
        registers, spilled = _sm90_resources(kind, mmv, precision, tile)
        assert registers <= 255
        if kind != "ntk":  # its map (arccos polynomial) spills a few bytes
            assert spilled == 0, (precision, mmv, tile, registers, spilled)


@pytest.mark.skipif(RUNNABLE, reason="CPU tensors are accepted in the interpreter")
def test_cpu_tensors_need_the_interpreter():
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_conv_matrix(torch.ones(2, 3, 4), torch.ones(2, 5, 4), BASE_KERNELS["laplace"], 1.0, torch.ones(2) / 2)


# ---------------------------------------------------------------------------------------------- kernels
@runs_kernels
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"c{g[0][0]}-q{g[1]}-s{g[2]}-p{g[3]}-r{g[4]}")
@pytest.mark.parametrize("kind", KINDS)
def test_matrix_and_mmv_match_naive(kind, geometry, rng):
    """K and K v from images: patches by unfold and a random rank-r factor L of M, the
    reference by tests/naive.py on the images with M = L Lᵀ and random ω."""
    shape, q, stride, padding, rank = geometry
    d = shape[0] * q * q
    L = _factor(naive.random_psd(d, rank=rank, rng=rng), rank)
    X1 = rng.standard_normal((N1, int(np.prod(shape))))
    X2 = rng.standard_normal((N2, int(np.prod(shape))))
    T1 = _patches(X1, shape, q, stride, padding, L).float().to(DEVICE)
    T2 = _patches(X2, shape, q, stride, padding, L).float().to(DEVICE)
    w = _random_weights(T1.shape[0], rng)
    K_ref = naive.conv_kernel(X1, X2, shape, q, stride, padding, kind, SIGMA, L @ L.T, w.cpu())
    K = triton_conv_matrix(T1, T2, BASE_KERNELS[kind], SIGMA, w)
    assert K.shape == (N1, N2) and K.dtype == torch.float32
    assert naive.relative_error(K.cpu(), K_ref) <= TOL
    v = torch.randn(N2, 3, device=DEVICE)
    Kv = triton_conv_mmv(T1, T2, v, BASE_KERNELS[kind], SIGMA, w)
    assert naive.relative_error(Kv.cpu(), K_ref @ v.cpu().double().numpy()) <= TOL


@runs_kernels
@pytest.mark.parametrize("kind", KINDS)
def test_symmetric_block_and_strided_inputs(kind, rng):
    """K(T, T) with T1 is T2 (shared operands), strided T and v, a non-contiguous ``out``
    (transposed view inside a larger buffer: nothing around it is touched)."""
    P, n, r = 6, 19, 7
    T = torch.randn(n, P, r + 3, device=DEVICE)[:, :, :r].transpose(0, 1)  # (P, n, r), strided
    assert not T.is_contiguous()
    w = _random_weights(P, rng)
    K_ref = reference(T, T, kind, SIGMA, w)
    big = torch.full((n + 3, n + 2), -7.0, device=DEVICE)
    out = big[1 : n + 1, 2:].T  # transposed, non-contiguous
    assert triton_conv_matrix(T, T, BASE_KERNELS[kind], SIGMA, w, out=out) is out
    assert naive.relative_error(out.cpu(), K_ref) <= COINCIDENT_TOL[kind]
    outside = big.clone()
    outside[1 : n + 1, 2:] = -7.0
    assert (outside == -7.0).all()
    v = torch.randn(5, n, device=DEVICE).T  # (n, 5), strided
    res = triton_conv_mmv(T, T, v, BASE_KERNELS[kind], SIGMA, w)
    assert naive.relative_error(res.cpu(), K_ref @ v.cpu().double()) <= COINCIDENT_TOL[kind]


@runs_kernels
@pytest.mark.parametrize("same_object", [True, False], ids=["T1-is-T2", "copy"])
def test_identical_patches_give_exactly_one(same_object):
    """laplace on identical patches: κ = 1 exactly (rounding floor), even with a large common
    offset (centring), so with ω = 1/16 (exact in float32) the diagonal is exactly 1."""
    P, n, r = 16, 20, 27
    T1 = torch.randn(P, n, r, device=DEVICE) + 50.0
    T2 = T1 if same_object else T1.clone()
    w = torch.full((P,), 1.0 / P, device=DEVICE)
    K = triton_conv_matrix(T1, T2, BASE_KERNELS["laplace"], 2.0, w)
    assert (K.diagonal() == 1.0).all(), K.diagonal()
    assert naive.relative_error(K.cpu(), reference(T1, T2, "laplace", 2.0, w)) <= TOL


@runs_kernels
@pytest.mark.parametrize("precision", PRECISIONS)
def test_precisions(precision, rng):
    """Every precision runs; ieee and tf32x3 meet the float32 tolerance, tf32 a coarse one
    (the interpreter computes every mode in exact float32)."""
    P, n, m, r = 5, 33, 18, 12
    T1, T2 = torch.randn(P, n, r, device=DEVICE), torch.randn(P, m, r, device=DEVICE)
    w = _random_weights(P, rng)
    tol = 3e-3 if precision == "tf32" else TOL
    K_ref = reference(T1, T2, "gaussian", SIGMA, w)
    K = triton_conv_matrix(T1, T2, BASE_KERNELS["gaussian"], SIGMA, w, BackendOptions(precision))
    assert naive.relative_error(K.cpu(), K_ref) <= tol
    v = torch.randn(m, 2, device=DEVICE)
    Kv = triton_conv_mmv(T1, T2, v, BASE_KERNELS["gaussian"], SIGMA, w, BackendOptions(precision))
    assert naive.relative_error(Kv.cpu(), K_ref @ v.cpu().double()) <= tol


@runs_kernels
def test_large_rank_and_many_columns(rng):
    """r = 70 pads to R = 96 (three inner-product chunks of 32); t = 70 columns of v take five
    products of 16 columns."""
    P, n, m, r, t = 3, 21, 18, 70, 70
    T1, T2 = torch.randn(P, n, r, device=DEVICE) / 4, torch.randn(P, m, r, device=DEVICE) / 4
    w = _random_weights(P, rng)
    K_ref = reference(T1, T2, "laplace", SIGMA, w)
    assert naive.relative_error(triton_conv_matrix(T1, T2, BASE_KERNELS["laplace"], SIGMA, w).cpu(), K_ref) <= TOL
    v = torch.randn(m, t, device=DEVICE)
    Kv = triton_conv_mmv(T1, T2, v, BASE_KERNELS["laplace"], SIGMA, w)
    assert naive.relative_error(Kv.cpu(), K_ref @ v.cpu().double()) <= TOL


@runs_kernels
def test_degenerate_sizes(rng):
    """One row, one centre; empty blocks and t = 0 return without a launch; zero patches for ntk."""
    base = BASE_KERNELS["ntk"]
    T1, T2 = torch.randn(2, 1, 4, device=DEVICE), torch.randn(2, 1, 4, device=DEVICE)
    T1[0] = 0.0  # κ_ntk = 0 at a zero patch
    w = torch.tensor([0.25, 0.75], device=DEVICE)
    assert naive.relative_error(triton_conv_matrix(T1, T2, base, 1.0, w).cpu(), reference(T1, T2, "ntk", 1.0, w)) <= TOL
    assert triton_conv_matrix(T1, T2[:, :0], base, 1.0, w).shape == (1, 0)
    assert triton_conv_mmv(T1, T2, torch.ones(1, 0, device=DEVICE), base, 1.0, w).shape == (1, 0)
    assert (triton_conv_mmv(T1[:, :0], T2, torch.ones(1, 2, device=DEVICE), base, 1.0, w)).shape == (0, 2)
