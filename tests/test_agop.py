"""Closed-form patch gradients and patch AGOP (falkon_convrfm.agop) against torch autograd.

The reference treats the unfolded patches of every data image as an independent leaf tensor
(n, P, d), evaluates f_o(x_i) = Σ_j α_jo Σ_p ω_p κ(Lᵀx_ip, Lᵀz_jp) with its own factor L of M
and its own direct formulas for κ, and differentiates with autograd.

Kinks: laplace at zero distance and ntk at aligned / zero-norm patches. The reference is written
so that autograd returns the same subgradient the package documents (0 for the kink term):
``vector_norm`` has subgradient 0 at 0, and ntk uses θ = 2 atan2(‖û − v̂‖, ‖û + v̂‖) (see
``_kappa`` for why not atan2(‖v̂ − c û‖, c)). Exactly-aligned /
zero-distance cases are built so the *transformed* patches are exactly equal or proportional
(M = I or a diagonal M with power-of-two entries, centres equal to a data image or 2× it, an
all-zero data image); the generic cases use random (also rank-deficient) PSD M, random ω,
padding and stride.

Acceptance: max |error| / max |reference| ≤ 1e-8 in float64, all finite.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import naive
from falkon_convrfm import ConvMahalanobisKernel, patch_agop, patch_gradients

BASE_KERNELS = ("laplace", "gaussian", "ntk")
TOL = 1e-8
TINY = torch.finfo(torch.float64).tiny



pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def _factor(M: np.ndarray) -> torch.Tensor:
    """An independent factor L (d × r) of M = L Lᵀ (eigh, tiny eigenvalues dropped)."""
    evals, evecs = np.linalg.eigh(np.asarray(M, dtype=np.float64))
    keep = evals > 1e-12 * max(evals.max(), 0.0)
    if not keep.any():
        return torch.zeros(M.shape[0], 1, dtype=torch.float64)
    return torch.from_numpy(evecs[:, keep] * np.sqrt(evals[keep]))


def _kappa(U: torch.Tensor, V: torch.Tensor, kind: str, sigma: float) -> torch.Tensor:
    """κ for every (row, centre, location): U (n, P, r), V (m, P, r) → (n, m, P)."""
    Ub, Vb = U[:, None], V[None]  # (n, 1, P, r), (1, m, P, r)
    if kind == "laplace":
        return torch.exp(-torch.linalg.vector_norm(Ub - Vb, dim=-1) / sigma)
    if kind == "gaussian":
        return torch.exp(-(Ub - Vb).pow(2).sum(-1) / (2 * sigma**2))
    a = torch.linalg.vector_norm(Ub, dim=-1, keepdim=True)
    b = torch.linalg.vector_norm(Vb, dim=-1, keepdim=True)
    uh = Ub / torch.clamp_min(a, TINY)
    vh = Vb / torch.clamp_min(b, TINY)
    # θ by the stable half-angle formula θ = 2 atan2(‖û − v̂‖, ‖û + v̂‖): exactly equal unit
    # vectors give û − v̂ = 0 exactly, so the kink's subgradient is 0. (atan2(‖v̂ − c û‖, c)
    # with c = ⟨û, v̂⟩ is not robust: c rounds to 1 ± ulp, v̂ − c û is then ulp noise in an
    # arbitrary direction and vector_norm's gradient picks that arbitrary direction.)
    theta = 2 * torch.atan2(
        torch.linalg.vector_norm(uh - vh, dim=-1, keepdim=True),
        torch.linalg.vector_norm(uh + vh, dim=-1, keepdim=True),
    )
    k = a * b / math.pi * (2 * torch.cos(theta) * (math.pi - theta) + torch.sin(theta))
    return k.squeeze(-1)


def reference_gradients(geometry, M, weights, kind, sigma, centres, alpha, X):
    """(n, P, C, d) autograd gradients ∇_{x_p} f_o(x_i), and f (n, C)."""
    L = _factor(M)
    alpha = alpha.reshape(alpha.shape[0], -1).double()
    w = torch.full((geometry.num_locations,), 1.0 / geometry.num_locations, dtype=torch.float64)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        w = w / w.sum()
    Xp = geometry.patches(X.double()).detach().clone().requires_grad_(True)  # (n, P, d) leaf
    Zp = geometry.patches(centres.double()).detach()
    K = torch.einsum("nmp,p->nm", _kappa(Xp @ L, Zp @ L, kind, sigma), w)
    f = K @ alpha  # (n, C)
    grads = []
    for o in range(f.shape[1]):
        (g,) = torch.autograd.grad(f[:, o].sum(), Xp, retain_graph=o + 1 < f.shape[1])
        grads.append(g)
    return torch.stack(grads, dim=2), f.detach()


def reference_agop(grads: torch.Tensor):
    """G = (1/n) Σ_i Σ_p Σ_o g gᵀ and the per-location share (P,)."""
    n = grads.shape[0]
    G = torch.einsum("npcd,npce->de", grads, grads) / n
    share = grads.pow(2).sum((0, 2, 3)) / n
    return G, share


def rel_err(result, reference) -> float:
    result, reference = result.double(), reference.double()
    assert result.shape == reference.shape, (result.shape, reference.shape)
    scale = reference.abs().max().item()
    return (result - reference).abs().max().item() / (scale if scale > 0 else 1.0)


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------
GENERIC = [
    # (image_shape, q, stride, padding, metric, weights)
    ((1, 6, 7), 3, 1, 0, "full", "uniform"),
    ((2, 6, 5), 3, 2, 1, "rank_deficient", "random"),
    ((3, 5, 5), 2, 1, 1, "full", "random"),
    ((1, 7, 6), 3, 2, 0, "identity", "uniform"),
]


def _sigma(kind, X, geometry, L):
    """A bandwidth on the scale of the transformed patch distances (no vanishing kernels)."""
    if kind == "ntk":
        return 1.0
    T = geometry.patches(X) @ L
    med = torch.linalg.vector_norm(T[1:] - T[:-1], dim=-1).median().item()
    return max(med, 1e-3)


def generic_problem(case, kind, seed=0):
    shape, q, stride, padding, metric, wkind = case
    rng = np.random.default_rng(seed)
    k = ConvMahalanobisKernel(None, shape, q, stride, padding)  # geometry helper only
    geo = k.geometry
    d, P = geo.patch_dim, geo.num_locations
    if metric == "identity":
        M = np.eye(d)
    elif metric == "full":
        M = naive.random_psd(d, rng=rng)
    else:
        M = naive.random_psd(d, rank=max(1, d // 2), rng=rng)
    weights = None if wkind == "uniform" else naive.random_weights(P, rng=rng)
    X = torch.from_numpy(rng.standard_normal((5, geo.row_length)))
    Z = torch.from_numpy(rng.standard_normal((4, geo.row_length)))
    alpha = torch.from_numpy(rng.standard_normal((4, 3)))
    sigma = _sigma(kind, torch.cat([X, Z]), geo, _factor(M))
    kernel = ConvMahalanobisKernel(M, shape, q, stride, padding, kind, sigma, weights)
    return kernel, M, weights, sigma, Z, alpha, X


def _check_gradients(kernel, M, weights, sigma, Z, alpha, X):
    ref, _ = reference_gradients(kernel.geometry, M, weights, kernel.base_kernel, sigma, Z, alpha, X)
    got = patch_gradients(kernel, Z, alpha, X)
    assert got.shape == ref.shape == (X.shape[0], kernel.geometry.num_locations, alpha.reshape(alpha.shape[0], -1).shape[1], kernel.geometry.patch_dim)
    assert torch.isfinite(got).all()
    assert torch.isfinite(ref).all()
    assert ref.abs().max() > 0
    err = rel_err(got, ref)
    assert err <= TOL, f"{kernel.base_kernel}: relative error {err:.3g}"
    return got, ref


def _case_id(case):
    shape, q, stride, padding, metric, wkind = case
    return f"{'x'.join(map(str, shape))}-q{q}-s{stride}-p{padding}-{metric}-{wkind}"


# ---------------------------------------------------------------------------------------------
# Gradients: generic cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BASE_KERNELS)
@pytest.mark.parametrize("case", GENERIC, ids=_case_id)
def test_patch_gradients_match_autograd_generic(case, kind):
    _check_gradients(*generic_problem(case, kind))


@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_reference_function_matches_kernel(kind):
    """Sanity of the reference itself: its f equals the package's K(X, Z) α."""
    kernel, M, weights, sigma, Z, alpha, X = generic_problem(GENERIC[1], kind)
    _, f = reference_gradients(kernel.geometry, M, weights, kind, sigma, Z, alpha, X)
    assert rel_err(kernel.mmv(X, Z, alpha), f) <= 1e-10


