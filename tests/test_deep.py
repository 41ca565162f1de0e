"""Deep ConvRFM / Deep RFM (falkon_convrfm.deep) and the neural-collapse metrics (collapse.py).

Feature maps are checked against a direct computation that does not use ``F.conv2d`` or
``F.avg_pool2d``: explicit ``unfold`` + matmul + ReLU + block-mean pooling, in float64.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import falkon_convrfm.rfm as rfm_module
import naive
from falkon_convrfm import ConvMahalanobisKernel
from falkon_convrfm.collapse import nc1, nc2
from falkon_convrfm.deep import DeepConvRFM, DeepRFM, LayerSpec, conv_feature_map, map_rows, random_conv_filters


pytestmark = pytest.mark.usefixtures("one_thread")


class SimulatedKill(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Direct reference for one feature map
# ---------------------------------------------------------------------------------------------
def direct_feature_map(images, filters, q, stride, padding, nonlinearity, pool):
    """pool(φ(W · unfold(x))) with explicit unfold, matmul and block-mean pooling (float64)."""
    images = images.double()
    n, c, H, W = images.shape
    k = filters.shape[0]
    cols = F.unfold(images, q, padding=padding, stride=stride)  # (n, d, P)
    Ho = (H + 2 * padding - q) // stride + 1
    Wo = (W + 2 * padding - q) // stride + 1
    out = (filters.double().reshape(k, -1) @ cols).reshape(n, k, Ho, Wo)
    if nonlinearity == "relu":
        out = out.clamp_min(0)
    if pool and pool > 1:
        hp, wp = Ho // pool, Wo // pool
        out = out[:, :, : hp * pool, : wp * pool].reshape(n, k, hp, pool, wp, pool).mean((3, 5))
    return out


def rel_err(result, reference) -> float:
    result, reference = torch.as_tensor(result).double(), torch.as_tensor(reference).double()  # numpy or torch
    assert result.shape == reference.shape, (result.shape, reference.shape)
    scale = reference.abs().max().item()
    return (result - reference).abs().max().item() / (scale if scale > 0 else 1.0)


# ---------------------------------------------------------------------------------------------
# random_conv_filters
# ---------------------------------------------------------------------------------------------
def test_random_conv_filters_identity_is_Z():
    c, q, k = 2, 3, 7
    d = c * q * q
    W = random_conv_filters(torch.eye(d, dtype=torch.float64), c, q, k, torch.Generator().manual_seed(5))
    assert W.shape == (k, c, q, q) and W.dtype == torch.float64
    Z = torch.randn(k, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / math.sqrt(k)
    assert rel_err(W, Z.reshape(k, c, q, q)) <= 1e-14


def test_random_conv_filters_are_Z_times_root_M():
    c, q, k = 1, 3, 5
    d = c * q * q
    A = torch.randn(d, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    M = A @ A.T  # rank-deficient
    W = random_conv_filters(M, c, q, k, torch.Generator().manual_seed(2))
    Z = torch.randn(k, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / math.sqrt(k)
    evals, evecs = torch.linalg.eigh(M)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    assert rel_err(W.reshape(k, d), Z @ root) <= 1e-6  # sqrt of round-off eigenvalues ~1e-8


def test_random_conv_filters_feature_ansatz():
    """WᵀW → M as the width grows (E[WᵀW] = M)."""
    c, q, k = 1, 3, 20000
    d = c * q * q
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    M = A @ A.T
    M = M * d / torch.trace(M)
    W = random_conv_filters(M, c, q, k, torch.Generator().manual_seed(4)).reshape(k, d)
    err = torch.linalg.matrix_norm(W.T @ W - M) / torch.linalg.matrix_norm(M)
    assert err.item() < 0.05


# ---------------------------------------------------------------------------------------------
# conv_feature_map / map_rows
# ---------------------------------------------------------------------------------------------
MAP_CASES = [
    LayerSpec(patch_size=3, stride=1, padding=1, width=4, nonlinearity="relu", pool=2),
    LayerSpec(patch_size=2, stride=2, padding=0, width=3, nonlinearity="none", pool=None),
    LayerSpec(patch_size=3, stride=1, padding=0, width=5, nonlinearity="relu", pool=3),  # 5×6 → 1×2 (floor)
]


@pytest.mark.parametrize("spec", MAP_CASES, ids=lambda s: f"q{s.patch_size}s{s.stride}p{s.padding}-{s.nonlinearity}-pool{s.pool}")
def test_feature_map_matches_direct(spec):
    g = torch.Generator().manual_seed(0)
    c, H, W = 2, 7, 8
    images = torch.randn(6, c, H, W, generator=g, dtype=torch.float64)
    filters = torch.randn(spec.width, c, spec.patch_size, spec.patch_size, generator=g, dtype=torch.float64)
    ref = direct_feature_map(images, filters, spec.patch_size, spec.stride, spec.padding, spec.nonlinearity, spec.pool)
    out = conv_feature_map(images, filters, spec)
    assert rel_err(out, ref) <= 1e-12

    rows = images.reshape(6, -1)
    mapped, shape = map_rows(rows, (c, H, W), filters, spec)
    assert shape == tuple(ref.shape[1:])
    assert mapped.shape == (6, int(np.prod(shape)))
    assert rel_err(mapped, ref.reshape(6, -1)) <= 1e-12
    chunked, shape2 = map_rows(rows, (c, H, W), filters, spec, max_memory=1)  # one image per chunk
    assert shape2 == shape
    assert torch.equal(chunked, mapped)
    # float32 rows: filters are cast, output float32
    m32, _ = map_rows(rows.float(), (c, H, W), filters, spec, max_memory=3000)
    assert m32.dtype == torch.float32 and rel_err(m32, mapped) <= 1e-5


def test_map_rows_pool_too_large():
    spec = LayerSpec(patch_size=3, width=2, pool=8)
    filters = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="pool"):
        map_rows(torch.zeros(2, 64, dtype=torch.float64), (1, 8, 8), filters, spec)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(nonlinearity="tanh"), "nonlinearity"), (dict(pool=0), "pool"), (dict(pool=1.5), "pool"), (dict(width=0), "width")],
)
def test_layer_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerSpec(**kwargs)


def test_defaults_come_from_convrfm():
    """One source of defaults: LayerSpec's ConvRFM fields and the deep models' shared parameters
    take ConvRFM's defaults."""
    import inspect

    from falkon_convrfm import ConvRFM

    conv = {k: p.default for k, p in inspect.signature(ConvRFM.__init__).parameters.items() if k != "self"}
    spec = LayerSpec()
    for name in ("patch_size", "stride", "padding", "pool_window", "kernel", "sigma", "iterations", "agop_samples",
                 "agop_power", "dc_weight"):
        assert getattr(spec, name) == conv[name], name
    for cls in (DeepConvRFM, DeepRFM):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name in conv and name not in ("kernel", "sigma", "iterations", "agop_samples"):  # DeepRFM's own
                assert p.default == conv[name], (cls.__name__, name)


