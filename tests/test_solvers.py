"""Kernel ridge solvers: the direct Nyström solve against the exact solver and Falkon, its row
blocks, the jitter retry, and the per-device solver choice (CUDA cases simulated)."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import requires_falkon
from falkon_convrfm import ConvMahalanobisKernel, _compat, solvers
from falkon_convrfm.solvers import (
    choose_solver,
    exact_ridge_fit,
    fit_kernel_machine,
    kernel_predict,
    nystrom_block_rows,
    nystrom_normal_equations,
    nystrom_ridge_fit,
    solve_psd,
    solver_options,
)

PENALTY = 1e-3


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_kernel(opt=None):
    return ConvMahalanobisKernel(None, image_shape=(1, 8, 8), patch_size=3, kernel="laplace", sigma=2.0, opt=opt)


@pytest.fixture
def data():
    X = torch.rand(90, 64, dtype=torch.float64)
    Y = torch.randn(90, 3, dtype=torch.float64)
    Xt = torch.rand(25, 64, dtype=torch.float64)
    return X, Y, Xt


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which one-time warnings were already given."""
    solvers.warn_once.cache_clear()
    yield
    solvers.warn_once.cache_clear()


def test_nystrom_with_all_rows_as_centres_is_the_exact_solution(data):
    X, Y, Xt = data
    k = make_kernel()
    alpha_exact = exact_ridge_fit(k, X, Y, PENALTY)
    centres, alpha = fit_kernel_machine(k, X, Y, torch.arange(X.shape[0]), PENALTY, "nystrom")
    assert torch.equal(centres, X) and alpha.shape == alpha_exact.shape
    assert rel(alpha, alpha_exact) <= 1e-8
    assert rel(kernel_predict(k, Xt, centres, alpha), kernel_predict(k, Xt, X, alpha_exact)) <= 1e-8


def test_normal_equations_match_their_formula(data):
    """A = K_nmᵀK_nm + ridge·K_mm and B = K_nmᵀY, for unsorted centres spread over several blocks."""
    X, Y, _ = data
    k = make_kernel()
    idx = torch.tensor([70, 3, 44, 12, 89, 0, 33])
    A, B = nystrom_normal_equations(k, X, Y, idx, 0.25, block_rows=8)
    Knm, Kmm = k(X, X[idx]), k(X[idx], X[idx])
    assert A.dtype == B.dtype == torch.float64
    torch.testing.assert_close(A, Knm.T @ Knm + 0.25 * Kmm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B, Knm.T @ Y, rtol=1e-12, atol=1e-12)


def test_block_budget_changes_blocks_not_result(data, monkeypatch):
    X, Y, _ = data
    k = make_kernel()
    idx = torch.randperm(X.shape[0])[:30]
    default = nystrom_ridge_fit(k, X, Y, idx, PENALTY)
    s = X.element_size()
    per_row = (k.extra_mem(False, False, X.dtype)["n"] + 30 * (1 + 2 * 8 / s)) * s
    fixed = (k.extra_mem(False, False, X.dtype)["m"] * 30 + k.extra_mem(False, False, X.dtype)["0"]) * s
    tiny = fixed + 7.5 * per_row
    assert nystrom_block_rows(k, X, 30, tiny) == 7
    assert nystrom_block_rows(k, X, 30, 2**30) == X.shape[0]

    calls = []
    original = type(k).__call__

    def counting(self, X1, X2, **kwargs):
        calls.append(X1.shape[0])
        return original(self, X1, X2, **kwargs)

    monkeypatch.setattr(type(k), "__call__", counting)
    blocked = nystrom_ridge_fit(k, X, Y, idx, PENALTY, block_memory=tiny)
    assert calls == [7] * 12 + [6]  # 90 rows in blocks of 7, and no separate K_mm evaluation
    assert rel(blocked, default) <= 1e-12
    with pytest.raises(ValueError, match="too small"):
        nystrom_block_rows(k, X, 30, fixed)


def test_block_memory_defaults_to_the_options_budget(data, monkeypatch):
    X, Y, _ = data
    seen = []
    monkeypatch.setattr(solvers, "nystrom_ridge_fit", lambda *a: seen.append(a[-1]) or torch.zeros(1))
    k = make_kernel()
    fit_kernel_machine(k, X, Y, torch.arange(5), PENALTY, "nystrom")
    fit_kernel_machine(k, X, Y, torch.arange(5), PENALTY, "nystrom", options=solver_options(max_memory=5e6))
    fit_kernel_machine(k, X, Y, torch.arange(5), PENALTY, "nystrom", options=solver_options(), block_memory=1e6)
    assert seen == [2**30, 5e6, 1e6]


@requires_falkon
def test_nystrom_matches_falkon_with_the_same_centres(data):
    X, Y, Xt = data
    opt = solver_options(cg_tolerance=1e-14)
    k = make_kernel(opt)
    idx = torch.randperm(X.shape[0])[:30]
    c1, a1 = fit_kernel_machine(k, X, Y, idx, PENALTY, "nystrom")
    c2, a2 = fit_kernel_machine(k, X, Y, idx, PENALTY, "falkon", maxiter=200, options=opt)
    assert torch.equal(c1, c2)
    assert rel(kernel_predict(k, Xt, c1, a1), kernel_predict(k, Xt, c2, a2)) <= 1e-6


