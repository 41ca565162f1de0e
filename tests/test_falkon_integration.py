"""ConvMahalanobisKernel inside Falkon: blocked products, Falkon vs exact KRR, real data.

Every test needs Falkon (not on PyPI) and is skipped with the install hint when it is absent.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import naive
from conftest import HAS_FALKON, requires_falkon
from falkon_convrfm import ConvMahalanobisKernel, exact_ridge_fit, kernel_predict

pytestmark = requires_falkon

if HAS_FALKON:
    import falkon
    from falkon.gsc_losses import LogisticLoss


def _options(**kwargs):
    # use_cpu: no CUDA probing (and no warning) on CPU-only machines.
    return falkon.FalkonOptions(use_cpu=True, keops_active="no", **kwargs)


# ---------------------------------------------------------------------------------------------
# Blocked products under a tiny memory budget
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blocked_problem():
    rng = np.random.default_rng(7)
    shape = (3, 8, 8)
    M = naive.random_psd(27, rank=20, rng=rng)
    k = ConvMahalanobisKernel(M, shape, 3, 1, 0, "laplace", sigma=5.0)
    X1 = torch.from_numpy(rng.uniform(0, 1, (300, 192)))
    X2 = torch.from_numpy(rng.uniform(0, 1, (200, 192)))
    v = torch.from_numpy(rng.standard_normal((200, 3)))
    w = torch.from_numpy(rng.standard_normal((300, 3)))
    K = k(X1, X2)  # one full matrix, no memory limit
    return k, X1, X2, v, w, K


def _count_compute(monkeypatch, k):
    calls = []
    real = k.compute

    def spy(X1, X2, out, diag, **kwargs):
        calls.append((X1.shape[0], X2.shape[0]))
        return real(X1, X2, out, diag, **kwargs)

    monkeypatch.setattr(k, "compute", spy)
    return calls


@pytest.mark.parametrize("which", ["v,w", "v,None", "None,w"])
def test_blocked_products_tiny_memory(blocked_problem, monkeypatch, which):
    """A budget of ~60 rows of temporaries splits ~300×200 products into many blocks; results
    equal the full-matrix products. ``None,w`` exercises dmmv(v=None) -- Kᵀw."""
    k, X1, X2, v, w, K = blocked_problem
    extra = k.extra_mem(False, False, torch.float64)
    opt = _options(max_cpu_mem=8.0 * (extra["0"] + 60 * (X2.shape[0] + extra["n"]) + X2.shape[0] * extra["m"]))

    calls = _count_compute(monkeypatch, k)
    Kv = k.mmv(X1, X2, v, opt=opt)
    assert len(calls) > 1, f"expected a blocked mmv, got blocks {calls}"
    torch.testing.assert_close(Kv, K @ v, rtol=1e-10, atol=1e-10)

    vv = v if which.startswith("v") else None
    ww = w if which.endswith("w") else None
    calls.clear()
    out = k.dmmv(X1, X2, vv, ww, opt=opt)
    assert len(calls) > 1, f"expected a blocked dmmv, got blocks {calls}"
    ref = K.T @ ((K @ vv if vv is not None else 0) + (ww if ww is not None else 0))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_blocked_kernel_matrix_tiny_memory(blocked_problem, monkeypatch):
    # Falkon's fmm sizes k(X1, X2) blocks from extra_mem's per-row terms only (it ignores the
    # constant "0" term), so 20 MB gives one block here; 4 MB forces several.
    k, X1, X2, _, _, K = blocked_problem
    calls = _count_compute(monkeypatch, k)
    K_blocked = k(X1, X2, opt=_options(max_cpu_mem=4e6))
    assert len(calls) > 1
    torch.testing.assert_close(K_blocked, K, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Falkon with every training point as a centre == exact kernel ridge regression
# ---------------------------------------------------------------------------------------------
# laplace in the fast subset; the other base kernels (the NTK's arccos is the slowest) with the full suite
@pytest.mark.parametrize("kind", ["laplace", pytest.param("gaussian", marks=pytest.mark.slow),
                                  pytest.param("ntk", marks=pytest.mark.slow)])
def test_falkon_all_centres_matches_exact_ridge(kind):
    rng = np.random.default_rng(3)
    shape = (1, 6, 5)  # P = 12 locations keeps the 30 CG iterations cheap
    n, penalty = 150, 1e-3
    M = naive.random_psd(9, rank=6, rng=rng)
    k = ConvMahalanobisKernel(M, shape, 3, 1, 0, kind, sigma=1.5)
    X = torch.from_numpy(rng.uniform(0, 1, (n, 30)))
    Y = torch.sin(3 * X[:, :5].sum(1, keepdim=True)) + 0.1 * torch.from_numpy(rng.standard_normal((n, 1)))
    Xte = torch.from_numpy(rng.uniform(0, 1, (40, 30)))

    model = falkon.Falkon(
        kernel=k, penalty=penalty, M=n, center_selection="uniform", maxiter=30, seed=0,
        options=_options(cg_tolerance=1e-12),
    )
    model.fit(X, Y)
    assert model.ny_points_.shape[0] == n  # uniform selection without replacement: every point

    alpha = exact_ridge_fit(k, X, Y, penalty)
    for Xe in (X, Xte):
        exact = kernel_predict(k, Xe, X, alpha)
        pred = model.predict(Xe)
        rel = ((pred - exact).abs().max() / exact.abs().max()).item()
        assert rel <= 1e-6, rel


# ---------------------------------------------------------------------------------------------
# scikit-learn digits: Falkon and LogisticFalkon on real images
# ---------------------------------------------------------------------------------------------
# Fixed, a-priori settings (not tuned on the test split): 8×8 digits scaled to [0, 1],
# 3×3 patches without padding, Laplace σ = 2, M = 200 centres, λ = 1e-6, 10 CG iterations.
DIGITS_KERNEL = dict(M=None, image_shape=(1, 8, 8), patch_size=3, stride=1, padding=0, kernel="laplace", sigma=2.0)
DIGITS_CENTRES = 200


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = data.data / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, data.target, test_size=0.3, stratify=data.target, random_state=0)
    return torch.from_numpy(Xtr), torch.from_numpy(Xte), torch.from_numpy(ytr), torch.from_numpy(yte)


@pytest.mark.slow  # a whole Falkon fit on digits
def test_falkon_digits_accuracy(digits):
    """10-class digits, one-hot targets, argmax prediction."""
    Xtr, Xte, ytr, yte = digits
    k = ConvMahalanobisKernel(**DIGITS_KERNEL)
    Ytr = torch.nn.functional.one_hot(ytr, 10).double()
    model = falkon.Falkon(kernel=k, penalty=1e-6, M=DIGITS_CENTRES, maxiter=10, seed=0, options=_options())
    model.fit(Xtr, Ytr)
    acc = (model.predict(Xte).argmax(1) == yte).double().mean().item()
    assert acc > 0.90, acc


@pytest.mark.slow  # a whole Falkon fit on digits
def test_logistic_falkon_digits_accuracy(digits):
    """LogisticFalkon is binary (labels ±1): the task is digits 0–4 (−1) vs 5–9 (+1)."""
    Xtr, Xte, ytr, yte = digits
    k = ConvMahalanobisKernel(**DIGITS_KERNEL)
    ybin = torch.where(ytr >= 5, 1.0, -1.0).double().reshape(-1, 1)
    model = falkon.LogisticFalkon(
        kernel=k, penalty_list=[1e-3, 1e-5, 1e-6], iter_list=[3, 3, 5], loss=LogisticLoss(k),
        M=DIGITS_CENTRES, seed=0, options=_options(),
    )
    model.fit(Xtr, ybin)
    pred = model.predict(Xte).reshape(-1)
    acc = ((pred > 0) == (yte >= 5)).double().mean().item()
    assert acc > 0.90, acc


@pytest.mark.slow  # a whole Falkon fit on digits
def test_falkon_float32_fit(digits, monkeypatch):
    """float32 data: Falkon evaluates the preconditioner's K_MM in float64 blocks
    (no_single_kernel=True), the CG products in float32; both reach the kernel."""
    Xtr, Xte, ytr, yte = digits
    k = ConvMahalanobisKernel(**DIGITS_KERNEL)
    dtypes = set()
    real = k.compute

    def spy(X1, X2, out, diag, **kwargs):
        dtypes.add(X1.dtype)
        return real(X1, X2, out, diag, **kwargs)

    monkeypatch.setattr(k, "compute", spy)
    Ytr = torch.nn.functional.one_hot(ytr, 10).float()
    model = falkon.Falkon(kernel=k, penalty=1e-6, M=DIGITS_CENTRES, maxiter=10, seed=0, options=_options())
    model.fit(Xtr.float(), Ytr)
    assert dtypes == {torch.float32, torch.float64}, dtypes
    pred = model.predict(Xte.float())
    assert pred.dtype == torch.float32 and torch.isfinite(pred).all()
    acc = (pred.argmax(1) == yte).double().mean().item()
    assert acc > 0.90, acc


def test_knm_is_computed_once_per_fit(monkeypatch):
    """The estimators' Falkon options store K_nm (whatever the row length), so the CG
    iterations reuse it: the kernel is evaluated on about n·m + m² entries per fit, not
    maxiter·n·m."""
    from falkon_convrfm import ConvMahalanobisKernel
    from falkon_convrfm.solvers import fit_kernel_machine, solver_options

    evaluated = []
    original = ConvMahalanobisKernel.compute

    def counting(self, X1, X2, out, diag, **kwargs):
        evaluated.append(X1.shape[0] * X2.shape[0])
        return original(self, X1, X2, out, diag, **kwargs)

    monkeypatch.setattr(ConvMahalanobisKernel, "compute", counting)
    n, m = 300, 60
    X = torch.rand(n, 64)
    Y = torch.nn.functional.one_hot(torch.arange(n) % 3).float()
    k = ConvMahalanobisKernel(None, (1, 8, 8), 3, opt=solver_options())
    fit_kernel_machine(k, X, Y, torch.arange(m), 1e-3, "falkon", maxiter=15, options=solver_options())
    assert 0 < sum(evaluated) <= n * m + 2 * m * m, (sum(evaluated), n * m)