# ---------------------------------------------------------------------------------------------
# Two-layer DeepConvRFM with fixed metrics (0 ConvRFM iterations: M_ℓ = I)
# ---------------------------------------------------------------------------------------------
# σ and DC handling pinned (pre-issue-10 defaults): these tests are about the feature maps.
L1 = dict(patch_size=3, stride=1, padding=1, width=4, nonlinearity="relu", pool=2, sigma=1.0, iterations=0,
          dc_weight=None)
L2 = dict(patch_size=3, stride=1, padding=1, width=3, nonlinearity="relu", pool=2, sigma=1.0, iterations=0,
          dc_weight=None)
# The final kernel is gaussian: the check below compares kernel values at coincident patches
# (K(x, x)) to 1e-10, which laplace through GEMM distances does not reach (√(round-off) ≈ 1e-8,
# the same issue as tests/test_kernel.py::test_symmetric_block_matches_naive[laplace-*]).
FINAL = dict(patch_size=2, kernel="gaussian", iterations=0, sigma=1.0, dc_weight=None)


def load_digit_images(n, classes=(0, 1, 2)):
    data = load_digits()
    keep = np.flatnonzero(np.isin(data.target, classes))[:n]
    return (data.images[keep] / 16.0)[:, None].astype(np.float64), data.target[keep].astype(np.int64)