# ---------------------------------------------------------------------------------------------
# Gradients: kinks (exact constructions)
# ---------------------------------------------------------------------------------------------
def kink_problem(kind, metric="identity", seed=1):
    """Data images: random ones plus an all-zero image. Centres: a copy of data image 0 (zero
    distance / aligned at every location), 2× data image 1 (ntk: aligned, nonzero distance),
    and random images. M = I or diag of powers of two (exact transforms)."""
    rng = np.random.default_rng(seed)
    shape, q, stride, padding = (2, 5, 5), 3, 1, 1
    geo = ConvMahalanobisKernel(None, shape, q, stride, padding).geometry
    d = geo.patch_dim
    if metric == "identity":
        M = np.eye(d)
    else:
        M = np.diag(2.0 ** rng.integers(-2, 3, size=d)).astype(np.float64)
    X = torch.from_numpy(rng.standard_normal((4, geo.row_length)))
    X[3] = 0.0  # zero-norm patches everywhere
    Z = torch.from_numpy(rng.standard_normal((4, geo.row_length)))
    Z[0] = X[0]
    Z[1] = 2 * X[1]
    alpha = torch.from_numpy(rng.standard_normal((4, 3)))
    sigma = 1.0 if kind == "ntk" else 2.0
    kernel = ConvMahalanobisKernel(M, shape, q, stride, padding, kind, sigma)
    return kernel, M, None, sigma, Z, alpha, X


