"""Deep explicit patch features (deep_features.py) and the low-rank metric pieces of metric.py,
against loop references and the implicit kernel, in float64 on tiny images."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import falkon_convrfm.deep_features as deep_features
from falkon_convrfm.base_kernels import BASE_KERNELS
from falkon_convrfm.deep_features import (DeepPatchFeatureRFM, FeatureLayer, LayerInputs, composite_pooling,
                                          layer_ladder, layer_output, local_pooling, pooled_shape)
from falkon_convrfm.features import PatchFeatureMap, inverse_sqrt
from falkon_convrfm.kernel import ConvMahalanobisKernel
from falkon_convrfm.metric import (patch_covariance, principal_factor, refine_factor, refine_metric, whitening_factor,
                                   whitening_metric)
from falkon_convrfm.models import load_model
from falkon_convrfm.patches import PatchGeometry

SHAPE = (2, 6, 7)


def _data(n=3, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, int(np.prod(shape)), generator=g, dtype=torch.float64)


def _factor(d, r, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, r, generator=g, dtype=torch.float64) / d**0.5


def _layer_map(geometry, factor, atoms, pool, encoding, sigma=2.0, rcond=1e-6):
    return PatchFeatureMap(geometry, factor, atoms, BASE_KERNELS["laplace"], sigma, pool, rcond=rcond,
                           encoding=encoding)


# ---------------------------------------------------------------------------------------------- metric pieces
@pytest.mark.parametrize("rank", [3, 8, None])
def test_whitening_factor_matches_numpy(rank):
    X = _data(40, (1, 3, 3)).reshape(-1, 9) @ _factor(9, 9, 2)
    cov = patch_covariance(X)
    L = whitening_factor(cov, 0.1, rank)
    lam, V = np.linalg.eigh(cov.numpy())
    lam = lam.clip(0) + 0.1 * lam.clip(0).mean()
    order = np.argsort(lam)[::-1][: rank or 9]
    scale = 9 / (1 / lam).sum()
    expected = (V[:, order] * (scale / lam[order])) @ V[:, order].T
    assert L.shape == (9, rank or 9)
    assert np.allclose((L @ L.T).numpy(), expected, atol=1e-10 * np.abs(expected).max())
    if rank is None:
        assert torch.allclose(L @ L.T, whitening_metric(cov, 0.1), atol=1e-10)


def test_principal_factor_projects_on_the_top_directions():
    X = _data(40, (1, 3, 3)).reshape(-1, 9) @ _factor(9, 9, 2)
    cov = patch_covariance(X)
    assert torch.equal(principal_factor(cov, None), torch.eye(9, dtype=torch.float64))
    V = principal_factor(cov, 4)
    lam, U = np.linalg.eigh(cov.numpy())
    assert np.allclose((V @ V.T).numpy(), U[:, -4:] @ U[:, -4:].T, atol=1e-10)


def test_refine_factor_keeps_the_rank_and_gives_refine_metric():
    L, A = _factor(12, 5), _factor(5, 5, 3)
    G = A @ A.T
    for shrinkage in (0.0, 0.3):
        L2 = refine_factor(L, G, 0.5, shrinkage)
        assert L2.shape == (12, 5)
        assert torch.allclose(L2 @ L2.T, refine_metric(L, G, 0.5, shrinkage), atol=1e-12)


# ---------------------------------------------------------------------------------------------- layer math
def test_pooled_shapes_and_composite_pooling():
    assert pooled_shape((6, 5), None) == (6, 5) and pooled_shape((6, 5), 2) == (2, 2)
    assert pooled_shape((6, 5), (3, 2)) == (2, 2) and pooled_shape((7, 7), (2, 2)) == (3, 3)
    assert torch.equal(local_pooling((2, 3), None), torch.eye(6, dtype=torch.float64))
    Pi = composite_pooling((5, 5), (3, 2), 2)  # 2×2 map, 2×2 grid: every region one pooled window
    assert torch.allclose(Pi, local_pooling((5, 5), (3, 2)))
    Pi = composite_pooling((5, 5), (3, 2), 1)
    assert torch.allclose(Pi.sum(1), torch.ones(1, dtype=torch.float64))


def _loop_layer(X, shape, q, padding, factor, atoms, pool, encoding, sigma=2.0):
    """Output maps (n, k, H', W') by loops over images, locations, atoms and pooling windows."""
    c, H, W = shape
    images = F.pad(X.reshape(-1, c, H, W), (padding,) * 4)
    Ho, Wo = H + 2 * padding - q + 1, W + 2 * padding - q + 1
    A = atoms @ factor
    k = atoms.shape[0]
    codes = torch.zeros(X.shape[0], k, Ho, Wo, dtype=torch.float64)
    for i in range(X.shape[0]):
        for a in range(Ho):
            for b in range(Wo):
                u = images[i, :, a : a + q, b : b + q].reshape(-1) @ factor
                z = [float((u - A[j]).norm()) for j in range(k)]
                for j in range(k):
                    codes[i, j, a, b] = (max(0.0, sum(z) / k - z[j]) if encoding == "triangle"
                                         else np.exp(-z[j] / sigma))
    if encoding == "nystrom":
        K = torch.tensor([[np.exp(-float((A[i] - A[j]).norm()) / sigma) for j in range(k)] for i in range(k)],
                         dtype=torch.float64)
        codes = torch.einsum("nkhw,kj->njhw", codes, inverse_sqrt(K))
    if pool is None:
        return codes
    window, stride = pool
    Hp, Wp = (Ho - window) // stride + 1, (Wo - window) // stride + 1
    out = torch.zeros(X.shape[0], k, Hp, Wp, dtype=torch.float64)
    for a in range(Hp):
        for b in range(Wp):
            out[:, :, a, b] = codes[:, :, a * stride : a * stride + window, b * stride : b * stride + window].mean((2, 3))
    return out


@pytest.mark.parametrize("encoding", ["triangle", "nystrom"])
@pytest.mark.parametrize("pool, padding", [((2, 1), 0), ((3, 2), 1), (None, 0)])
def test_layer_output_matches_loops(encoding, pool, padding):
    X = _data()
    geometry = PatchGeometry(SHAPE, 3, 1, padding)
    factor = _factor(geometry.patch_dim, 7)
    atoms = geometry.patches(_data(2, seed=5)).reshape(-1, geometry.patch_dim)[:6]
    fmap = _layer_map(geometry, factor, atoms, local_pooling(geometry.out_shape, pool), encoding)
    out = layer_output(fmap, X, 2**30).reshape(3, 6, *pooled_shape(geometry.out_shape, pool))
    assert torch.allclose(out, _loop_layer(X, SHAPE, 3, padding, factor, atoms, pool, encoding), atol=1e-10)


def test_head_features_are_the_grid_pooled_output_map():
    X = _data()
    geometry = PatchGeometry(SHAPE, 2)
    factor, atoms = _factor(8, 8), geometry.patches(_data(1, seed=4)).reshape(-1, 8)[:5]
    maps = layer_output(_layer_map(geometry, factor, atoms, local_pooling(geometry.out_shape, (2, 1)), "triangle"),
                        X, 2**30).reshape(3, 5, 4, 5)
    head = _layer_map(geometry, factor, atoms, composite_pooling(geometry.out_shape, (2, 1), 2), "triangle")
    grid = torch.stack([maps[:, :, a0:a1, b0:b1].mean((2, 3)) for a0, a1 in ((0, 2), (2, 4))
                        for b0, b1 in ((0, 3), (3, 5))], 1)  # (n, 4 regions, k), numpy.array_split bounds
    assert torch.allclose(head.transform(X), grid.reshape(3, -1), atol=1e-12)


@pytest.mark.parametrize("kernel_pool", ["aligned", "global"])
def test_two_layers_with_a_complete_dictionary_match_the_composed_implicit_kernel(kernel_pool):
    """Layer 2 with the identity metric and every layer-2 patch of the data as an atom (Nyström,
    rcond tiny): its features are the implicit kernel of the layer-1 output maps, pooled alike."""
    X = _data()
    g1 = PatchGeometry(SHAPE, 3)
    layer1 = _layer_map(g1, _factor(g1.patch_dim, 6), g1.patches(_data(2, seed=5)).reshape(-1, g1.patch_dim)[:4],
                        local_pooling(g1.out_shape, (2, 1)), "triangle")
    Z = layer_output(layer1, X, 2**30)
    shape2 = (4, *pooled_shape(g1.out_shape, (2, 1)))  # (4, 3, 4)
    g2 = PatchGeometry(shape2, 2)  # a 2×3 grid of layer-2 locations
    atoms = g2.patches(Z).reshape(-1, g2.patch_dim)
    identity = torch.eye(g2.patch_dim, dtype=torch.float64)
    grid = 1 if kernel_pool == "global" else 2  # 2: a 2×2 grid of the 2×3 locations, regions of 1–2 locations
    head = _layer_map(g2, identity, atoms, composite_pooling(g2.out_shape, None, grid), "nystrom", 1.5, 1e-14)
    # the chained feature map: the frozen layer's output maps, then the head (as the estimator streams them)
    Phi = LayerInputs(X, [layer1], 2**30).transform(head)
    P = g2.num_locations
    if kernel_pool == "global":
        wide = 2 * max(g2.out_shape) + 1
        expected = ConvMahalanobisKernel(identity, shape2, 2, sigma=1.5, pool_window=wide)(Z, Z) / P
    else:
        Pi = composite_pooling(g2.out_shape, None, grid)
        T = g2.patches(Z)
        expected = torch.zeros(3, 3, dtype=torch.float64)
        W = Pi.T @ Pi
        for i in range(3):
            for j in range(3):
                expected[i, j] = (W * BASE_KERNELS["laplace"].pairs(T[i].unsqueeze(1), T[j].unsqueeze(0), 1.5)).sum()
    assert torch.allclose(Phi @ Phi.T, expected, atol=1e-8, rtol=0)


def test_layer_inputs_held_and_streamed_agree():
    X = _data(7)
    geometry = PatchGeometry(SHAPE, 3)
    fmap = _layer_map(geometry, _factor(18, 5), geometry.patches(X[:1]).reshape(-1, 18)[:4],
                      local_pooling(geometry.out_shape, (2, 1)), "triangle")
    held, streamed = LayerInputs(X, [fmap], 2**30), LayerInputs(X, [fmap], 1)
    assert held.held is not None and streamed.held is None and streamed.step == 1
    assert torch.allclose(held.all(), streamed.all(), atol=1e-14)
    index = torch.tensor([5, 1, 2])
    assert torch.allclose(held.take(index), streamed.take(index), atol=1e-14)


# ---------------------------------------------------------------------------------------------- estimator
def _images(n=120, seed=0):
    """Two classes: a bright vertical bar left or right in noise (HWC uint8)."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 120, size=(n, 12, 12, 3)).astype(np.uint8)
    y = rng.integers(0, 2, size=n)
    for i in range(n):
        X[i, :, 2 if y[i] == 0 else 9] = 250
    return X, y