def deep_model(**overrides):
    """Raw pixels (preprocess=None, the pre-issue-10 default): the direct references below map them."""
    params = dict(layers=(LayerSpec(**L1), LayerSpec(**L2)), final=FINAL, penalty=1e-3, solver="exact",
                  dtype="float64", random_state=3, progress=False, preprocess=None)
    params.update(overrides)
    return DeepConvRFM(**params)


@pytest.fixture(scope="module")
def deep_fixed():
    X, y = load_digit_images(45)
    return deep_model().fit(X, y), X, y


def test_deep_fixed_metrics_filters(deep_fixed):
    model, X, y = deep_fixed
    assert len(model.filters_) == len(model.metrics_) == 2
    assert torch.equal(model.metrics_[0], torch.eye(9, dtype=torch.float64))
    assert torch.equal(model.metrics_[1], torch.eye(4 * 9, dtype=torch.float64))
    # W_ℓ = Z_ℓ (M = I), drawn in layer order from one generator seeded with random_state
    g = torch.Generator().manual_seed(3)
    Z1 = torch.randn(4, 9, generator=g, dtype=torch.float64) / 2.0
    Z2 = torch.randn(3, 36, generator=g, dtype=torch.float64) / math.sqrt(3)
    assert model.filters_[0].shape == (4, 1, 3, 3) and model.filters_[1].shape == (3, 4, 3, 3)
    assert rel_err(model.filters_[0], Z1.reshape(4, 1, 3, 3)) <= 1e-14
    assert rel_err(model.filters_[1], Z2.reshape(3, 4, 3, 3)) <= 1e-14
    assert model.feature_shapes_ == [(1, 8, 8), (4, 4, 4), (3, 2, 2)]
    assert model.image_shape_ == (1, 8, 8)


def test_deep_fixed_transform_matches_direct(deep_fixed):
    model, X, y = deep_fixed
    x = torch.from_numpy(X[:8])
    h1 = direct_feature_map(x, model.filters_[0], 3, 1, 1, "relu", 2)
    h2 = direct_feature_map(h1, model.filters_[1], 3, 1, 1, "relu", 2)
    assert rel_err(model.transform(X[:8], depth=1), h1.reshape(8, -1)) <= 1e-12
    assert rel_err(model.transform(X[:8]), h2.reshape(8, -1)) <= 1e-12
    assert np.array_equal(model.transform(X[:8], depth=0), X[:8].reshape(8, -1))  # numpy in → numpy out


def test_deep_fixed_final_kernel_matches_naive(deep_fixed):
    model, X, y = deep_fixed
    x = torch.from_numpy(X[:6])
    h2 = direct_feature_map(direct_feature_map(x, model.filters_[0], 3, 1, 1, "relu", 2),
                            model.filters_[1], 3, 1, 1, "relu", 2).reshape(6, -1)
    final = model.final_
    assert final.image_shape_ == (3, 2, 2)
    assert torch.equal(final.M_, torch.eye(12, dtype=torch.float64))
    feats = model.transform(X[:6])
    K = final.kernel_(feats, feats)
    assert final.kernel_.base_kernel == "gaussian"
    K_ref = naive.conv_kernel(h2, h2, (3, 2, 2), 2, 1, 0, "gaussian", final.sigma_, M=np.eye(12))
    assert naive.relative_error(K, K_ref) <= 1e-10
    K_pkg = ConvMahalanobisKernel(None, (3, 2, 2), 2, kernel="gaussian", sigma=final.sigma_)(h2, h2)
    assert naive.relative_error(K, K_pkg) <= 1e-10
    # predictions: the final ConvRFM on the direct features
    assert torch.allclose(model.decision_function(x), final.decision_function(h2), rtol=0, atol=1e-12)