@requires_falkon
def test_falkon_preconditioner_failure_is_retried_with_more_jitter(data, monkeypatch, fresh_warnings):
    """A failing preconditioner Cholesky (as K_mm of a smooth pooled kernel in float32 gave) is
    retried with 100× the jitter: one warning, and the same solution, since only the
    preconditioner changes; when every step fails, a one-line error names the remedies."""
    from falkon.preconditioner import flk_preconditioner

    X, Y, Xt = data
    opt = solver_options(cg_tolerance=1e-14)
    k, idx = make_kernel(opt), torch.arange(30)
    c0, a0 = fit_kernel_machine(k, X, Y, idx, PENALTY, "falkon", maxiter=200, options=opt)
    real, jitters = flk_preconditioner.potrf_wrapper, []

    def failing_at_default_jitter(C, *args, **kwargs):
        jitters.append(C.diagonal().clone())
        if len(jitters) == 1:
            raise RuntimeError("LAPACK potrf failed with status 7. Params: uplo L, rows 30")
        return real(C, *args, **kwargs)

    monkeypatch.setattr(flk_preconditioner, "potrf_wrapper", failing_at_default_jitter)
    with pytest.warns(UserWarning, match=r"needed 100× its default jitter") as rec:
        c1, a1 = fit_kernel_machine(k, X, Y, idx, PENALTY, "falkon", maxiter=200, options=opt)
    assert len(rec) == 1 and torch.equal(c0, c1)
    assert (jitters[1] - jitters[0]).min() > 0  # the retry added more to K_mm's diagonal
    assert rel(kernel_predict(k, Xt, c1, a1), kernel_predict(k, Xt, c0, a0)) <= 1e-6

    def always_failing(C, *args, **kwargs):
        raise RuntimeError("LAPACK potrf failed with status 7")

    monkeypatch.setattr(flk_preconditioner, "potrf_wrapper", always_failing)
    with pytest.raises(RuntimeError, match=r"could not factorise K_mm .* use dtype='float64'") as err:
        fit_kernel_machine(k, X, Y, idx, PENALTY, "falkon", options=opt)
    assert "\n" not in str(err.value)


def test_duplicated_centres_are_solved_with_jitter(data):
    """A singular K_mm (duplicated centres) spans the same functions as the unique centres."""
    X, Y, Xt = data
    k = make_kernel()
    unique = torch.arange(20)
    cu, au = fit_kernel_machine(k, X, Y, unique, PENALTY, "nystrom")
    with pytest.warns(UserWarning, match=r"not numerically positive definite; solved with jitter") as rec:
        cd, ad = fit_kernel_machine(k, X, Y, torch.cat([unique, unique[:5]]), PENALTY, "nystrom")
    assert len(rec) == 1
    assert ad.shape == (25, 3) and torch.isfinite(ad).all()
    assert rel(kernel_predict(k, Xt, cd, ad), kernel_predict(k, Xt, cu, au)) <= 1e-5


def test_solve_psd_errors_name_the_matrix():
    A = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    B = torch.ones(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^A is not positive definite: fix it$"):
        solve_psd(A.clone(), B, "A", "fix it")
    with pytest.warns(UserWarning, match="jitter 1e-10"):
        x = solve_psd(A.clone(), B, "A", "fix it", jitters=(1e-10, 1e-9))
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"also with jitter up to 1e-06"):
        solve_psd(-torch.eye(3, dtype=torch.float64), B, "A", "fix it", jitters=solvers.NYSTROM_JITTERS)


def test_exact_solver_reports_an_indefinite_system(data):
    X, Y, _ = data
    n = X.shape[0]
    with pytest.raises(ValueError, match=r"K \+ nλI \(penalty=0.001\) is not positive definite"):
        exact_ridge_fit(lambda A, B: -torch.eye(n, dtype=torch.float64), X, Y, PENALTY)


def test_float32_data_gives_float32_alpha(data):
    X, Y, _ = data
    _, alpha = fit_kernel_machine(make_kernel(), X.float(), Y.float(), torch.arange(10), PENALTY, "nystrom")
    assert alpha.dtype == torch.float32 and alpha.shape == (10, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="lbfgs"), "solver must be one of"),
        (dict(solver="nystrom", loss="logistic"), "squared loss only"),
        (dict(solver="exact", loss="logistic"), "squared loss only"),
        (dict(solver="nystrom", loss="hinge"), "loss must be"),
        (dict(solver="nystrom", centre_idx=torch.tensor([0, 90])), r"in \[0, 90\)"),
        (dict(solver="nystrom", centre_idx=torch.tensor([0.5])), "integer tensor"),
        (dict(solver="nystrom", centre_idx=torch.tensor([], dtype=torch.long)), "non-empty"),
        (dict(solver="nystrom", penalty=0.0), "penalty must be"),
        (dict(solver="nystrom", block_memory=-1.0), "block_memory must be"),
    ],
)
def test_bad_arguments_raise(data, kwargs, match):
    X, Y, _ = data
    args = dict(centre_idx=torch.arange(5), penalty=PENALTY) | kwargs
    with pytest.raises(ValueError, match=match):
        fit_kernel_machine(make_kernel(), X, Y, **args)


