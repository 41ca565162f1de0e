"""A new base kernel is one object: a toy kernel defined here only runs through the kernel class,
the tiled torch backend and the closed-form AGOP, checked against explicit formulas and autograd.

Toy kernel (inverse quadratic, not part of the package): κ(u, v) = 1/(1 + ‖u − v‖²/σ²),
∇_u κ = −2κ²/σ²·(u − v), so in the AGOP's form Q = 2κ²/σ², S = −Q.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import naive
from falkon_convrfm import ConvMahalanobisKernel, patch_agop, patch_gradients
from falkon_convrfm.base_kernels import BASE_KERNELS, DistanceForm, DistanceKernel
from falkon_convrfm.patches import PatchGeometry
from test_agop import reference_agop, rel_err


class InverseQuadratic(DistanceKernel):
    name = "inverse_quadratic"

    @staticmethod
    def pairs(U, V, sigma):
        return 1 / (1 + (U - V).pow(2).sum(-1) / sigma**2)

    @staticmethod
    def gemm_form(sigma):
        return DistanceForm(1.0 / sigma**2, floor=False)

    @staticmethod
    def gemm_map(E, row_aux, col_aux):
        return 1 / (1 + torch.clamp_min(E, 0))

    @staticmethod
    def gradient_q(inner, un, vn, sigma, tol):
        sqdist = torch.clamp_min(un.unsqueeze(2) + vn.unsqueeze(1) - 2 * inner, 0)
        return 2 / (sigma**2 * (1 + sqdist / sigma**2) ** 2)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(BASE_KERNELS, InverseQuadratic.name, InverseQuadratic())
    return InverseQuadratic.name


def _problem(rng, shape=(2, 7, 6), q=3, stride=1, padding=1, n=7, m=5):
    geo = PatchGeometry(shape, q, stride, padding)
    M = naive.random_psd(geo.patch_dim, rank=geo.patch_dim - 4, rng=rng)
    w = naive.random_weights(geo.num_locations, rng=rng)
    X = torch.from_numpy(rng.standard_normal((n, geo.row_length)))
    Z = torch.from_numpy(rng.standard_normal((m, geo.row_length)))
    return geo, M, w, X, Z


def _reference_K(geo, M, w, X, Z, sigma):
    """K_ij = Σ_p ω_p / (1 + (x_p − z_p)ᵀ M (x_p − z_p)/σ²), by explicit loops over patches."""
    Mt = torch.as_tensor(M)
    Px, Pz = geo.patches(X), geo.patches(Z)  # (n, P, d)
    diff = Px[:, None] - Pz[None]
    sq = torch.einsum("nmpd,de,nmpe->nmp", diff, Mt, diff)
    return (1 / (1 + sq / sigma**2)) @ torch.as_tensor(w / w.sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_toy_kernel_dense_backend(toy, rng, dtype):
    geo, M, w, X, Z = _problem(rng)
    k = ConvMahalanobisKernel(M, geo.image_shape, geo.patch_size, geo.stride, geo.padding, toy, 3.0, w)
    ref = _reference_K(geo, M, w, X, Z, 3.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(k(X.to(dtype), Z.to(dtype)), ref) <= tol
    v = torch.from_numpy(rng.standard_normal((Z.shape[0], 2)))
    assert rel_err(k.mmv(X.to(dtype), Z.to(dtype), v.to(dtype)), ref @ v) <= tol
    assert rel_err(k(X.to(dtype), X.to(dtype), diag=True), _reference_K(geo, M, w, X, X, 3.0).diagonal()) <= tol


def test_toy_kernel_agop_matches_autograd(toy, rng):
    geo, M, w, X, Z = _problem(rng, padding=0, stride=2)
    sigma = 4.0
    k = ConvMahalanobisKernel(M, geo.image_shape, geo.patch_size, geo.stride, geo.padding, toy, sigma, w)
    alpha = torch.from_numpy(rng.standard_normal((Z.shape[0], 3)))

    Xp = geo.patches(X).detach().clone().requires_grad_(True)
    diff = Xp[:, None] - geo.patches(Z)[None]
    sq = torch.einsum("nmpd,de,nmpe->nmp", diff, torch.as_tensor(M), diff)
    f = ((1 / (1 + sq / sigma**2)) @ torch.as_tensor(w / w.sum())) @ alpha
    grads = torch.stack([torch.autograd.grad(f[:, o].sum(), Xp, retain_graph=True)[0] for o in range(3)], dim=2)

    assert rel_err(patch_gradients(k, Z, alpha, X), grads) <= 1e-10
    G, share = patch_agop(k, Z, alpha, X)
    G_ref, share_ref = reference_agop(grads)
    assert rel_err(G, G_ref) <= 1e-10 and rel_err(share, share_ref) <= 1e-10


def test_unregistered_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown base kernel 'inverse_quadratic'"):
        ConvMahalanobisKernel(None, (1, 6, 6), 3, kernel="inverse_quadratic")


def test_every_registered_kernel_is_complete():
    """Each registered object offers every form a backend or the AGOP looks up."""
    for name, base in BASE_KERNELS.items():
        assert base.name == name
        for attr in ("pairs", "gemm_form", "gemm_map", "gradient_weights", "keops_kernel", "triton_param",
                     "triton_map", "uses_sigma", "translation_invariant"):
            assert hasattr(base, attr), (name, attr)
    assert np.isclose(BASE_KERNELS["laplace"].triton_param(2.0), 0.5)