def test_deep_first_map_is_plain_random_convolution():
    """M = I and φ = none, no pooling: the first map is conv2d(x, Z)."""
    X, y = load_digit_images(30)
    spec = LayerSpec(patch_size=3, stride=2, padding=1, width=5, nonlinearity="none", pool=None, sigma=1.0,
                     iterations=0, dc_weight=None)
    model = deep_model(layers=(spec,), final=dict(patch_size=1, iterations=0, sigma=1.0, dc_weight=None),
                       random_state=11).fit(X, y)
    Z = torch.randn(5, 9, generator=torch.Generator().manual_seed(11), dtype=torch.float64) / math.sqrt(5)
    x = torch.from_numpy(X)
    expected = F.conv2d(x, Z.reshape(5, 1, 3, 3), stride=2, padding=1)
    assert model.feature_shapes_[1] == tuple(expected.shape[1:]) == (5, 4, 4)
    assert rel_err(model.transform(X), expected.reshape(len(X), -1)) <= 1e-12


def test_deep_learned_metric_filters():
    """With ConvRFM iterations, W_ℓ = Z M_ℓ^{1/2} with the learned M_ℓ."""
    X, y = load_digit_images(45)
    spec = dict(L1, iterations=1, agop_samples=30)
    model = deep_model(layers=(LayerSpec(**spec),), final=dict(FINAL, patch_size=1), random_state=4).fit(X, y)
    M = model.metrics_[0]
    assert torch.trace(M).item() == pytest.approx(9.0)
    assert model.history_[0]["best_iteration"] in (0, 1)
    expected = random_conv_filters(M, 1, 3, 4, torch.Generator().manual_seed(4))
    assert torch.equal(model.filters_[0], expected)
    assert [rec["layer"] for rec in model.history_] == [0, "final"]
    for key in ("convrfm_history", "time_layer", "peak_rss_gb", "input_shape"):
        assert key in model.history_[0]
    assert model.history_[0]["output_shape"] == (4, 4, 4)


def test_deep_save_load_round_trip(deep_fixed, tmp_path):
    model, X, y = deep_fixed
    path = tmp_path / "deep.pt"
    model.save(path)
    loaded = DeepConvRFM.load(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.filters_, model.filters_))
    assert np.array_equal(loaded.transform(X), model.transform(X))
    assert np.array_equal(loaded.decision_function(X), model.decision_function(X))
    assert np.array_equal(loaded.predict(X), model.predict(X))
    assert loaded.score(X, y) == model.score(X, y)
    with pytest.raises(ValueError, match="DeepConvRFM"):
        DeepRFM.load(path)


def test_deep_transform_before_fit():
    with pytest.raises(RuntimeError, match="not fitted"):
        deep_model().transform(np.zeros((2, 1, 8, 8)))


def test_deep_resume_after_kill_between_layers(tmp_path, monkeypatch):
    """Kill during layer 1 (layer 0 saved), resume: filters equal an uninterrupted fit."""
    X, y = load_digit_images(45)
    reference = deep_model().fit(X, y)

    original = DeepConvRFM._layer_rfm

    def dying(self, spec, index, shape):
        if index == 1:
            raise SimulatedKill("killed in layer 1")
        return original(self, spec, index, shape)

    monkeypatch.setattr(DeepConvRFM, "_layer_rfm", dying)
    with pytest.raises(SimulatedKill):
        deep_model(checkpoint_dir=str(tmp_path)).fit(X, y)
    monkeypatch.setattr(DeepConvRFM, "_layer_rfm", original)
    resumed = deep_model(checkpoint_dir=str(tmp_path)).fit(X, y)
    assert torch.equal(resumed.filters_[0], reference.filters_[0])
    assert torch.equal(resumed.filters_[1], reference.filters_[1])  # fails: generator out of step
    assert np.allclose(resumed.decision_function(X), reference.decision_function(X))


