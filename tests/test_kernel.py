"""Acceptance tests for ConvMahalanobisKernel against the naive float64 reference (tests/naive.py).

Tolerances (relative error = max |error| / max |reference|): 1e-10 for float64, 1e-5 for float32
(float32 inputs are compared with the float64 reference evaluated on the same float32 values).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import falkon_convrfm
import naive
from conftest import HAS_FALKON
from falkon_convrfm import ConvMahalanobisKernel
from falkon_convrfm import _compile
from falkon_convrfm.ops import dense

BASE_KERNELS = ("laplace", "gaussian", "ntk")
DTYPES = (torch.float64, torch.float32)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
N1, N2 = 5, 4  # rows of X1, X2

# ---------------------------------------------------------------------------------------------
# Geometry cases: every q ∈ {1,3,5} × stride ∈ {1,2} × padding ∈ {0, q//2} × c ∈ {1,3}
# (padding q//2 = 0 for q = 1 is not repeated), all on non-square images large enough for q = 5.
# The metric (identity / full-rank random PSD / rank-deficient PSD) and the weights
# (uniform / random) are cycled over the cases so that every value appears with every
# q, stride, padding, c; every case is then run with every base kernel and both dtypes.
# ---------------------------------------------------------------------------------------------
_IMAGE_HW = ((7, 9), (9, 6), (6, 8), (8, 7), (5, 7))
_METRICS = ("identity", "full", "rank_deficient")
_WEIGHTS = ("uniform", "random")


def _geometry_cases():
    cases = []
    for q, stride, pad_kind, c in itertools.product((1, 3, 5), (1, 2), ("zero", "half"), (1, 3)):
        padding = 0 if pad_kind == "zero" else q // 2
        if q == 1 and pad_kind == "half":
            continue
        cases.append(dict(q=q, stride=stride, padding=padding, c=c))
    for i, case in enumerate(cases):
        case["hw"] = _IMAGE_HW[i % len(_IMAGE_HW)]
        case["metric"] = _METRICS[i % len(_METRICS)]
        case["weights"] = _WEIGHTS[(i // len(_METRICS)) % len(_WEIGHTS)]
    return cases


GEOMETRIES = _geometry_cases()


def _case_id(case):
    h, w = case["hw"]
    return f"c{case['c']}-{h}x{w}-q{case['q']}-s{case['stride']}-p{case['padding']}-{case['metric']}-{case['weights']}w"


def test_geometry_cases_cover_every_factor():
    """The sampled design covers every value of every factor (and all metric/weight kinds)."""
    assert {c["q"] for c in GEOMETRIES} == {1, 3, 5}
    assert {c["stride"] for c in GEOMETRIES} == {1, 2}
    assert {c["c"] for c in GEOMETRIES} == {1, 3}
    assert {(c["q"], c["padding"]) for c in GEOMETRIES} == {(1, 0), (3, 0), (3, 1), (5, 0), (5, 2)}
    assert {c["metric"] for c in GEOMETRIES} == set(_METRICS)
    assert {c["weights"] for c in GEOMETRIES} == set(_WEIGHTS)
    assert all(h != w for h, w in (c["hw"] for c in GEOMETRIES))
    # rank-deficient metrics together with random weights, and q = 5 with both metric kinds
    assert any(c["metric"] == "rank_deficient" and c["weights"] == "random" for c in GEOMETRIES)
    assert {c["metric"] for c in GEOMETRIES if c["q"] == 5} == set(_METRICS)


def _make_problem(case, kind, seed=0):
    """Kernel arguments and float64 data (numpy) for one geometry case."""
    rng = np.random.default_rng(seed)
    c, q, stride, padding = case["c"], case["q"], case["stride"], case["padding"]
    h, w = case["hw"]
    shape = (c, h, w)
    d = c * q * q
    P = naive.num_locations(shape, q, stride, padding)
    if case["metric"] == "identity":
        M = None
    elif case["metric"] == "full":
        M = naive.random_psd(d, rng=rng)
    else:
        M = naive.random_psd(d, rank=max(1, d // 2), rng=rng)
        if d > 1:
            assert np.linalg.matrix_rank(M) < d
    weights = None if case["weights"] == "uniform" else naive.random_weights(P, rng=rng)
    X1 = rng.standard_normal((N1, c * h * w))
    X2 = rng.standard_normal((N2, c * h * w))
    # Typical squared distance in the metric is 2·tr(M) = 2d: scale σ so κ is far from 0 and 1.
    sigma = math.sqrt(2.0 * d) * 0.7
    kwargs = dict(M=M, image_shape=shape, patch_size=q, stride=stride, padding=padding, kernel=kind, sigma=sigma,
                  weights=weights)
    return kwargs, X1, X2


def _naive(kwargs, X1, X2):
    return naive.conv_kernel(
        X1, X2, kwargs["image_shape"], kwargs["patch_size"], kwargs["stride"], kwargs["padding"],
        kwargs["kernel"], kwargs["sigma"], kwargs["M"], kwargs["weights"],
    )


def _product_error(result, K, v, w=None, transpose=False):
    """Relative error of a kernel-vector product, normalised by the product of absolute values
    (so cancellation in K@v does not inflate the error)."""
    K = np.asarray(K)
    v = None if v is None else np.asarray(v)
    w = None if w is None else np.asarray(w)
    Ka = np.abs(K)
    if transpose:
        inner = (K @ v if v is not None else 0) + (w if w is not None else 0)
        ref = K.T @ inner
        scale = Ka.T @ ((Ka @ np.abs(v) if v is not None else 0) + (np.abs(w) if w is not None else 0))
    else:
        ref = K @ v
        scale = Ka @ np.abs(v)
    res = result.detach().double().cpu().numpy()
    assert res.shape == ref.shape, (res.shape, ref.shape)
    return float(np.abs(res - ref).max() / scale.max())


# ---------------------------------------------------------------------------------------------
# Main acceptance: K, compute(), mmv, dmmv and diag against the naive reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("kind", BASE_KERNELS)
@pytest.mark.parametrize("case", GEOMETRIES, ids=[_case_id(c) for c in GEOMETRIES])
def test_kernel_matches_naive(case, kind, dtype):
    kwargs, X1_np, X2_np = _make_problem(case, kind)
    k = ConvMahalanobisKernel(**kwargs)
    X1 = torch.from_numpy(X1_np).to(dtype)
    X2 = torch.from_numpy(X2_np).to(dtype)
    K_ref = _naive(kwargs, X1, X2)  # float64 on exactly the values the kernel sees
    tol = TOL[dtype]

    K = k(X1, X2)
    assert isinstance(K, torch.Tensor) and K.dtype == dtype and K.shape == (N1, N2)
    assert naive.relative_error(K, K_ref) <= tol

    # compute() directly: the block routine Falkon calls, in the data's own dtype
    # (Falkon's k(X1, X2) evaluates float32 data in float64 blocks by default).
    out = X1.new_empty(N1, N2)
    res = k.compute(X1, X2, out, diag=False)
    assert res.data_ptr() == out.data_ptr()
    assert naive.relative_error(out, K_ref) <= tol

    # mmv (vector and matrix right-hand side) and dmmv
    rng = np.random.default_rng(1)
    v = rng.standard_normal((N2, 2))
    w = rng.standard_normal((N1, 2))
    vt, wt = torch.from_numpy(v).to(dtype), torch.from_numpy(w).to(dtype)
    Kv = k.mmv(X1, X2, vt)
    assert Kv.dtype == dtype and _product_error(Kv, K_ref, v) <= tol
    Kv1 = k.mmv(X1, X2, vt[:, 0].contiguous())  # 1-D v (Falkon requires contiguous v)
    assert _product_error(Kv1.reshape(-1, 1), K_ref, v[:, :1]) <= tol
    KtKv = k.dmmv(X1, X2, vt, wt)
    assert KtKv.shape == (N2, 2) and _product_error(KtKv, K_ref, v, w, transpose=True) <= tol

    # diag=True: K(X1[i], X2[i]) for the first N2 rows
    D = k(X1[:N2], X2, diag=True)
    assert D.dtype == dtype
    assert naive.relative_error(D.reshape(-1), np.diag(K_ref[:N2])) <= tol


# ---------------------------------------------------------------------------------------------
# Coincident patches: K(X, X) and images that share most patches (e.g. zero backgrounds)
# ---------------------------------------------------------------------------------------------
# The ntk profile g(cos θ) has an infinite derivative at θ = 0 (through arccos and √(1 − c²)),
# so for parallel patches a rounding error ε in cos θ becomes ~√ε in κ -- for *any* evaluation
# through cos θ, the float64 reference included (~1e-8). The ntk tolerances below are the ones
# attainable through cos θ; laplace and gaussian use the acceptance tolerances.
COINCIDENT_TOL = {
    ("laplace", torch.float64): 1e-10, ("laplace", torch.float32): 1e-5,
    ("gaussian", torch.float64): 1e-10, ("gaussian", torch.float32): 1e-5,
    ("ntk", torch.float64): 1e-8, ("ntk", torch.float32): 2e-4,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_symmetric_block_matches_naive(kind, dtype, rng):
    """K(X, X) -- the block Falkon builds its preconditioner from, and every mmv against centres
    drawn from the data -- has u = v at every location on the diagonal."""
    shape, q = (3, 7, 6), 3
    M = naive.random_psd(27, rank=20, rng=rng)
    X = torch.from_numpy(rng.standard_normal((6, 3 * 7 * 6))).to(dtype)
    k = ConvMahalanobisKernel(M, shape, q, 1, 1, kind, sigma=4.0)
    K_ref = naive.conv_kernel(X, X, shape, q, 1, 1, kind, 4.0, M)
    tol = COINCIDENT_TOL[(kind, dtype)]
    errors = {
        "call": naive.relative_error(k(X, X), K_ref),
        "compute": naive.relative_error(k.compute(X, X, X.new_empty(6, 6), False), K_ref),
        "diag": naive.relative_error(k(X, X, diag=True), np.diag(K_ref)),
    }
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_shared_patches_between_distinct_images(kind, dtype, rng):
    """Distinct images that agree on most patches (a centre that is a training image with one
    pixel changed, or images on a common background): κ at u = v must stay accurate."""
    shape, q = (1, 8, 8), 3
    X1 = rng.uniform(0.0, 1.0, (3, 64))
    X2 = np.concatenate([X1[:2].copy(), rng.uniform(0.0, 1.0, (2, 64))])
    X2[0, 0] += 0.5  # top-left pixel: only the top-left patch differs
    X2[1, 63] -= 0.5  # bottom-right pixel
    X1, X2 = torch.from_numpy(X1).to(dtype), torch.from_numpy(X2).to(dtype)
    k = ConvMahalanobisKernel(None, shape, q, 1, 0, kind, sigma=1.0)
    K_ref = naive.conv_kernel(X1, X2, shape, q, 1, 0, kind, 1.0)
    errors = {
        "call": naive.relative_error(k(X1, X2), K_ref),
        "compute": naive.relative_error(k.compute(X1, X2, X1.new_empty(3, 4), False), K_ref),
    }
    assert max(errors.values()) <= COINCIDENT_TOL[(kind, dtype)], errors


# ---------------------------------------------------------------------------------------------
# The torch.compile'd tile path
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # torch.compile compiles the tile per kernel and dtype
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_compiled_path_matches_naive(kind, dtype, monkeypatch, rng):
    if not (_compile.COMPILE_ENABLED and _compile.TORCH_COMPILE_OK):
        pytest.skip("torch.compile path disabled (FALKON_CONVRFM_COMPILE=0 or unsupported platform)")
    monkeypatch.setattr(_compile, "COMPILE_MIN_EVALS", 0)
    shape, q, stride, padding = (3, 7, 9), 3, 1, 1
    P = naive.num_locations(shape, q, stride, padding)
    M = naive.random_psd(27, rank=13, rng=rng)
    weights = naive.random_weights(P, rng=rng)
    X1 = torch.from_numpy(rng.standard_normal((N1, 3 * 7 * 9))).to(dtype)
    X2 = torch.from_numpy(rng.standard_normal((N2, 3 * 7 * 9))).to(dtype)
    k = ConvMahalanobisKernel(M, shape, q, stride, padding, kind, sigma=5.0, weights=weights)
    K_ref = naive.conv_kernel(X1, X2, shape, q, stride, padding, kind, 5.0, M, weights)

    real = dense.compiled_fn
    calls = []

    def spy(fn):
        fast = real(fn)

        def run(*args, **kwargs):
            calls.append(args[0].dtype)
            return fast(*args, **kwargs)

        return run

    monkeypatch.setattr(dense, "compiled_fn", spy)
    out = k.compute(X1, X2, X1.new_empty(N1, N2), diag=False)
    assert calls and set(calls) == {dtype}, "compiled tile function was not used"
    assert not _compile._COMPILE_FAILED, "torch.compile failed and fell back to eager"
    assert naive.relative_error(out, K_ref) <= TOL[dtype]
    assert naive.relative_error(k(X1, X2), K_ref) <= TOL[dtype]


# ---------------------------------------------------------------------------------------------
# M = I is the fixed convolutional kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_identity_metric_is_fixed_conv_kernel(kind, rng):
    shape, q = (3, 6, 8), 3
    X1 = torch.from_numpy(rng.standard_normal((N1, 144)))
    X2 = torch.from_numpy(rng.standard_normal((N2, 144)))
    k_none = ConvMahalanobisKernel(None, shape, q, 2, 1, kind, sigma=3.0)
    k_eye = ConvMahalanobisKernel(torch.eye(27), shape, q, 2, 1, kind, sigma=3.0)
    K_ref = naive.conv_kernel(X1, X2, shape, q, 2, 1, kind, 3.0, np.eye(27))
    K_none = k_none(X1, X2)
    assert torch.equal(k_none.metric, torch.eye(27, dtype=torch.float64))
    assert naive.relative_error(K_none, K_ref) <= 1e-10
    assert naive.relative_error(k_eye(X1, X2), K_none) <= 1e-12


def test_weights_are_normalised(rng):
    """ω is normalised to sum to 1: scaling it does not change K."""
    shape = (1, 7, 9)
    P = naive.num_locations(shape, 3, 1, 0)
    w = naive.random_weights(P, rng=rng, normalise=False)
    X1 = torch.from_numpy(rng.standard_normal((4, 63)))
    X2 = torch.from_numpy(rng.standard_normal((3, 63)))
    K1 = ConvMahalanobisKernel(None, shape, 3, weights=w)(X1, X2)
    K2 = ConvMahalanobisKernel(None, shape, 3, weights=7.5 * w)(X1, X2)
    K_ref = naive.conv_kernel(X1, X2, shape, 3, weights=w / w.sum())
    assert naive.relative_error(K1, K_ref) <= 1e-10
    assert naive.relative_error(K2, K1) <= 1e-14


def test_sigma_is_ignored_by_ntk(rng):
    X = torch.from_numpy(rng.standard_normal((3, 63)))
    K1 = ConvMahalanobisKernel(None, (1, 7, 9), 3, kernel="ntk", sigma=1.0)(X, X)
    K2 = ConvMahalanobisKernel(None, (1, 7, 9), 3, kernel="ntk", sigma=17.0)(X, X)
    assert torch.equal(K1, K2)


# ---------------------------------------------------------------------------------------------
# compute() the way Falkon calls it
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_problem(rng):
    shape = (3, 6, 7)
    M = naive.random_psd(27, rank=15, rng=rng)
    w = naive.random_weights(naive.num_locations(shape, 3, 1, 1), rng=rng)
    X1 = rng.standard_normal((N1, 126))
    X2 = rng.standard_normal((N2, 126))
    return shape, M, w, X1, X2


@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_compute_into_noncontiguous_slice(kind, small_problem):
    shape, M, w, X1, X2 = small_problem
    k = ConvMahalanobisKernel(M, shape, 3, 1, 1, kind, sigma=4.0, weights=w)
    X1t, X2t = torch.from_numpy(X1), torch.from_numpy(X2)
    K_ref = naive.conv_kernel(X1, X2, shape, 3, 1, 1, kind, 4.0, M, w)

    big = torch.full((9, 11), float("nan"), dtype=torch.float64)
    out = big[2 : 2 + N1, 3 : 3 + N2]
    assert not out.is_contiguous()
    res = k.compute(X1t, X2t, out, diag=False)
    assert res.data_ptr() == out.data_ptr()
    assert naive.relative_error(big[2 : 2 + N1, 3 : 3 + N2], K_ref) <= 1e-10
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[2 : 2 + N1, 3 : 3 + N2] = False
    assert torch.isnan(big[mask]).all(), "compute wrote outside its block"

    # a transposed (column-major) view, as Fortran-ordered Falkon buffers are
    big_t = torch.full((11, 9), float("nan"), dtype=torch.float64).T
    out_t = big_t[1 : 1 + N1, :N2]
    k.compute(X1t, X2t, out_t, diag=False)
    assert naive.relative_error(out_t, K_ref) <= 1e-10

    # preallocated contiguous out, and diag into a preallocated vector
    out_c = torch.empty(N1, N2, dtype=torch.float64)
    assert k.compute(X1t, X2t, out_c, diag=False) is out_c
    assert naive.relative_error(out_c, K_ref) <= 1e-10
    d = torch.empty(N2, dtype=torch.float64)
    k.compute(X1t[:N2], X2t, d, diag=True)
    assert naive.relative_error(d, np.diag(K_ref[:N2])) <= 1e-10


@pytest.mark.parametrize("kind", BASE_KERNELS)
def test_float64_blocks_of_float32_kernel(kind, small_problem):
    """Falkon evaluates float32 problems in float64 blocks: a kernel built from float32 M/ω and
    used on float32 data must compute float64 blocks with float64 parameters."""
    shape, _, w, X1, X2 = small_problem
    # Full rank: rounding a rank-deficient M to float32 leaves eigenvalues of ±1e-7·λ_max that
    # as_metric accepts and metric_factor clips to 0, so K would use M₊, not M (by design).
    M32 = torch.from_numpy(naive.random_psd(27, rng=3)).float()
    w32 = torch.from_numpy(w).float()
    k = ConvMahalanobisKernel(M32, shape, 3, 1, 1, kind, sigma=4.0, weights=w32)
    X1_32, X2_32 = torch.from_numpy(X1).float(), torch.from_numpy(X2).float()
    K32 = k.compute(X1_32, X2_32, X1_32.new_empty(N1, N2), diag=False)  # fills the float32 cache
    assert K32.dtype == torch.float32

    out64 = torch.empty(N1, N2, dtype=torch.float64)
    k.compute(X1_32.double(), X2_32.double(), out64, diag=False)
    # reference on the float32 values of data, M and (normalised) ω, in float64
    w_ref = w32.double() / w32.double().sum()
    K_ref = naive.conv_kernel(X1_32, X2_32, shape, 3, 1, 1, kind, 4.0, M32.double(), w_ref)
    assert naive.relative_error(out64, K_ref) <= 1e-10
    assert naive.relative_error(K32, K_ref) <= 1e-5
    # and through Falkon-style slices of a bigger float64 buffer
    big = torch.zeros(N1 + 3, N2 + 2, dtype=torch.float64)
    k.compute(X1_32.double(), X2_32.double(), big[1 : 1 + N1, 2:], diag=False)
    assert naive.relative_error(big[1 : 1 + N1, 2:], K_ref) <= 1e-10


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
SHAPE = (3, 6, 7)
D_ROW = 126


@pytest.fixture
def kernel():
    return ConvMahalanobisKernel(None, SHAPE, 3, 1, 1, "laplace", sigma=2.0)


@pytest.fixture
def data():
    return torch.randn(N1, D_ROW, dtype=torch.float64), torch.randn(N2, D_ROW, dtype=torch.float64)


def test_rows_of_wrong_length(kernel, data):
    X1, X2 = data
    with pytest.raises(ValueError, match=r"rows of length c·H·W = 126"):
        kernel(X1[:, :-1], X2)
    with pytest.raises(ValueError, match=r"X2 has shape \(4, 127\)"):
        kernel.mmv(X1, torch.randn(N2, D_ROW + 1, dtype=torch.float64), torch.randn(N2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"rows of length"):
        kernel(X1.reshape(N1, 3, 42), X2)


def test_patch_larger_than_padded_image():
    with pytest.raises(ValueError, match="larger than the padded image"):
        ConvMahalanobisKernel(None, (1, 4, 9), patch_size=5, padding=0)
    with pytest.raises(ValueError, match="larger than the padded image"):
        ConvMahalanobisKernel(None, (1, 9, 2), patch_size=5, padding=1)
    ConvMahalanobisKernel(None, (1, 9, 3), patch_size=5, padding=1)  # exactly fits


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(patch_size=0), "patch_size must be an integer >= 1"),
        (dict(stride=0), "stride must be an integer >= 1"),
        (dict(padding=-1), "padding must be an integer >= 0"),
        (dict(image_shape=(6, 7)), "image_shape must be"),
    ],
)
def test_bad_geometry(kwargs, match):
    base = dict(M=None, image_shape=SHAPE, patch_size=3)
    with pytest.raises(ValueError, match=match):
        ConvMahalanobisKernel(**{**base, **kwargs})


def test_metric_of_wrong_size():
    with pytest.raises(ValueError, match=r"M must have shape \(d, d\) = \(27, 27\)"):
        ConvMahalanobisKernel(np.eye(9), SHAPE, 3)
    with pytest.raises(ValueError, match=r"M must have shape"):
        ConvMahalanobisKernel(np.ones(27), SHAPE, 3)


def test_metric_not_symmetric(rng):
    M = naive.random_psd(27, rng=rng)
    M[0, 1] += 0.5
    with pytest.raises(ValueError, match="M is not symmetric"):
        ConvMahalanobisKernel(M, SHAPE, 3)


def test_metric_nearly_symmetric_is_accepted(rng):
    M = naive.random_psd(27, rng=rng)
    M[0, 1] += 1e-12
    k = ConvMahalanobisKernel(M, SHAPE, 3)
    assert torch.equal(k.metric, k.metric.T)


def test_metric_indefinite(rng):
    M = naive.random_psd(27, rng=rng)
    M -= 2 * np.linalg.eigvalsh(M)[-1] * np.outer(np.eye(27)[0], np.eye(27)[0])
    with pytest.raises(ValueError, match="M is not positive semi-definite"):
        ConvMahalanobisKernel(M, SHAPE, 3)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        ConvMahalanobisKernel(-np.eye(27), SHAPE, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_metric_not_finite(bad):
    M = np.eye(27)
    M[3, 3] = bad
    with pytest.raises(ValueError, match="M contains NaN or Inf"):
        ConvMahalanobisKernel(M, SHAPE, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_data(kernel, data, bad):
    X1, X2 = data
    X1b, X2b = X1.clone(), X2.clone()
    X1b[2, 5] = bad
    X2b[1, 0] = bad
    with pytest.raises(ValueError, match="X1 contains NaN or Inf"):
        kernel(X1b, X2)
    with pytest.raises(ValueError, match="X2 contains NaN or Inf"):
        kernel(X1, X2b)
    with pytest.raises(ValueError, match="X2 contains NaN or Inf"):
        kernel.mmv(X1, X2b, torch.ones(N2, 1, dtype=torch.float64))
    v = torch.ones(N2, 1, dtype=torch.float64)
    v[0] = bad
    with pytest.raises(ValueError, match="v contains NaN or Inf"):
        kernel.mmv(X1, X2, v)
    with pytest.raises(ValueError, match="X1 contains NaN or Inf"):
        kernel.dmmv(X1b, X2, torch.ones(N2, 1, dtype=torch.float64), None)


def test_mismatched_dtypes(kernel, data):
    X1, X2 = data
    with pytest.raises(TypeError, match=r"dtype mismatch: X1 is torch.float32 but X2 is torch.float64"):
        kernel(X1.float(), X2)
    with pytest.raises(TypeError, match=r"dtype mismatch: X1 is torch.float64 but v is torch.float32"):
        kernel.mmv(X1, X2, torch.ones(N2, 1, dtype=torch.float32))
    with pytest.raises(TypeError, match=r"dtype mismatch: .* w is torch.float32"):
        kernel.dmmv(X1, X2, torch.ones(N2, 1, dtype=torch.float64), torch.ones(N1, 1, dtype=torch.float32))


def test_non_float_data(kernel, data):
    X1, X2 = data
    with pytest.raises(TypeError, match="X1 must be float32 or float64"):
        kernel(X1.to(torch.int64), X2)
    with pytest.raises(TypeError, match="must be a torch.Tensor or numpy.ndarray"):
        kernel(X1.tolist(), X2)


def test_mismatched_devices(kernel, data):
    """Without CUDA the 'meta' device stands in for a second device."""
    X1, X2 = data
    with pytest.raises(ValueError, match="device mismatch: X1 is on cpu but X2 is on meta"):
        kernel(X1, X2.to("meta"))
    with pytest.raises(ValueError, match="device mismatch: X1 is on cpu but v is on meta"):
        kernel.mmv(X1, X2, torch.ones(N2, 1, dtype=torch.float64, device="meta"))


@pytest.mark.parametrize("sigma", [-1.0, 0.0, 0, float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ("laplace", "gaussian"))
def test_bad_sigma(kind, sigma):
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        ConvMahalanobisKernel(None, SHAPE, 3, kernel=kind, sigma=sigma)


def test_unknown_kernel_name():
    with pytest.raises(ValueError, match=r"Unknown base kernel 'matern'.*laplace"):
        ConvMahalanobisKernel(None, SHAPE, 3, kernel="matern")


def test_weights_of_wrong_length():
    P = naive.num_locations(SHAPE, 3, 1, 0)
    with pytest.raises(ValueError, match=rf"one entry per patch location \(P = {P}\), got {P + 1}"):
        ConvMahalanobisKernel(None, SHAPE, 3, weights=np.ones(P + 1))


@pytest.mark.parametrize(
    "make_w",
    [lambda P: -np.ones(P), lambda P: np.r_[-0.5, np.ones(P - 1)], lambda P: np.zeros(P),
     lambda P: np.r_[np.nan, np.ones(P - 1)]],
    ids=["all-negative", "one-negative", "all-zero", "nan"],
)
def test_bad_weights(make_w):
    P = naive.num_locations(SHAPE, 3, 1, 0)
    with pytest.raises(ValueError, match="weights must be finite, non-negative and not all zero"):
        ConvMahalanobisKernel(None, SHAPE, 3, weights=make_w(P))


def test_empty_data(kernel, data):
    X1, X2 = data
    with pytest.raises(ValueError, match="X1 is empty"):
        kernel(X1[:0], X2)
    with pytest.raises(ValueError, match="X2 is empty"):
        kernel.mmv(X1, X2[:0], torch.ones(0, 1, dtype=torch.float64))


def test_numpy_input_returns_tensor(kernel, data):
    X1, X2 = data
    K = kernel(X1.numpy(), X2.numpy())
    assert isinstance(K, torch.Tensor) and K.dtype == torch.float64
    torch.testing.assert_close(K, kernel(X1, X2), rtol=0, atol=0)
    v = np.ones((N2, 1))
    Kv = kernel.mmv(X1.numpy(), X2.numpy(), v)
    assert isinstance(Kv, torch.Tensor)
    torch.testing.assert_close(Kv, K @ torch.from_numpy(v), rtol=1e-12, atol=1e-12)
    KtKv = kernel.dmmv(X1.numpy(), X2.numpy(), v, None)
    assert isinstance(KtKv, torch.Tensor)
    torch.testing.assert_close(KtKv, K.T @ (K @ torch.from_numpy(v)), rtol=1e-12, atol=1e-12)
    K32 = kernel(X1.numpy().astype(np.float32), X2.numpy().astype(np.float32))
    assert K32.dtype == torch.float32


def test_default_options_type():
    k = ConvMahalanobisKernel(None, SHAPE, 3)
    if HAS_FALKON:
        import falkon

        assert isinstance(k, falkon.kernels.Kernel)
        assert isinstance(k.params, falkon.FalkonOptions)
    else:
        assert isinstance(k.params, falkon_convrfm.KernelOptions)


# ---------------------------------------------------------------------------------------------
# The standalone blocked products (used when Falkon is absent; importable either way)
# ---------------------------------------------------------------------------------------------
def test_standalone_blocked_products(rng, monkeypatch):
    from falkon_convrfm._standalone import blocked_dmmv, blocked_mmv, plan_blocks

    shape = (3, 8, 8)
    k = ConvMahalanobisKernel(naive.random_psd(27, rank=20, rng=rng), shape, 3, 1, 0, "gaussian", sigma=5.0)
    X1 = torch.from_numpy(rng.uniform(0, 1, (300, 192)))
    X2 = torch.from_numpy(rng.uniform(0, 1, (200, 192)))
    v = torch.from_numpy(rng.standard_normal((200, 2)))
    w = torch.from_numpy(rng.standard_normal((300, 2)))
    K = k(X1, X2)
    extra = k.extra_mem(False, False, torch.float64)
    # room for ~60 full rows of K(X1, X2) with their temporaries: several blocks either way
    opt = falkon_convrfm.KernelOptions(max_cpu_mem=8.0 * (extra["0"] + 60 * (200 + extra["n"]) + 200 * extra["m"]))

    calls = []
    real = k.compute
    monkeypatch.setattr(k, "compute", lambda a, b, out, diag, **kw: calls.append(a.shape[0]) or real(a, b, out, diag))
    Kv = blocked_mmv(X1, X2, v, kernel=k, opt=opt)
    assert len(calls) > 2
    torch.testing.assert_close(Kv, K @ v, rtol=1e-10, atol=1e-10)
    for vv, ww in ((v, w), (v, None), (None, w)):
        calls.clear()
        out = blocked_dmmv(X1, X2, vv, ww, kernel=k, opt=opt)
        assert len(calls) > 2
        ref = K.T @ ((K @ vv if vv is not None else 0) + (ww if ww is not None else 0))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    with pytest.raises(ValueError, match="memory budget .* is too small"):
        plan_blocks(300, 200, extra, extra["0"] + 10.0)