@pytest.mark.parametrize("metric", ["identity", "diag_pow2"])
@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_patch_gradients_match_autograd_at_kinks(kind, metric):
    kernel, M, weights, sigma, Z, alpha, X = kink_problem(kind, metric)
    got, ref = _check_gradients(kernel, M, weights, sigma, Z, alpha, X)
    if kind == "ntk":
        # the all-zero image: zero patches, gradient exactly 0 (documented convention)
        assert got[3].abs().max().item() == 0.0


def test_ntk_zero_centre_patches():
    """An all-zero centre (b = 0 at every location) contributes nothing to the ntk gradient."""
    kernel, M, weights, sigma, Z, alpha, X = kink_problem("ntk")
    Z = Z.clone()
    Z[2] = 0.0
    got, _ = _check_gradients(kernel, M, weights, sigma, Z, alpha, X)
    alpha2 = alpha.clone()
    alpha2[2] = 0.0
    assert rel_err(got, patch_gradients(kernel, Z, alpha2, X)) <= 1e-14


def test_laplace_zero_distance_subgradient_is_zero():
    """A single centre equal to the data image: every location at distance 0 → gradient 0."""
    kernel, M, weights, sigma, Z, alpha, X = kink_problem("laplace")
    g = patch_gradients(kernel, X[:1], alpha[:1], X[:1])
    assert torch.isfinite(g).all()
    assert g.abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------
# AGOP
# ---------------------------------------------------------------------------------------------
def _check_psd(G):
    assert torch.equal(G, G.T)
    evals = torch.linalg.eigvalsh(G)
    assert evals.min().item() >= -1e-12 * evals.abs().max().item()


@pytest.mark.parametrize("kind", BASE_KERNELS)
@pytest.mark.parametrize("case", [GENERIC[0], GENERIC[1]], ids=_case_id)
def test_patch_agop_matches_reference(case, kind):
    kernel, M, weights, sigma, Z, alpha, X = generic_problem(case, kind)
    ref, _ = reference_gradients(kernel.geometry, M, weights, kind, sigma, Z, alpha, X)
    G_ref, share_ref = reference_agop(ref)
    G, share = patch_agop(kernel, Z, alpha, X)
    assert G.dtype == torch.float64 and G.shape == (kernel.geometry.patch_dim,) * 2
    assert share.shape == (kernel.geometry.num_locations,)
    assert rel_err(G, G_ref) <= TOL
    assert rel_err(share, share_ref) <= TOL
    _check_psd(G)
    assert share.sum().item() == pytest.approx(torch.trace(G).item(), rel=1e-12)
    # chunked (tiny memory budget: many row and location chunks) equals unchunked
    Gc, share_c = patch_agop(kernel, Z, alpha, X, max_mem=2e4)
    assert rel_err(Gc, G) <= 1e-10
    assert rel_err(share_c, share) <= 1e-10