# ---------------------------------------------------------------------- choose_solver
def fake_cuda_status(monkeypatch, ok: bool, reason: str = "OSError: libtorch_cuda_linalg.so: cannot open"):
    monkeypatch.setattr(_compat, "falkon_cuda_status", lambda: (ok, reason))


@pytest.mark.parametrize("has_falkon, expected", [(True, "falkon"), (False, "exact")])
def test_auto_on_cpu(monkeypatch, has_falkon, expected):
    monkeypatch.setattr(_compat, "HAS_FALKON", has_falkon)
    assert choose_solver("auto", "cpu") == expected
    assert choose_solver("auto", torch.device("cpu")) == expected


def test_auto_on_cuda_with_a_working_falkon(monkeypatch):
    monkeypatch.setattr(_compat, "HAS_FALKON", True)
    fake_cuda_status(monkeypatch, True, "ok")
    assert choose_solver("auto", "cuda") == "falkon"
    assert choose_solver("falkon", "cuda:0") == "falkon"


def test_auto_on_cuda_without_the_extension_warns_once(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_compat, "HAS_FALKON", True)
    fake_cuda_status(monkeypatch, False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert choose_solver("auto", "cuda") == "nystrom"
        assert choose_solver("auto", "cuda") == "nystrom"
    assert len(rec) == 1
    message = str(rec[0].message)
    assert "libtorch_cuda_linalg" in message and "solver='nystrom'" in message and "\n" not in message


def test_explicit_falkon_on_cuda_without_the_extension_raises(monkeypatch):
    monkeypatch.setattr(_compat, "HAS_FALKON", True)
    fake_cuda_status(monkeypatch, False)
    with pytest.raises(RuntimeError, match=r"libtorch_cuda_linalg.*use solver='nystrom'"):
        choose_solver("falkon", "cuda")


def test_explicit_falkon_without_falkon_raises(monkeypatch):
    monkeypatch.setattr(_compat, "HAS_FALKON", False)
    with pytest.raises(ImportError, match="not on PyPI"):
        choose_solver("falkon", "cpu")


@pytest.mark.parametrize("requested", ["exact", "nystrom"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_exact_and_nystrom_run_anywhere(monkeypatch, requested, device):
    fake_cuda_status(monkeypatch, False)
    assert choose_solver(requested, device) == requested


@pytest.mark.parametrize("requested", ["lbfgs", "Falkon", None])
def test_unknown_solver_raises(requested):
    with pytest.raises(ValueError, match="solver must be one of"):
        choose_solver(requested, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_cuda_status_without_cuda():
    assert _compat.falkon_cuda_status() == (False, "CUDA not available")


@requires_falkon
@pytest.mark.parametrize(
    "cuda_version, expected",
    [
        (OSError("libtorch_cuda_linalg.so: cannot open shared object file"), "load (OSError: libtorch_cuda_linalg"),
        (OSError("_C.so: undefined symbol: _ZN2at4cuda29getCurrentCUDASolverDnHandleEv"), "undefined symbol"),
        (RuntimeError("compiled with different CUDA versions.\nPlease reinstall"), "CUDA versions.)"),
        (-1, "built without CUDA"),
    ],
)
def test_cuda_status_reports_why_the_extension_fails(monkeypatch, cuda_version, expected):
    """The probe's answer when loading Falkon's extension fails (simulated: no GPU needed)."""
    from falkon import c_ext

    def fake_cuda_version():
        if isinstance(cuda_version, Exception):
            raise cuda_version
        return cuda_version

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(c_ext, "cuda_version", fake_cuda_version)
    ok, reason = _compat.falkon_cuda_status.__wrapped__()
    assert not ok and expected in reason and "\n" not in reason


def test_falkon_extension_failure_falls_back_to_nystrom(data, monkeypatch, fresh_warnings):
    """Falkon raising OSError at its first use of the compiled extension: one warning, nystrom runs."""
    X, Y, _ = data
    k, idx = make_kernel(), torch.arange(15)  # built before Falkon is pretended to be installed
    monkeypatch.setattr(_compat, "HAS_FALKON", True)

    def broken(*args):
        raise OSError("libtorch_cuda_linalg.so: cannot open shared object file")

    monkeypatch.setattr(solvers, "_falkon_fit", broken)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        centres, alpha = fit_kernel_machine(k, X, Y, idx, PENALTY, "falkon")
        fit_kernel_machine(k, X, Y, idx, PENALTY, "falkon")
    assert len(rec) == 1 and "using solver='nystrom' instead" in str(rec[0].message)
    assert torch.equal(centres, X[idx]) and torch.equal(alpha, nystrom_ridge_fit(k, X, Y, idx, PENALTY))
    with pytest.raises(RuntimeError, match="logistic"):
        fit_kernel_machine(k, X, torch.sign(Y[:, 0]), idx, PENALTY, "falkon", loss="logistic")