def test_deep_checkpoint_of_other_parameters_is_refused(tmp_path):
    X, y = load_digit_images(45)
    layers = (LayerSpec(**dict(L1, iterations=1, agop_samples=30)),)
    final = dict(FINAL, patch_size=1)
    deep_model(layers=layers, final=final, penalty=1e-3, checkpoint_dir=str(tmp_path)).fit(X, y)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"deep_state.pt is the checkpoint of another fit \(made with other "
                       r"parameters: penalty 0.001 there, 0.1 now\)"):
        deep_model(layers=layers, final=final, penalty=1e-1, checkpoint_dir=str(tmp_path)).fit(X, y)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files  # every checkpoint intact


def test_deep_without_validation_split():
    X, y = load_digit_images(30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No validation data: the last iterate is kept"
        model = deep_model(validation_fraction=0.0).fit(X, y)
    assert model.predict(X).shape == (30,)


# ---------------------------------------------------------------------------------------------
# DeepRFM on vectors
# ---------------------------------------------------------------------------------------------
def load_digit_vectors(n):
    data = load_digits()
    return (data.data[:n] / 16.0).astype(np.float64), data.target[:n].astype(np.int64)


def deep_rfm(**overrides):
    """Raw features (preprocess=None, the pre-issue-10 default): the transform test maps them directly."""
    params = dict(widths=(32,), iterations=1, agop_samples=100, penalty=1e-3, solver="exact", dtype="float64",
                  random_state=0, progress=False, preprocess=None)
    params.update(overrides)
    return DeepRFM(**params)


@pytest.fixture(scope="module")
def rfm_vectors():
    X, y = load_digit_vectors(300)
    return deep_rfm().fit(X, y), X, y


def test_deep_rfm_fit_predict_transform(rfm_vectors):
    model, X, y = rfm_vectors
    assert model.image_shape_ == (64, 1, 1)
    assert model.feature_shapes_ == [(64, 1, 1), (32, 1, 1)]
    assert model.filters_[0].shape == (32, 64, 1, 1)
    H = model.transform(X)
    assert H.shape == (300, 32)
    assert (H >= 0).all()  # ReLU features
    W = model.filters_[0].reshape(32, 64)
    assert rel_err(H, (torch.from_numpy(X) @ W.T).clamp_min(0)) <= 1e-12
    assert model.transform(X, depth=0).shape == (300, 64)
    pred = model.predict(X)
    assert pred.shape == (300,)
    assert set(pred.tolist()) <= set(range(10))
    assert model.decision_function(X).shape == (300, 10)
    assert model.score(X, y) > 0.9
    with pytest.raises(ValueError, match="vectors"):
        model.transform(X[:, :, None])


def test_deep_rfm_checkpoint_resume(tmp_path, monkeypatch):
    X, y = load_digit_vectors(200)
    first = deep_rfm(widths=(16, 8), checkpoint_dir=str(tmp_path)).fit(X, y)
    assert (tmp_path / "deep_state.pt").exists()
    assert (tmp_path / "layer0").is_dir() and (tmp_path / "final").is_dir()

    calls = {"agop": 0, "layer": 0}
    original_agop, original_layer = rfm_module.patch_agop, DeepConvRFM._layer_rfm

    def counting_agop(*args, **kwargs):
        calls["agop"] += 1
        return original_agop(*args, **kwargs)

    def counting_layer(self, *args, **kwargs):
        calls["layer"] += 1
        return original_layer(self, *args, **kwargs)

    monkeypatch.setattr(rfm_module, "patch_agop", counting_agop)
    monkeypatch.setattr(DeepConvRFM, "_layer_rfm", counting_layer)
    second = deep_rfm(widths=(16, 8), checkpoint_dir=str(tmp_path)).fit(X, y)
    assert calls == {"agop": 0, "layer": 0}, "the second fit should load every layer and the final state"
    for a, b in zip(first.filters_, second.filters_):
        assert torch.equal(a, b)
    assert np.array_equal(first.decision_function(X), second.decision_function(X))
    # and both equal a fit without checkpoints
    plain = deep_rfm(widths=(16, 8)).fit(X, y)
    assert all(torch.equal(a, b) for a, b in zip(plain.filters_, first.filters_))
    assert np.array_equal(plain.decision_function(X), first.decision_function(X))


def test_deep_rfm_save_load(rfm_vectors, tmp_path):
    model, X, y = rfm_vectors
    model.save(tmp_path / "rfm.pt")
    loaded = DeepRFM.load(tmp_path / "rfm.pt")
    assert loaded.widths == model.widths
    assert np.array_equal(loaded.predict(X), model.predict(X))


def test_deep_rfm_rejects_images():
    with pytest.raises(ValueError, match="vectors"):
        deep_rfm().fit(np.zeros((10, 8, 8)), np.arange(10) % 2)


# ---------------------------------------------------------------------------------------------
# Neural collapse
# ---------------------------------------------------------------------------------------------
def test_nc1_collapsed_features_is_zero():
    means = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 3.0, 0.0], [0.5, 0.5, -2.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    H = means[y]
    assert nc1(H, y) == 0.0


def test_nc1_hand_computed():
    # class 0: (0,0), (0,1), (0,2) → mean (0,1), squared deviations 1, 0, 1
    # class 1: (4,1)                → mean (4,1), deviation 0
    # Σ_W: (1 + 0 + 1 + 0)/4 = 0.5. Mean of class means μ_G = (2, 1) (unweighted by class
    # size): Σ_B = (4 + 4)/2 = 4. NC1 = 0.5 / 4 = 0.125.
    H = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [4.0, 1.0]])
    y = np.array([0, 0, 0, 1])
    assert nc1(H, y) == pytest.approx(0.125, rel=1e-12)
    # labels need not be contiguous or sorted
    assert nc1(H[::-1].copy(), np.array([9, 5, 5, 5])) == pytest.approx(0.125, rel=1e-12)


