"""Local pooling windows: kernel, products and AGOP against explicit-loop references.

Reference: K(x, z) = Σ_p Σ_{δ, p+δ on the grid} ω_{p,p+δ} κ(x_p, z_{p+δ}), ω_{pq} = (ω_p + ω_q)/2,
with patches cut out by ``naive.extract_patches`` and κ from ``naive.patch_kernel`` (loops only).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import naive
from falkon_convrfm import ConvMahalanobisKernel, patch_agop, patch_gradients
from test_agop import _factor, _kappa, reference_agop, rel_err
from test_kernel import COINCIDENT_TOL

BASE_KERNELS = ("laplace", "gaussian", "ntk")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


CASES = [  # (image_shape, q, stride, padding, window)
    ((2, 6, 5), 3, 1, 0, 3),   # grid 4×3: windows cross every edge
    ((1, 7, 7), 3, 2, 1, 3),   # stride 2, padding
    ((3, 5, 6), 2, 1, 1, 5),   # window wider than half the grid
    ((1, 6, 6), 3, 1, 1, 1),   # w = 1 is the aligned kernel
    ((1, 4, 4), 3, 1, 0, 5),   # 2×2 grid: every pair, global pooling
]


def _problem(case, kind, rng, n=5, m=4):
    shape, q, stride, padding, window = case
    d, P = shape[0] * q * q, naive.num_locations(shape, q, stride, padding)
    M = naive.random_psd(d, rank=max(1, d - 3), rng=rng)
    w = naive.random_weights(P, rng=rng)
    X1 = rng.standard_normal((n, int(np.prod(shape))))
    X2 = rng.standard_normal((m, int(np.prod(shape))))
    sigma = 2.0 * np.sqrt(d)
    k = ConvMahalanobisKernel(M, shape, q, stride, padding, kind, sigma, w, pool_window=window)
    ref = naive.pooled_conv_kernel(X1, X2, shape, q, stride, padding, window, kind, sigma, M, w)
    return k, X1, X2, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", BASE_KERNELS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-q{c[1]}s{c[2]}p{c[3]}-w{c[4]}" for c in CASES])
def test_pooled_kernel_matches_loops(case, kind, dtype, rng):
    k, X1, X2, ref = _problem(case, kind, rng)
    A, B = torch.from_numpy(X1).to(dtype), torch.from_numpy(X2).to(dtype)
    v = torch.from_numpy(rng.standard_normal((B.shape[0], 2))).to(dtype)
    w = torch.from_numpy(rng.standard_normal((A.shape[0], 2))).to(dtype)
    tol = TOL[dtype]
    assert naive.relative_error(k(A, B), ref) <= tol
    assert naive.relative_error(k.mmv(A, B, v), ref @ v.double().numpy()) <= tol
    expected = ref.T @ (ref @ v.double().numpy() + w.double().numpy())
    assert naive.relative_error(k.dmmv(A, B, v, w), expected) <= tol
    out = torch.full((A.shape[0] + 2, B.shape[0] + 3), torch.nan, dtype=dtype)
    k.compute(A, B, out[1:-1, 2:-1], diag=False)  # a non-contiguous block, the way Falkon passes it
    assert naive.relative_error(out[1:-1, 2:-1], ref) <= tol
    K_self = naive.pooled_conv_kernel(X1, X1, *case[:4], case[4], kind, k.sigma, k.metric.numpy(), k.weights.numpy())
    # coincident patches (δ = 0 on the diagonal): the NTK's arccos near 1 costs digits, as in test_kernel
    assert naive.relative_error(k(A, A, diag=True), np.diag(K_self)) <= COINCIDENT_TOL[(kind, dtype)]
    assert naive.relative_error(k(B, A), ref.T) <= tol, "pooled K must be symmetric"


@pytest.mark.parametrize("kind", BASE_KERNELS)
@pytest.mark.parametrize("window", [1, 3, pytest.param(5, marks=pytest.mark.slow)])  # w = 5: 25 autograd offsets
def test_pooled_agop_matches_autograd(kind, window, rng):
    shape, q, stride, padding = (2, 6, 5), 3, 1, 1
    k, X1, X2, _ = _problem((shape, q, stride, padding, window), kind, rng, n=4, m=3)
    X, Z = torch.from_numpy(X1), torch.from_numpy(X2)
    alpha = torch.from_numpy(rng.standard_normal((3, 2)))
    geo, L = k.geometry, _factor(k.metric.numpy())
    Xp = geo.patches(X).detach().clone().requires_grad_(True)
    Ux, Vz = Xp @ L, geo.patches(Z) @ L
    K = X.new_zeros(4, 3)
    for src, dst, w in k.location_pairs(X):
        K = K + torch.einsum("nmp,p->nm", _kappa(Ux[:, src], Vz[:, dst], kind, k.sigma), w)
    f = K @ alpha
    grads = torch.stack([torch.autograd.grad(f[:, o].sum(), Xp, retain_graph=True)[0] for o in range(2)], dim=2)
    assert rel_err(patch_gradients(k, Z, alpha, X), grads) <= 1e-8
    G, share = patch_agop(k, Z, alpha, X, max_mem=20_000)  # many row and location chunks
    G_ref, share_ref = reference_agop(grads)
    assert rel_err(G, G_ref) <= 1e-8 and rel_err(share, share_ref) <= 1e-8


def test_window_one_is_the_aligned_kernel(rng):
    X = torch.from_numpy(rng.standard_normal((4, 75)))
    k1 = ConvMahalanobisKernel(None, (3, 5, 5), 3, pool_window=1, weights=naive.random_weights(9, rng=rng))
    k0 = ConvMahalanobisKernel(None, (3, 5, 5), 3, weights=k1.weights)
    assert torch.equal(k1(X, X), k0(X, X))


@pytest.mark.parametrize("bad", [0, 2, -3, 1.5, True])
def test_bad_windows(bad):
    with pytest.raises(ValueError, match="pool_window"):
        ConvMahalanobisKernel(None, (1, 6, 6), 3, pool_window=bad)