LAYERS = [FeatureLayer(3, 0, 12, None, (2, 2), 1), FeatureLayer(3, 0, 16, 20, None, 2)]
PARAMS = dict(layers=LAYERS, pooling=2, agop_samples=30, dtype="float64", random_state=0, progress=False)


def test_estimator_fits_scores_and_round_trips(tmp_path):
    X, y = _images()
    model = DeepPatchFeatureRFM(**PARAMS).fit(X[:100], y[:100])
    assert model.shapes_ == [(3, 12, 12), (12, 5, 5), (16, 3, 3)]
    assert [f.shape for f in model.factors_] == [(27, 27), (108, 20)]
    assert [len(h) for h in model.history_] == [2, 3]
    assert model.score(X[100:], y[100:]) >= 0.9
    pred = model.predict(X[100:])
    assert isinstance(pred, np.ndarray) and pred.shape == (20,)
    assert model.transform(X[:4], 1).shape == (4, 12 * 25) and model.transform(X[:4], 0).shape == (4, 3 * 144)
    metric = model.learned_metric(1)
    assert metric.metrics[metric.best].shape == (108, 108) and metric.image_shape == (12, 5, 5)
    model.save(tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")  # weights-only file
    assert isinstance(loaded, DeepPatchFeatureRFM) and np.array_equal(loaded.predict(X[100:]), pred)
    assert np.allclose(loaded.decision_function(X[100:]), model.decision_function(X[100:]), atol=0)


def test_tied_iterates_are_named_by_layer():
    X, y = _images()
    with pytest.warns(UserWarning, match=r"^layer 1: iterations 0, 1, 2 tie at val_accuracy 1\.0000"):
        DeepPatchFeatureRFM(**PARAMS).fit(X[:100], y[:100])


def test_estimator_streams_the_maps_within_a_small_budget(monkeypatch):
    """A budget below the layer-1 maps of the training rows: they are recomputed chunk by chunk
    (more layer passes), and the model is the same (same patch sample: SAMPLE_PATCHES below both caps)."""
    X, y = _images(60)
    monkeypatch.setattr(deep_features, "SAMPLE_PATCHES", 20)
    passes = []
    compute = LayerInputs._compute
    monkeypatch.setattr(LayerInputs, "_compute", lambda self, rows: (passes.append(rows.shape[0]), compute(self, rows))[1])
    held = DeepPatchFeatureRFM(**PARAMS).fit(X, y)
    held_passes, passes[:] = len(passes), []
    streamed = DeepPatchFeatureRFM(**{**PARAMS, "max_memory": 100_000}).fit(X, y)
    assert len(passes) > held_passes and max(passes) < 54
    assert torch.allclose(held.coef_, streamed.coef_, atol=1e-10)


def test_resume_after_a_kill_gives_the_same_model(tmp_path, monkeypatch):
    X, y = _images(80)
    whole = DeepPatchFeatureRFM(**PARAMS).fit(X, y)
    calls = []
    refine = deep_features.refine_factor

    def killed(*args):
        calls.append(1)
        if len(calls) == 3:  # layer 1's second update: layer 0 and layer 1's first iteration are checkpointed
            raise KeyboardInterrupt
        return refine(*args)

    monkeypatch.setattr(deep_features, "refine_factor", killed)
    with pytest.raises(KeyboardInterrupt):
        DeepPatchFeatureRFM(checkpoint_dir=tmp_path, **PARAMS).fit(X, y)
    calls.clear()
    monkeypatch.setattr(deep_features, "refine_factor", lambda *a: (calls.append(1), refine(*a))[1])
    resumed = DeepPatchFeatureRFM(checkpoint_dir=tmp_path, **PARAMS).fit(X, y)
    assert len(calls) == 1  # only the update that was killed is redone
    assert all(torch.equal(a, b) for a, b in zip(whole.factors_, resumed.factors_))
    assert torch.equal(whole.coef_, resumed.coef_) and whole.history_[1][-1]["val_accuracy"] == resumed.history_[1][-1]["val_accuracy"]


@pytest.mark.parametrize("params, message", [
    (dict(layers=[dict(n_atoms=0)]), "n_atoms must be an integer >= 1"),
    (dict(layers=[dict(), dict(rank=0)]), r"layers\[1\]: rank must be an integer >= 1"),
    (dict(layers=[dict(pool=(3, 5))]), "stride 5 is larger than the window 3"),
    (dict(layers=[dict(widht=3)]), "widht"),
    (dict(layers=[]), "layers is empty"),
    (dict(layers="deep"), "layers must be a sequence of FeatureLayer"),
    (dict(pooling=(3, 2)), "pooling must be an integer >= 1"),
    (dict(metric="dc"), "metric"),
    (dict(layers=[dict(pool=(3, 2)), dict(patch_size=6)]), r"layers\[1\]: its 6×6 patches do not fit its 4×4 input map"),
    (dict(layers=[dict(pool=(3, 2)), dict(patch_size=3)], pooling=3), r"layers\[1\] on its 4×4 input map: a 3×3 pooling grid"),
    (dict(layers=[dict(n_atoms=100_000)]), r"layers\[0\].n_atoms=100000 is more than the"),
    (dict(sigma=2.0), "encoding='triangle' has no kernel or bandwidth"),
])
def test_bad_parameters_are_one_line(params, message):
    X, y = _images(30)
    with pytest.raises((ValueError, TypeError), match=message) as info:
        DeepPatchFeatureRFM(**{"progress": False, **params}).fit(X, y)
    assert "\n" not in str(info.value)


def test_ladder_and_preset():
    layers = layer_ladder(3, 64, 128)
    assert [s.pool for s in layers] == [(3, 2), (3, 2), None] and {s.n_atoms for s in layers} == {64}
    model = DeepPatchFeatureRFM.preset("cifar10")
    assert model.device == "cpu" and len(model.layers) >= 2
    assert DeepPatchFeatureRFM.preset("cifar10", pooling=3).pooling == 3


def test_neural_collapse_per_layer_on_the_output_maps():
    from falkon_convrfm.collapse import nc1, nc2

    X, y = _images(60)
    model = DeepPatchFeatureRFM(**PARAMS).fit(X, y)
    for depth in (0, 1, 2):
        H = model.transform(X, depth)
        assert np.isfinite(nc1(H, y)) and np.isfinite(nc2(H, y))
    assert nc1(model.transform(X, 2), y) < nc1(model.transform(X, 0), y)  # the bar's side separates with depth
    with pytest.raises(ValueError, match="depth=3 is more than the 2 layers"):
        model.transform(X, 3)