def test_nc2_simplex_etf_is_zero():
    C = 4
    etf = torch.eye(C, dtype=torch.float64) - 1.0 / C  # centred simplex vertices in R^C
    rot, _ = torch.linalg.qr(torch.randn(C, C, dtype=torch.float64))
    means = 3.0 * etf @ rot + torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=torch.float64)  # rotated, scaled, shifted
    y = torch.arange(C).repeat_interleave(3)
    H = means[y]  # exactly collapsed
    assert nc2(H, y) == pytest.approx(0.0, abs=1e-12)
    # noise around the ETF means leaves the class means on the ETF only approximately
    noisy = means[y] + 0.01 * torch.randn(len(y), C, dtype=torch.float64)
    assert 0 < nc2(noisy, y) < 0.05
    # two classes: centred means are always antipodal, a 2-simplex
    assert nc2(torch.tensor([[0.0, 1.0], [3.0, 5.0]]), torch.tensor([0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_nc2_hand_computed():
    # class means (1,0), (-1,0), (0,3): mean (0,1); centred (1,-1), (-1,-1), (0,2);
    # unit vectors (1,-1)/√2, (-1,-1)/√2, (0,1). Gram G = [[1,0,-a],[0,1,-a],[-a,-a,1]], a = 1/√2,
    # ‖G‖_F² = 3 + 4a² = 5. ETF Gram E = (3/2)(I − 11ᵀ/3): 1 on the diagonal, −1/2 off it,
    # ‖E‖_F² = 3 + 6/4 = 4.5.
    a = 1 / math.sqrt(2)
    G = np.array([[1, 0, -a], [0, 1, -a], [-a, -a, 1]])
    E = np.array([[1, -0.5, -0.5], [-0.5, 1, -0.5], [-0.5, -0.5, 1]])
    expected = np.linalg.norm(G / math.sqrt(5) - E / math.sqrt(4.5))
    H = np.array([[1.0, 0.5], [1.0, -0.5], [-1.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    y = np.array([0, 0, 1, 2, 2])
    assert nc2(H, y) == pytest.approx(expected, rel=1e-12)
    assert expected > 0.1


def test_collapse_errors():
    H = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(ValueError, match="2 classes"):
        nc1(H, np.zeros(6, dtype=int))
    with pytest.raises(ValueError, match="2 classes"):
        nc2(H, np.zeros(6, dtype=int))
    with pytest.raises(ValueError, match="labels"):
        nc1(H, np.array([0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="labels"):
        nc2(H[:, 0], np.array([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="labels"):
        nc1(H, np.zeros((6, 2), dtype=int))


def test_collapse_of_deep_features_runs(rfm_vectors):
    model, X, y = rfm_vectors
    H = model.transform(X)
    assert nc1(H, y) > 0
    assert 0 <= nc2(H, y) < 2


# ---------------------------------------------------------------------------------------------
# Local pooling and the data-adaptive defaults in deep models
# ---------------------------------------------------------------------------------------------
def test_deep_pool_window_per_layer_and_final(tmp_path):
    X, y = load_digit_images(45)
    layer = dict(L1, iterations=1, agop_samples=30)
    final = dict(FINAL, patch_size=1)
    # penalty 0.1: the box-window pooled kernel is not PSD in general (4×4 final maps here);
    # no validation split: each layer keeps its last (updated) metric
    common = dict(penalty=0.1, validation_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No validation data: the last iterate is kept"
        pooled = deep_model(layers=(LayerSpec(**layer, pool_window=3),), final=dict(final, pool_window=3),
                            **common).fit(X, y)
        aligned = deep_model(layers=(LayerSpec(**layer),), final=final, **common).fit(X, y)
    assert pooled.final_.kernel_.pool_window == 3 and aligned.final_.kernel_.pool_window == 1
    assert not torch.equal(pooled.metrics_[0], aligned.metrics_[0])  # the layer's AGOP saw the window
    pooled.save(tmp_path / "deep.pt")
    loaded = DeepConvRFM.load(tmp_path / "deep.pt")
    assert loaded.layers[0].pool_window == 3 and loaded.final_.kernel_.pool_window == 3
    assert np.array_equal(loaded.decision_function(X), pooled.decision_function(X))


def test_deep_preprocesses_once_with_default_settings():
    """Default preprocess='standardize': the input images are standardised once; the layers'
    ConvRFMs see feature maps as they are, and their σ and DC weight come from the data."""
    X, y = load_digit_images(45)
    model = DeepConvRFM(layers=(LayerSpec(patch_size=3, width=4, iterations=0),), final=dict(iterations=0),
                        solver="exact", dtype="float64", random_state=0, progress=False).fit(X, y)
    assert model.preprocessor_ is not None and model.final_.preprocessor_ is None
    assert model.final_.sigma == "median" and model.final_.sigma_ > 0
    assert [rec["dc_weight"] for rec in model.history_] == [None, model.final_.dc_weight_]


def test_data_warnings_come_once_from_the_deep_model():
    """The layers' ConvRFMs, fitted on the same split, do not repeat the warnings about the data."""
    X, y = load_digit_images(45)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        deep_model().fit(X, y)
    messages = [str(w.message) for w in record]
    assert len([m for m in messages if "leaves 4 of the 45 images for validation, fewer than 100" in m]) == 1
    assert not [m for m in messages if m.startswith("X_val has")]
