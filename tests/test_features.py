"""Explicit pooled patch features (features.py), the whitening metric and its refinement (metric.py),
and the PatchFeatureRFM estimator, against brute-force references in float64."""
import numpy as np
import pytest
import torch

from falkon_convrfm.base_kernels import BASE_KERNELS
from falkon_convrfm.feature_rfm import PatchFeatureRFM, flip_rows
from falkon_convrfm.features import (PatchFeatureMap, RidgeStatistics, add_upper_gram_, atom_kernel, inverse_sqrt,
                                     kmeans_atoms, mirror_upper_, pooling_matrix, triangle_code)
from falkon_convrfm.kernel import ConvMahalanobisKernel
from falkon_convrfm.metric import metric_factor, patch_covariance, refine_metric, whitening_metric
from falkon_convrfm.patches import PatchGeometry
from falkon_convrfm.validation import check_pooling

SHAPE = (2, 5, 6)


def _data(n=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, int(np.prod(SHAPE)), generator=g, dtype=dtype)


def _metric(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A @ A.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _naive_pooled(X, geometry, M, base, sigma, pool):
    """Σ_r Σ_{p,p'} Π_rp Π_rp' κ_M(x_p, z_p') by loops over image pairs."""
    L = metric_factor(M)
    T = geometry.patches(X) @ L  # (n, P, r)
    W = pool.T @ pool  # pair weights
    n = X.shape[0]
    K = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            U, V = T[i].unsqueeze(1).expand(-1, T.shape[1], -1), T[j].unsqueeze(0).expand(T.shape[1], -1, -1)
            K[i, j] = (W * base.pairs(U, V, sigma)).sum()
    return K


def _complete_map(X, geometry, M, kernel, sigma, pooling):
    atoms = geometry.patches(X).reshape(-1, geometry.patch_dim)
    pool = pooling_matrix(geometry.out_shape, pooling)
    return PatchFeatureMap(geometry, metric_factor(M), atoms, BASE_KERNELS[kernel], sigma, pool, rcond=1e-14), pool


@pytest.mark.parametrize("kernel", ["laplace", "gaussian", "ntk"])
@pytest.mark.parametrize("pooling", [1, 2, (2, 1), (3, 2)])
def test_complete_dictionary_gives_the_pooled_kernel(kernel, pooling):
    geometry = PatchGeometry(SHAPE, 3)
    X = _data()
    M = _metric(geometry.patch_dim)
    fmap, pool = _complete_map(X, geometry, M, kernel, 2.5, pooling)
    F = fmap.transform(X)
    expected = _naive_pooled(X, geometry, M, BASE_KERNELS[kernel], 2.5, pool)
    assert torch.allclose(F @ F.T, expected, atol=1e-8 * expected.abs().max(), rtol=0)


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_complete_dictionary_matches_the_implicit_kernel(kernel):
    """Single-location regions give P × the aligned kernel; global pooling gives the all-pairs
    implicit pooled kernel (pool_window ≥ 2·grid) divided by P."""
    geometry = PatchGeometry(SHAPE, 3, padding=1)
    X = _data()
    M = _metric(geometry.patch_dim)
    P = geometry.num_locations
    aligned = ConvMahalanobisKernel(M, SHAPE, 3, padding=1, kernel=kernel, sigma=2.0)(X, X)
    fmap, _ = _complete_map(X, geometry, M, kernel, 2.0, (1, 1))
    F = fmap.transform(X)
    assert torch.allclose(F @ F.T, P * aligned, atol=1e-8, rtol=0)
    wide = 2 * max(geometry.out_shape) + 1
    global_pool = ConvMahalanobisKernel(M, SHAPE, 3, padding=1, kernel=kernel, sigma=2.0, pool_window=wide)(X, X)
    fmap, _ = _complete_map(X, geometry, M, kernel, 2.0, 1)
    F = fmap.transform(X)
    assert torch.allclose(F @ F.T, global_pool / P, atol=1e-8, rtol=0)


def test_float32_features_agree_with_float64():
    geometry = PatchGeometry(SHAPE, 3)
    X = _data(5)
    M = _metric(geometry.patch_dim)
    F64 = _complete_map(X[:2], geometry, M, "laplace", 3.0, 2)[0].transform(X)
    fmap, _ = _complete_map(X[:2], geometry, M, "laplace", 3.0, 2)
    fmap32 = PatchFeatureMap(geometry, fmap.factor.float(), fmap.atoms.float(), fmap.base, 3.0, fmap.pool.float())
    F32 = fmap32.transform(X.float())
    K64, K32 = F64 @ F64.T, (F32 @ F32.T).double()
    assert (K64 - K32).abs().max() <= 1e-4 * K64.abs().max()


def test_chunks_do_not_change_the_features():
    geometry = PatchGeometry(SHAPE, 3)
    X = _data(7)
    fmap, _ = _complete_map(X[:2], geometry, _metric(geometry.patch_dim), "laplace", 3.0, 2)
    whole = fmap.transform(X, max_mem=2**30)
    assert fmap.rows_per_chunk(1) == 1
    assert torch.allclose(fmap.transform(X, max_mem=1), whole, atol=1e-12, rtol=0)


def test_chunk_memory_stays_within_the_budget():
    geometry = PatchGeometry((3, 32, 32), 6)
    atoms = torch.randn(256, geometry.patch_dim)
    fmap = PatchFeatureMap(geometry, torch.eye(geometry.patch_dim), atoms, BASE_KERNELS["laplace"], 5.0,
                           pooling_matrix(geometry.out_shape, 2))
    per_row = geometry.num_locations * (256 + geometry.patch_dim + 2) * 4
    for budget in (2**20, 2**24, 2**28):
        assert fmap.rows_per_chunk(budget) * per_row <= max(budget, per_row)


def test_pooling_matrix_regions():
    quadrants = pooling_matrix((5, 5), 2)
    assert quadrants.shape == (4, 25)
    assert torch.allclose(quadrants.sum(1), torch.ones(4, dtype=torch.float64))
    assert (quadrants > 0).sum(1).tolist() == [9, 6, 6, 4]  # rows/cols split 3 + 2
    windows = pooling_matrix((8, 8), (5, 3))
    assert windows.shape == (4, 64) and ((windows > 0).sum(1) == 25).all()
    assert torch.allclose(pooling_matrix((4, 4), 1), torch.full((1, 16), 1 / 16, dtype=torch.float64))


@pytest.mark.parametrize("bad, message", [
    (0, "pooling must be an integer >= 1"),
    ((3, 4), "stride 4 is larger than the window 3"),
    ((3,), "pooling must be an int g"),
])
def test_bad_pooling_is_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as info:
        check_pooling(bad)
    assert "\n" not in str(info.value)


def test_pooling_wider_than_grid_is_refused():
    with pytest.raises(ValueError, match="wider than the 3×3 grid"):
        pooling_matrix((3, 3), (5, 1))
    with pytest.raises(ValueError, match="at least 4 patch locations"):
        pooling_matrix((3, 3), 4)


def test_whitening_metric_matches_numpy():
    g = torch.Generator().manual_seed(3)
    patches = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = patch_covariance(patches)
    P = patches.numpy()
    ref_cov = np.cov(P, rowvar=False, bias=True)
    assert np.allclose(cov.numpy(), ref_cov, atol=1e-12)
    eps = 0.1
    ref = np.linalg.inv(ref_cov + eps * np.trace(ref_cov) / 6 * np.eye(6))
    ref *= 6 / np.trace(ref)
    assert np.allclose(whitening_metric(cov, eps).numpy(), ref, atol=1e-10)
    # eps = 0: the whitened patches have identity covariance (up to the trace normalisation)
    L = metric_factor(whitening_metric(cov, 0.0))
    white = patch_covariance(patches @ L)
    assert torch.allclose(white / white[0, 0], torch.eye(6, dtype=torch.float64), atol=1e-8)


def test_whitening_errors():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        whitening_metric(torch.eye(3), -1.0)
    with pytest.raises(ValueError, match="singular"):
        whitening_metric(torch.diag(torch.tensor([1.0, 0.0, 0.0])), 0.0)
    with pytest.raises(ValueError, match="covariance is 0 .* constant images"):  # any eps: nothing to whiten
        whitening_metric(torch.zeros(3, 3), 0.1)


def test_refine_metric_keeps_or_replaces():
    L = metric_factor(_metric(4))
    G = _metric(4, seed=5)
    assert torch.allclose(refine_metric(L, G, 0.5, 1.0), L @ L.T, atol=1e-12)
    inner = torch.linalg.eigh(G)
    root = (inner.eigenvectors * inner.eigenvalues.sqrt()) @ inner.eigenvectors.T
    expected = L @ (4 * root / torch.trace(root)) @ L.T
    assert torch.allclose(refine_metric(L, G, 0.5, 0.0), expected, atol=1e-10)


def _autograd_agop(U, pooled_features, W):
    """(1/n) Σ_{i,p,o} g gᵀ, g = ∂(Φ(U_i)·W)_o / ∂u_{ip} by autograd: Φ as a function of the transformed
    patches U (n, P, r), each patch independent; ``pooled_features`` maps U to (n, R, k)."""
    U = U.detach().requires_grad_(True)
    out = pooled_features(U).reshape(U.shape[0], -1) @ W
    G = torch.zeros(U.shape[-1], U.shape[-1], dtype=torch.float64)
    for o in range(out.shape[1]):
        grad, = torch.autograd.grad(out[:, o].sum(), U, retain_graph=True)
        flat = grad.reshape(-1, grad.shape[-1])
        G += flat.T @ flat
    return G / U.shape[0]


@pytest.mark.parametrize("kernel", ["laplace", "gaussian", "ntk"])
@pytest.mark.parametrize("pooling", [2, (2, 1)])
def test_feature_agop_matches_autograd(kernel, pooling):
    geometry = PatchGeometry(SHAPE, 3)
    X = _data(4)
    M = _metric(geometry.patch_dim)
    g = torch.Generator().manual_seed(7)
    atoms = torch.randn(10, geometry.patch_dim, generator=g, dtype=torch.float64)
    fmap = PatchFeatureMap(geometry, metric_factor(M), atoms, BASE_KERNELS[kernel], 2.0,
                           pooling_matrix(geometry.out_shape, pooling))
    W = torch.randn(fmap.num_features, 3, generator=g, dtype=torch.float64)
    G_t = fmap.transformed_agop(X, W)
    U = geometry.transformed_patches(X, fmap.factor).transpose(0, 1).contiguous()  # (n, P, r)

    def nystrom_features(U):
        codes = BASE_KERNELS[kernel].pairs(U.unsqueeze(2), fmap.atoms_t.view(1, 1, *fmap.atoms_t.shape), 2.0)
        return torch.matmul(torch.matmul(fmap.pool, codes), fmap.projector)

    G_ref = _autograd_agop(U, nystrom_features, W)
    assert torch.allclose(G_t, G_ref, atol=1e-10 * G_ref.abs().max(), rtol=0)


def _naive_triangle(U, A):
    """max(0, mean_l z_l − z_j) by loops over patches and atoms."""
    out = torch.zeros(*U.shape[:-1], A.shape[0], dtype=torch.float64)
    for idx in np.ndindex(*U.shape[:-1]):
        z = torch.stack([torch.linalg.norm(U[idx] - a) for a in A])
        out[idx] = (z.mean() - z).clamp_min(0)
    return out


def test_triangle_code_matches_loops():
    g = torch.Generator().manual_seed(3)
    U = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    A = torch.randn(6, 4, generator=g, dtype=torch.float64)
    codes = triangle_code(U, A)
    assert torch.allclose(codes, _naive_triangle(U, A), atol=1e-12)
    assert (codes == 0).any() and (codes > 0).any()


@pytest.mark.parametrize("pooling", [2, (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triangle_features_and_agop_match_autograd(pooling, dtype):
    """Pooled triangle codes vs the loop reference; their patch AGOP vs autograd through the codes."""
    geometry = PatchGeometry(SHAPE, 3)
    X = _data(4)
    M = _metric(geometry.patch_dim)
    g = torch.Generator().manual_seed(7)
    atoms = torch.randn(10, geometry.patch_dim, generator=g, dtype=torch.float64)
    pool = pooling_matrix(geometry.out_shape, pooling)
    fmap = PatchFeatureMap(geometry, metric_factor(M), atoms, None, None, pool, encoding="triangle")
    U = geometry.transformed_patches(X, fmap.factor).transpose(0, 1).contiguous()  # (n, P, r)
    expected = torch.matmul(pool, _naive_triangle(U, fmap.atoms_t)).reshape(X.shape[0], -1)
    low = PatchFeatureMap(geometry, metric_factor(M).to(dtype), atoms.to(dtype), None, None, pool.to(dtype),
                          encoding="triangle")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(low.transform(X.to(dtype)).double(), expected, atol=tol * expected.abs().max(), rtol=0)
    W = torch.randn(fmap.num_features, 3, generator=g, dtype=torch.float64)
    G_t = fmap.transformed_agop(X, W)
    G_ref = _autograd_agop(U, lambda U: torch.matmul(pool, triangle_code(U, fmap.atoms_t)), W)
    assert torch.allclose(G_t, G_ref, atol=1e-10 * G_ref.abs().max(), rtol=0)


def test_unknown_encoding_is_refused():
    geometry = PatchGeometry(SHAPE, 3)
    atoms = torch.randn(4, geometry.patch_dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="encoding 'sparse' is not one of nystrom, triangle"):
        PatchFeatureMap(geometry, torch.eye(geometry.patch_dim, dtype=torch.float64), atoms, None, None,
                        pooling_matrix(geometry.out_shape, 1), encoding="sparse")


def test_atom_kernel_matches_direct_formula():
    g = torch.Generator().manual_seed(2)
    U = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    A = torch.randn(4, 5, generator=g, dtype=torch.float64)
    for name, base in BASE_KERNELS.items():
        ref = base.pairs(U.unsqueeze(2), A.view(1, 1, 4, 5), 1.5)
        assert torch.allclose(atom_kernel(U, A, base, 1.5), ref, atol=1e-12), name


def test_inverse_sqrt():
    K = _metric(5)
    R = inverse_sqrt(K)
    assert torch.allclose(R @ K @ R, torch.eye(5, dtype=torch.float64), atol=1e-10)


def test_ridge_statistics_solve_matches_lstsq():
    g = torch.Generator().manual_seed(4)
    F = torch.randn(50, 6, generator=g, dtype=torch.float64) + 3.0
    Y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    W, b = RidgeStatistics.of(F, Y, rows_per_chunk=7).solve(0.0 + 1e-12)
    A = torch.cat([F, torch.ones(50, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(A, Y).solution
    assert torch.allclose(W, ref[:6], atol=1e-8) and torch.allclose(b, ref[6], atol=1e-8)


@pytest.mark.parametrize("D, block", [(7, 3), (8, 8), (13, 4), (5, 9)])
def test_block_upper_gram_equals_the_full_product(D, block):
    g = torch.Generator().manual_seed(D)
    X1, X2 = torch.randn(2, 11, D, generator=g, dtype=torch.float64)
    gram = torch.zeros(D, D, dtype=torch.float64)
    add_upper_gram_(gram, X1, block)
    add_upper_gram_(gram, X2, block)
    mirror_upper_(gram, block)
    assert torch.allclose(gram, X1.T @ X1 + X2.T @ X2, atol=1e-12)


def test_kmeans_finds_the_clusters_in_the_metric_coordinates():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    labels = torch.arange(300) % 3
    patches = centres[labels] + 0.5 * torch.randn(300, 2, generator=g, dtype=torch.float64)
    starts = torch.stack([patches[labels == j][0] for j in range(3)])  # one start in each cluster
    atoms = kmeans_atoms(torch.cat([starts, patches]), torch.eye(2, dtype=torch.float64), 3, 10)
    for j in range(3):
        assert torch.allclose(atoms[j], patches[labels == j].mean(0), atol=0.1)
    # a metric that ignores the second coordinate clusters by the first only; atom 3 starts where
    # atom 0 does, loses every tie and keeps its place
    flat = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    points = torch.tensor([[0.0, 0.0], [9.0, 1.0], [100.0, 0.0], [0.0, 0.0], [0.0, 5.0], [9.0, 3.0]], dtype=torch.float64)
    atoms = kmeans_atoms(points, flat, 4, 5)
    expected = [[0.0, 5 / 3], [9.0, 2.0], [100.0, 0.0], [0.0, 0.0]]
    assert torch.allclose(atoms, torch.tensor(expected, dtype=torch.float64))


def test_flip_rows():
    X = torch.arange(12.0).reshape(1, 12)
    flipped = flip_rows(X, (1, 3, 4)).reshape(3, 4)
    assert flipped[0].tolist() == [3.0, 2.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------- estimator
def _images(n=120, seed=0):
    """Two classes: a bright vertical bar left or right in noise (HWC uint8)."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 120, size=(n, 12, 12, 3)).astype(np.uint8)
    y = rng.integers(0, 2, size=n)
    for i in range(n):
        col = 2 if y[i] == 0 else 9
        X[i, :, col] = 250
    return X, y


def test_estimator_fits_scores_and_round_trips(tmp_path):
    X, y = _images()
    model = PatchFeatureRFM(patch_size=3, n_atoms=32, iterations=1, agop_samples=30, random_state=0, progress=False)
    model.fit(X[:100], y[:100])
    assert len(model.history_) == 2 and model.best_iteration_ in (0, 1)
    assert model.score(X[100:], y[100:]) >= 0.9
    pred = model.predict(X[100:])
    assert isinstance(pred, np.ndarray) and pred.shape == (20,)
    model.save(tmp_path / "m.pt")
    loaded = PatchFeatureRFM.load(tmp_path / "m.pt")
    assert np.array_equal(loaded.predict(X[100:]), pred)


def test_estimator_with_a_kmeans_dictionary():
    X, y = _images()
    params = dict(patch_size=3, n_atoms=16, iterations=0, random_state=0, progress=False)
    kmeans = PatchFeatureRFM(dictionary="kmeans", **params).fit(X[:100], y[:100])
    random = PatchFeatureRFM(**params).fit(X[:100], y[:100])
    assert kmeans.atoms_.shape == random.atoms_.shape and not torch.equal(kmeans.atoms_, random.atoms_)
    assert kmeans.score(X[100:], y[100:]) >= 0.9


def test_estimator_flip_doubles_training_rows():
    X, y = _images(60)
    model = PatchFeatureRFM(patch_size=3, n_atoms=16, pooling=2, iterations=0, augment="flip", random_state=0, progress=False)
    model.fit(X, y)
    assert model.history_[0]["features"] == 4 * 16
    assert model.history_[0]["train_rows"] == 2 * 54  # 60 images, 6 validate (unflipped)


def test_estimator_resumes_from_checkpoint(tmp_path):
    X, y = _images(80)
    params = dict(patch_size=3, n_atoms=16, iterations=1, agop_samples=20, random_state=0, progress=False)
    a = PatchFeatureRFM(checkpoint_dir=tmp_path, **params).fit(X, y)
    b = PatchFeatureRFM(checkpoint_dir=tmp_path, **params).fit(X, y)  # resumes: nothing left to do
    assert torch.equal(a.M_, b.M_) and torch.equal(a.coef_, b.coef_)


@pytest.mark.parametrize("param, value, message", [
    ("n_atoms", 0, "n_atoms must be an integer >= 1"),
    ("whiten_eps", -1.0, "whiten_eps"),
    ("pooling", (3, 5), "stride 5 is larger than the window 3"),
    ("metric", "zca", "metric"),
    ("augment", "crop", "augment"),
    ("dictionary", "sparse", "dictionary"),
])
def test_estimator_bad_parameters_are_one_line(param, value, message):
    X, y = _images(20)
    with pytest.raises(ValueError, match=message) as info:
        PatchFeatureRFM(**{param: value}, progress=False).fit(X, y)
    assert "\n" not in str(info.value)


def test_fit_refuses_features_beyond_the_memory_limit(monkeypatch):
    import falkon_convrfm.feature_rfm as feature_rfm

    X, y = _images(60)
    params = dict(patch_size=3, n_atoms=8, pooling=2, iterations=1, random_state=0, progress=False)
    # 48 train + 12 validation rows × 32 features float32, and two 32² float64 matrices: 24 064 bytes
    with pytest.raises(ValueError, match=r"needs 0\.0 GiB \(60 × 32 features .* the max_memory is") as info:
        PatchFeatureRFM(**params, max_memory=24_000).fit(X, y)
    assert "\n" not in str(info.value)
    assert PatchFeatureRFM(**params, max_memory=200_000).fit(X, y).predict(X).shape == (60,)
    monkeypatch.setattr(feature_rfm, "machine_memory", lambda device: (1000.0, "available CPU memory"))
    with pytest.raises(ValueError, match="the available CPU memory is 0.0 GiB: lower n_atoms or pooling"):
        PatchFeatureRFM(**params).fit(X, y)


def test_triangle_encoding_has_no_kernel_or_bandwidth():
    with pytest.raises(ValueError, match="encoding='triangle' has no kernel or bandwidth"):
        PatchFeatureRFM(sigma=2.0).fit(*_images(20))
    X, y = _images(60)
    model = PatchFeatureRFM(patch_size=3, n_atoms=8, iterations=1, random_state=0, progress=False).fit(X, y)
    assert model.sigma_ is None and model.feature_map_.projector is None
    assert model.predict(X).shape == (60,)


def test_preset_parameters_and_overrides():
    model = PatchFeatureRFM.preset("cifar10", iterations=0)
    assert model.iterations == 0 and model.metric == "whiten" and model.device == "cpu"
    assert PatchFeatureRFM.preset("cifar10", device="cuda").n_atoms > model.n_atoms
    with pytest.raises(ValueError, match="unknown preset 'imagenet'; presets: cifar10"):
        PatchFeatureRFM.preset("imagenet")


def test_estimator_warns_about_few_locations_and_names_constant_images():
    X, y = _images(60)
    with pytest.warns(UserWarning, match=r"patch_size=3, stride=20 leave 1 patch location"):
        PatchFeatureRFM(patch_size=3, stride=20, n_atoms=8, pooling=1, iterations=0, random_state=0,
                        progress=False).fit(X, y)
    with pytest.warns(UserWarning, match="constant images"), \
            pytest.raises(ValueError, match="median patch-to-atom distance of the training images is 0"):
        PatchFeatureRFM(patch_size=3, n_atoms=8, metric="identity", encoding="nystrom", iterations=0,
                        progress=False).fit(0 * X, y)
    with pytest.warns(UserWarning, match="constant images"), \
            pytest.raises(ValueError, match="every feature takes one value on all training images"):
        PatchFeatureRFM(patch_size=3, n_atoms=8, metric="identity", iterations=0, progress=False).fit(0 * X, y)
    with pytest.warns(UserWarning, match="constant images"), pytest.raises(ValueError, match="nothing to whiten"):
        PatchFeatureRFM(patch_size=3, n_atoms=8, iterations=0, progress=False).fit(0 * X, y)