@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_patch_agop_at_kinks(kind):
    kernel, M, weights, sigma, Z, alpha, X = kink_problem(kind, "diag_pow2")
    ref, _ = reference_gradients(kernel.geometry, M, weights, kind, sigma, Z, alpha, X)
    G_ref, share_ref = reference_agop(ref)
    G, share = patch_agop(kernel, Z, alpha, X)
    assert torch.isfinite(G).all() and torch.isfinite(share).all()
    assert rel_err(G, G_ref) <= TOL
    assert rel_err(share, share_ref) <= TOL
    _check_psd(G)
    Gc, _ = patch_agop(kernel, Z, alpha, X, max_mem=2e4)
    assert rel_err(Gc, G) <= 1e-10


def test_laplace_zero_distance_rows_finite_agop():
    """AGOP over rows that coincide with centres (zero distance at every location) is finite."""
    kernel, M, weights, sigma, Z, alpha, X = kink_problem("laplace")
    G, share = patch_agop(kernel, X, alpha, X)  # every row is also a centre
    assert torch.isfinite(G).all() and torch.isfinite(share).all()
    ref, _ = reference_gradients(kernel.geometry, M, None, "laplace", sigma, X, alpha, X)
    assert rel_err(G, reference_agop(ref)[0]) <= TOL


@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_patch_agop_alpha_vector(kind):
    """A 1-D α (one output) is the same as an (m, 1) α."""
    kernel, M, weights, sigma, Z, alpha, X = generic_problem(GENERIC[2], kind)
    a = alpha[:, 0].contiguous()
    G1, s1 = patch_agop(kernel, Z, a, X)
    G2, s2 = patch_agop(kernel, Z, a[:, None], X)
    assert torch.equal(G1, G2) and torch.equal(s1, s2)
    ref, _ = reference_gradients(kernel.geometry, M, weights, kind, sigma, Z, a, X)
    assert ref.shape[2] == 1
    assert rel_err(G1, reference_agop(ref)[0]) <= TOL
    g = patch_gradients(kernel, Z, a, X)
    assert g.shape[2] == 1 and rel_err(g, ref) <= TOL


@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_patch_agop_float32_close_to_float64(kind):
    kernel, M, weights, sigma, Z, alpha, X = generic_problem(GENERIC[0], kind)
    G64, s64 = patch_agop(kernel, Z, alpha, X)
    G32, s32 = patch_agop(kernel, Z.float(), alpha.float(), X.float())
    assert G32.dtype == torch.float64  # accumulated in float64
    assert torch.isfinite(G32).all()
    assert rel_err(G32, G64) <= 1e-4
    assert rel_err(s32, s64) <= 1e-4
    _check_psd(G32)


def test_patch_agop_empty_rows_raise():
    kernel, M, weights, sigma, Z, alpha, X = generic_problem(GENERIC[0], "laplace")
    with pytest.raises(ValueError, match="at least one row"):
        patch_agop(kernel, Z, alpha, X[:0])


@pytest.mark.slow  # torch.compile compiles a graph per kernel
@pytest.mark.parametrize("kind", ["laplace", "gaussian"])
def test_compiled_distance_weights_match_eager(kind, monkeypatch):
    """Large chunks run the torch.compile'd distance weights; they equal the eager ones."""
    from falkon_convrfm import _compile, agop
    from falkon_convrfm.kernel import ConvMahalanobisKernel

    if not (_compile.COMPILE_ENABLED and _compile.TORCH_COMPILE_OK):
        pytest.skip("torch.compile disabled here")
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 2 * 7 * 7, generator=gen, dtype=torch.float64)
    Z = torch.randn(5, 2 * 7 * 7, generator=gen, dtype=torch.float64)
    Z[0] = X[0]  # zero distances too
    alpha = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    k = ConvMahalanobisKernel(None, (2, 7, 7), 3, kernel=kind, sigma=2.0)
    eager = agop.patch_agop(k, Z, alpha, X)[0]
    monkeypatch.setattr(_compile, "COMPILE_MIN_EVALS", 0)
    fast = agop.patch_agop(k, Z, alpha, X)[0]
    assert not _compile._COMPILE_FAILED
    assert torch.allclose(fast, eager, rtol=1e-10, atol=1e-14 * eager.abs().max())
