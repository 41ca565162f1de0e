"""ConvRFM estimator: exact vs Falkon, checkpoint resume, persistence, input handling, errors,
and the metric in the estimator (the update itself is tested in test_metric.py).

All fits are tiny (≤ 100 images of 1×8×8, 3×3 patches) and use ``solver='exact'`` unless the
test is about Falkon.
"""
from __future__ import annotations

import math
import warnings
import re
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import falkon_convrfm.rfm as rfm_module
from conftest import requires_falkon
from falkon_convrfm import ConvRFM
from falkon_convrfm.persistence import CheckpointMismatch
from falkon_convrfm.metric import dc_direction, fixed_metric

class SimulatedKill(Exception):
    pass


TIME_KEYS = ("time_fit", "time_eval", "time_agop", "time_update")



pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_small_digits(n: int):
    """n sklearn digits of classes {0, 1, 2}, as (n, 1, 8, 8) float64 in [0, 1], and labels."""
    data = load_digits()
    keep = np.flatnonzero(data.target < 3)[:n]
    X = (data.images[keep] / 16.0)[:, None].astype(np.float64)
    return X, data.target[keep].astype(np.int64)


@pytest.fixture(scope="module")
def digits():
    return load_small_digits(60)


def small(**overrides):
    """A fast ConvRFM configuration (exact solver, float64, 2 metric updates); σ, preprocessing
    and DC handling pinned (to the pre-issue-10 defaults) so that these tests do not follow the
    data-adaptive defaults, which have tests of their own below."""
    params = dict(patch_size=3, kernel="laplace", sigma=2.0, penalty=1e-3, iterations=2, agop_samples=60,
                  solver="exact", dtype="float64", random_state=0, progress=False, preprocess=None, dc_weight=None)
    params.update(overrides)
    return ConvRFM(**params)


@pytest.fixture(scope="module")
def fitted(digits):
    X, y = digits
    return small().fit(X, y)


def _history_without_times(history):
    return [{k: v for k, v in rec.items() if k not in TIME_KEYS} for rec in history]


# ---------------------------------------------------------------------------------------------
# Exact solver vs Falkon with every training point as a centre
# ---------------------------------------------------------------------------------------------
@requires_falkon
def test_exact_and_falkon_learn_the_same_metric():
    """Falkon with n_centres ≥ n solves the same ridge problem as the exact solver (penalty
    conventions agree), so the learned metrics agree to CG precision."""
    X, y = load_small_digits(100)
    common = dict(iterations=2, penalty=1e-3, agop_samples=200)
    exact = small(solver="exact", **common).fit(X, y)
    falk = small(solver="falkon", n_centres=1000, maxiter=200, **common).fit(X, y)
    assert len(exact.metrics_) == len(falk.metrics_) == 3
    for Me, Mf in zip(exact.metrics_, falk.metrics_):
        torch.testing.assert_close(Mf, Me, rtol=1e-5, atol=1e-5 * Me.abs().max().item())
    torch.testing.assert_close(falk.M_, exact.M_, rtol=1e-5, atol=1e-5 * exact.M_.abs().max().item())
    # the predictors agree too (every training row is a centre in both)
    assert falk.centres_.shape == exact.centres_.shape
    s_e, s_f = exact.decision_function(X), falk.decision_function(X)
    assert np.abs(s_e - s_f).max() <= 1e-5 * np.abs(s_e).max()  # numpy in → numpy out


# ---------------------------------------------------------------------------------------------
# Checkpoints: kill and resume
# ---------------------------------------------------------------------------------------------
def test_kill_and_resume_equals_uninterrupted(digits, tmp_path, monkeypatch):
    X, y = digits
    params = dict(iterations=3)
    reference = small(**params).fit(X, y)

    original = rfm_module.patch_agop
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SimulatedKill("simulated kill during the 2nd AGOP")
        return original(*args, **kwargs)

    monkeypatch.setattr(rfm_module, "patch_agop", dying)
    with pytest.raises(SimulatedKill):
        small(checkpoint_dir=str(tmp_path), **params).fit(X, y)
    assert (tmp_path / rfm_module.CHECKPOINT_NAME).exists()

    # resume, unpatched except for a call counter: only the remaining AGOPs run
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(rfm_module, "patch_agop", counting)
    resumed = small(checkpoint_dir=str(tmp_path), **params).fit(X, y)
    assert counted["n"] == 2, "the resumed fit should start at iteration 1, not from scratch"

    assert len(resumed.metrics_) == len(reference.metrics_) == 4
    for Mr, Mu in zip(resumed.metrics_, reference.metrics_):
        assert (Mr - Mu).abs().max().item() <= 1e-12 * Mu.abs().max().item()
    assert (resumed.M_ - reference.M_).abs().max().item() <= 1e-12 * reference.M_.abs().max().item()
    assert resumed.best_iteration_ == reference.best_iteration_
    assert _history_without_times(resumed.history_) == _history_without_times(reference.history_)
    assert np.allclose(resumed.decision_function(X), reference.decision_function(X), rtol=0, atol=1e-12)


def test_checkpoint_of_another_fit_is_refused_and_left_intact(digits, tmp_path, monkeypatch):
    X, y = digits
    small(iterations=1, checkpoint_dir=str(tmp_path)).fit(X, y)
    path = tmp_path / rfm_module.CHECKPOINT_NAME
    saved = path.read_bytes()
    # other parameters: refused before any work (the data is not even read)
    monkeypatch.setattr(ConvRFM, "_prepare", lambda *a, **k: pytest.fail("prepared data before the refusal"))
    with pytest.raises(CheckpointMismatch, match=r"checkpoint_dir='.*': .* is the checkpoint of another fit "
                       r"\(made with other parameters: penalty 0.001 there, 0.01 now\); use another checkpoint_dir, "
                       r"or remove the folder"):
        small(iterations=1, penalty=1e-2, checkpoint_dir=str(tmp_path)).fit(X, y)
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatch, match=r"\(made with other data\)"):  # other data: refused too
        small(iterations=1, checkpoint_dir=str(tmp_path)).fit(X[:-10], y[:-10])
    assert path.read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ---------------------------------------------------------------------------------------------
# Persistence, prediction API, input formats
# ---------------------------------------------------------------------------------------------
def test_save_load_round_trip(fitted, digits, tmp_path):
    X, y = digits
    path = tmp_path / "convrfm.pt"
    fitted.save(path)
    loaded = ConvRFM.load(path)
    assert torch.equal(loaded.M_, fitted.M_)
    assert np.array_equal(loaded.decision_function(X), fitted.decision_function(X))
    assert np.array_equal(loaded.predict(X), fitted.predict(X))
    assert loaded.score(X, y) == fitted.score(X, y)
    assert loaded.best_iteration_ == fitted.best_iteration_
    assert loaded.get_params() == fitted.get_params()


def test_load_rejects_other_class(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"class": "DeepConvRFM", "params": {}, "fitted": {}}, path)
    with pytest.raises(ValueError, match="DeepConvRFM"):
        ConvRFM.load(path)


def test_prediction_shapes(fitted, digits):
    X, y = digits
    n = X.shape[0]
    scores = fitted.decision_function(X)
    assert scores.shape == (n, 3)
    pred = fitted.predict(X)
    assert pred.shape == (n,)
    assert set(pred.tolist()) <= {0, 1, 2}
    assert np.array_equal(pred, fitted.classes_[scores.argmax(1)])
    acc = fitted.score(X, y)
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx((pred == y).mean())
    assert fitted.task_ == "classification"
    assert fitted.image_shape_ == (1, 8, 8)
    assert fitted.M_.shape == (9, 9)


def test_history_and_best_iteration(fitted):
    h = fitted.history_
    T = fitted.iterations
    assert [rec["iteration"] for rec in h] == list(range(T + 1))
    assert len(fitted.metrics_) == T + 1
    assert torch.equal(fitted.metrics_[0], torch.eye(9, dtype=torch.float64))
    for rec in h:
        for key in ("train_accuracy", "val_accuracy", "spectrum", "time_fit", "time_eval", "sigma", "penalty"):
            assert key in rec, key
        assert 0 <= rec["train_accuracy"] <= 1 and 0 <= rec["val_accuracy"] <= 1
        assert {"top_eigenvalues", "effective_rank", "dc_share", "trace"} <= set(rec["spectrum"])
        assert rec["spectrum"]["trace"] == pytest.approx(9.0)
    for rec in h[:-1]:  # every iteration that is followed by a metric update
        for key in ("time_agop", "time_update", "location_share"):
            assert key in rec, key
        assert rec["time_agop"] >= 0 and rec["time_update"] >= 0
        assert len(rec["location_share"]) == 36
    val = [rec["val_accuracy"] for rec in h]
    assert fitted.best_iteration_ == int(np.argmax(val))
    assert torch.equal(fitted.M_, fitted.metrics_[fitted.best_iteration_])


def test_non_contiguous_labels(digits):
    X, y = digits
    keep = y < 2
    labels = np.where(y[keep] == 0, 3, 7)
    model = small(iterations=1).fit(X[keep], labels)
    assert model.classes_.tolist() == [3, 7]
    pred = model.predict(X[keep])
    assert set(pred.tolist()) <= {3, 7}
    assert model.score(X[keep], labels) == pytest.approx((pred == labels).mean())
    assert model.score(X[keep], labels) > 0.9


def test_regression_targets(digits):
    X, _ = digits
    rng = np.random.default_rng(0)
    target = X[:, 0, 2:5, 2:5].mean((1, 2)) + 0.01 * rng.standard_normal(X.shape[0])
    model = small(iterations=1, penalty=1e-4).fit(X, target)
    assert model.task_ == "regression"
    assert model.classes_ is None
    pred = model.predict(X)
    assert pred.shape == (X.shape[0],) and pred.dtype == np.float64
    r2 = 1 - ((pred - target) ** 2).sum() / ((target - target.mean()) ** 2).sum()
    assert model.score(X, target) == pytest.approx(r2, rel=1e-10)
    assert r2 > 0.5
    assert "val_r2" in model.history_[0] and "train_mse" in model.history_[0]


def test_input_formats_agree(digits, fitted):
    """channels_last images, flat rows with image_shape, torch and numpy input: same model."""
    X, y = digits
    ref_scores = fitted.decision_function(X)

    nhwc = np.ascontiguousarray(X.transpose(0, 2, 3, 1))
    cl = small(channels_last=True).fit(nhwc, y)
    assert cl.image_shape_ == (1, 8, 8)
    assert torch.equal(cl.M_, fitted.M_)
    assert np.allclose(cl.decision_function(nhwc), ref_scores, rtol=0, atol=1e-12)

    flat = X.reshape(X.shape[0], -1)
    fl = small(image_shape=(1, 8, 8)).fit(flat, y)
    assert torch.equal(fl.M_, fitted.M_)
    assert np.allclose(fl.decision_function(flat), ref_scores, rtol=0, atol=1e-12)

    tt = small().fit(torch.from_numpy(X), torch.from_numpy(y))
    assert torch.equal(tt.M_, fitted.M_)
    assert torch.allclose(tt.decision_function(torch.from_numpy(X)), torch.from_numpy(ref_scores), rtol=0, atol=1e-12)

    grey = small().fit(X[:, 0], y)  # (n, H, W) grey images
    assert grey.image_shape_ == (1, 8, 8)
    assert torch.equal(grey.M_, fitted.M_)


def test_explicit_validation_data(digits):
    X, y = digits
    model = small(iterations=1).fit(X[:45], y[:45], X_val=X[45:], y_val=y[45:])
    # iteration 0's validation accuracy is that of the fixed-kernel model on X_val
    fixed = small(iterations=0).fit(X[:45], y[:45], X_val=X[45:], y_val=y[45:])
    assert model.history_[0]["val_accuracy"] == pytest.approx(fixed.score(X[45:], y[45:]), abs=1e-12)
    assert model.centres_.shape[0] == 45  # the exact solver uses all training rows


def test_no_validation_keeps_last_iterate(digits):
    X, y = digits
    with pytest.warns(UserWarning, match="No validation data"):
        model = small(iterations=2, validation_fraction=0.0).fit(X, y)
    assert model.best_iteration_ == 2
    assert "val_accuracy" not in model.history_[0]


def test_float32_fit(digits):
    X, y = digits
    model = small(dtype="float32", iterations=1).fit(X, y)
    assert model.alpha_.dtype == torch.float32
    assert model.decision_function(X).dtype == np.float32
    assert model.M_.dtype == torch.float64
    assert torch.isfinite(model.M_).all()


@pytest.mark.parametrize("kernel", ["gaussian", "ntk"])
def test_other_base_kernels_fit(digits, kernel):
    X, y = digits
    model = small(kernel=kernel, iterations=1, sigma=1.0).fit(X, y)
    assert torch.isfinite(model.M_).all()
    assert torch.trace(model.M_).item() == pytest.approx(9.0)
    assert model.score(X, y) > 0.8


def test_tune_and_median_sigma(digits):
    X, y = digits
    model = small(iterations=0, tune=True, sigma="median", sigma_grid=(0.5, 2.0), penalty_grid=(1.0, 10.0)).fit(X, y)
    assert len(model.tuning_) == 4
    sigmas = sorted({rec["sigma"] for rec in model.tuning_})
    base = sigmas[0] / 0.5
    assert base > 0 and math.isfinite(base)
    assert sigmas == pytest.approx([0.5 * base, 2.0 * base])
    assert sorted({rec["penalty"] for rec in model.tuning_}) == pytest.approx([1e-3, 1e-2])
    best = max(model.tuning_, key=lambda rec: rec["val_accuracy"])
    assert model.history_[0]["val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert model.sigma_ in sigmas and model.kernel_.sigma == model.sigma_


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, match",
    [
        (dict(agop_samples=0), "agop_samples"),
        (dict(agop_samples=-3), "agop_samples"),
        (dict(n_centres=0), "n_centres"),
        (dict(kernel="cosine"), "kernel"),
        (dict(sigma=-1.0), "sigma"),
        (dict(shrinkage=1.5), "shrinkage"),
        (dict(solver="lbfgs"), "solver"),
        (dict(loss="hinge"), "loss"),
        (dict(iterations=-1), "iterations"),
        (dict(penalty=0.0), "penalty"),
        (dict(dtype="float16"), "dtype"),
    ],
)
def test_bad_parameters(digits, params, match):
    X, y = digits
    with pytest.raises(ValueError, match=match):
        small(**params).fit(X, y)


def test_bad_data(digits):
    X, y = digits
    with pytest.raises(ValueError, match="labels"):
        small().fit(X, y[:-1])
    with pytest.raises(ValueError, match="at least 2 classes"):
        small().fit(X, np.zeros(X.shape[0], dtype=np.int64))
    Xnan = X.copy()
    Xnan[3, 0, 4, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        small().fit(Xnan, y)
    flat = X.reshape(X.shape[0], -1)
    with pytest.raises(ValueError, match="length 63"):
        small(image_shape=(1, 8, 8)).fit(flat[:, :63], y)
    with pytest.raises(ValueError, match="image_shape"):
        small().fit(flat, y)  # flat rows without image_shape
    with pytest.raises(ValueError, match="image_shape"):
        small(image_shape=(1, 7, 7)).fit(X, y)
    with pytest.raises(ValueError, match="patch_size"):
        small(patch_size=9).fit(X, y)
    with pytest.raises(TypeError, match="X must be images: a numpy array, a torch tensor or nested lists"):
        small().fit("images.npz", y)  # nested lists are images (test_estimator_inputs.py)


def test_logistic_loss_needs_two_classes(digits):
    X, y = digits
    with pytest.raises(ValueError, match="2 classes"):
        small(loss="logistic").fit(X, y)


def test_logistic_loss_with_exact_solver(digits):
    X, y = digits
    keep = y < 2
    with pytest.raises(ValueError, match="squared"):
        small(loss="logistic").fit(X[keep], y[keep])


@requires_falkon
def test_logistic_loss_binary_with_falkon(digits):
    X, y = digits
    keep = y < 2
    model = small(loss="logistic", solver="falkon", n_centres=30, iterations=1, maxiter=5).fit(X[keep], y[keep])
    assert model.decision_function(X[keep]).shape == (int(keep.sum()), 1)  # one ±1 score
    assert set(model.predict(X[keep]).tolist()) <= {0, 1}
    assert model.score(X[keep], y[keep]) > 0.9


def test_cuda_without_cuda(digits):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    X, y = digits
    with pytest.raises(RuntimeError, match="CUDA"):
        small(device="cuda").fit(X, y)


def test_predict_before_fit(digits):
    X, _ = digits
    model = small()
    for method in (model.predict, model.decision_function):
        with pytest.raises(RuntimeError, match="not fitted"):
            method(X)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.save("never-written.pt")


def test_predict_with_wrong_image_shape(fitted):
    with pytest.raises(ValueError, match=re.escape("X has images of shape (1, 7, 7) but the model was fitted on "
                                                   "images of shape (1, 8, 8)")):
        fitted.predict(np.zeros((2, 1, 7, 7)))


# ---------------------------------------------------------------------------------------------
# The metric in the estimator (the update itself: test_metric.py)
# ---------------------------------------------------------------------------------------------
def test_dc_weight_is_used_at_iteration_zero(digits):
    X, y = digits
    model = small(iterations=1, dc_weight=0.2).fit(X, y)
    assert torch.allclose(model.metrics_[0], fixed_metric(9, 0.2))
    e = dc_direction(9)
    for M in model.metrics_:
        assert (e @ M @ e).item() == pytest.approx(0.2, abs=1e-10)
        assert torch.trace(M).item() == pytest.approx(8.2, rel=1e-10)


def test_shrinkage_one_keeps_fixed_metric(digits):
    X, y = digits
    model = small(iterations=1, shrinkage=1.0).fit(X, y)
    assert torch.allclose(model.metrics_[1], torch.eye(9, dtype=torch.float64), atol=1e-14)


def test_location_weights_follow_share(digits):
    X, y = digits
    with pytest.warns(UserWarning, match="No validation data"):
        model = small(iterations=1, location_weights=True, validation_fraction=0.0).fit(X, y)
    assert model.best_iteration_ == 1
    share = torch.tensor(model.history_[0]["location_share"], dtype=torch.float64)
    assert torch.allclose(model.weights_.double(), share.clamp_min(0), rtol=1e-12, atol=0)
    w = model.kernel_.weights
    assert w.sum().item() == pytest.approx(1.0)
    assert torch.allclose(w, share.clamp_min(0) / share.clamp_min(0).sum(), rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------
# Local pooling (pool_window)
# ---------------------------------------------------------------------------------------------
def test_pool_window_fit_predict_save_load(digits, tmp_path):
    X, y = digits
    model = small(pool_window=3, iterations=1, checkpoint_dir=str(tmp_path / "ckpt")).fit(X, y)
    assert model.kernel_.pool_window == 3
    aligned = small(iterations=1).fit(X, y)
    assert not np.allclose(model.decision_function(X), aligned.decision_function(X))  # the window is used
    ckpt = torch.load(tmp_path / "ckpt" / rfm_module.CHECKPOINT_NAME, weights_only=True)
    assert ckpt["params"]["pool_window"] == 3
    path = tmp_path / "pooled.pt"
    model.save(path)
    loaded = ConvRFM.load(path)
    assert loaded.pool_window == 3 and loaded.kernel_.pool_window == 3
    assert np.array_equal(loaded.decision_function(X), model.decision_function(X))
    assert np.array_equal(loaded.predict(X), model.predict(X))
    assert model.score(X, y) > 0.9


@pytest.mark.parametrize("window", [0, 2, 1.0, True])
def test_bad_pool_window(digits, window):
    X, y = digits
    with pytest.raises(ValueError, match="pool_window"):
        small(pool_window=window).fit(X, y)


# ---------------------------------------------------------------------------------------------
# Data-adaptive defaults: σ = median patch distance, standardisation, DC weight "auto"
# ---------------------------------------------------------------------------------------------
def smooth_colour_images(n, seed=0):
    """(n, 3, 8, 8) images whose brightness varies slowly and is shared by the channels (like
    natural images: neighbouring pixels and channels move together, DC dominates patch distances)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 3, 3, generator=g, dtype=torch.float64)
    base = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=True)
    tint = 0.2 * torch.randn(n, 3, 1, 1, generator=g, dtype=torch.float64)
    return (base + tint + 0.05 * torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)).numpy()


def test_defaults_are_data_adaptive():
    defaults = ConvRFM()
    assert (defaults.sigma, defaults.preprocess, defaults.dc_weight, defaults.pool_window) == ("median", "standardize",
                                                                                             "auto", 1)


def test_dc_distance_share():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(16, 400, 27, generator=g, dtype=torch.float64)
    assert rfm_module.dc_distance_share(noise) == pytest.approx(1 / 27, rel=0.15)
    flat = torch.randn(16, 400, 1, generator=g, dtype=torch.float64).expand(16, 400, 27)  # constant patches
    assert rfm_module.dc_distance_share(flat) == pytest.approx(1.0, rel=1e-12)
    assert rfm_module.auto_dc_weight(0.7) == 0.2 and rfm_module.auto_dc_weight(0.3) is None
    assert rfm_module.dc_distance_share(torch.zeros(2, 5, 9)) == 0.0


@pytest.mark.parametrize("natural", [True, False])
def test_auto_dc_weight_follows_the_images(natural):
    y = np.arange(60) % 2
    X = smooth_colour_images(60) if natural else np.random.default_rng(0).standard_normal((60, 3, 8, 8))
    model = small(dc_weight="auto", iterations=1).fit(X, y)
    if natural:
        assert model.dc_weight_ == 0.2
        torch.testing.assert_close(model.metrics_[0], fixed_metric(27, 0.2))
        e = dc_direction(27)
        assert (e @ model.metrics_[1] @ e).item() == pytest.approx(0.2, abs=1e-10)  # the update keeps the weight
    else:
        assert model.dc_weight_ is None
        assert torch.equal(model.metrics_[0], torch.eye(27, dtype=torch.float64))


def test_default_sigma_and_preprocessing(digits):
    """sigma='median' and preprocess='standardize' (the defaults): σ is the median aligned-patch
    distance of the standardised training rows, the same σ whatever the pixel scale."""
    X, y = digits
    model = small(sigma="median", preprocess="standardize", iterations=0).fit(X, y)
    scaled = small(sigma="median", preprocess="standardize", iterations=0).fit(255 * X, y)
    assert model.preprocessor_ is not None
    assert model.sigma_ == pytest.approx(scaled.sigma_, rel=1e-6)
    assert model.history_[0]["sigma"] == model.sigma_ > 0
    assert np.array_equal(model.predict(X), scaled.predict(255 * X))


# (a numerically diagonal kernel interpolates: its AGOP is 0 and the update refuses it, so 0 iterations)
@pytest.mark.parametrize("sigma, kind, iterations", [(1e-4, "diagonal", 0), (1e9, "constant", 2)])
def test_degenerate_kernel_warns_once(sigma, kind, iterations):
    X = np.random.default_rng(0).standard_normal((40, 1, 8, 8))
    y = np.arange(40) % 2
    with pytest.warns(UserWarning, match=re.escape(f"numerically {kind} with sigma={sigma:.4g}")) as record:
        small(sigma=sigma, iterations=iterations).fit(X, y)
    messages = [str(w.message) for w in record if "numerically" in str(w.message)]
    assert len(messages) == 1, messages
    median = small(iterations=0, sigma="median").fit(X, y).sigma_
    assert f"try sigma={median:.4g}" in messages[0]


def test_median_sigma_kernel_is_not_degenerate(recwarn):
    X = np.random.default_rng(0).standard_normal((40, 1, 8, 8))
    small(sigma="median", iterations=0).fit(X, np.arange(40) % 2)
    assert not [w for w in recwarn if "numerically" in str(w.message)]


def test_degeneracy():
    K = torch.eye(5, dtype=torch.float64)
    assert rfm_module.degeneracy(K) == "diagonal"
    assert rfm_module.degeneracy(K + 1e-3) is None
    assert rfm_module.degeneracy(torch.ones(4, 4) * 0.7) == "constant"
    assert rfm_module.degeneracy(torch.ones(4, 4) + 1e-9 * torch.eye(4, dtype=torch.float64)) == "constant"


# ---------------------------------------------------------------------------------------------
# Warnings when a result cannot mean anything (each once per fit, and only when it should)
# ---------------------------------------------------------------------------------------------
def _warnings_of(call) -> list:
    """The warning messages ``call()`` gives (every one, not only the first per line)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)]


def _with(messages, phrase) -> list:
    return [m for m in messages if phrase in m]


@pytest.fixture(scope="module")
def plenty():
    """300 digits of classes 0–9 for training, 120 others for validation (enough for no warning)
    and 100 more, new to the model, for testing."""
    data = load_digits()
    X, y = (data.images / 16.0)[:, None].astype(np.float64), data.target
    return X[:300], y[:300], X[300:420], y[300:420], X[420:520], y[420:520]


def test_a_normal_fit_and_prediction_warn_nothing(plenty, tmp_path):
    X, y, X_val, y_val, X_test, y_test = plenty
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = small(iterations=1).fit(X, y, X_val, y_val)
        model.predict(X_test[:1])  # one image: its range is narrow but not another scale
        model.score(X_test, y_test)
        model.save(tmp_path / "m.pt")
        assert ConvRFM.load(tmp_path / "m.pt").score(X_test, y_test) == model.score(X_test, y_test)
    assert model.input_range_ == (0.0, 1.0) and isinstance(model.seed_, int)


@pytest.mark.parametrize("params, data, phrase", [
    ({}, None, "validation_fraction=0.1 leaves 6 of the 60 images for validation, fewer than 100"),
    ({"stride": 9}, None, "patch_size=3, stride=9 leave 1 patch location on the 8×8 images, whose patches see 9 of "
                          "the 64 pixels"),
    ({"pool_window": 99}, None, "pool_window=99 is wider than the 6×6 grid of patch locations: pool_window=11"),
    ({"iterations": 0}, np.zeros_like, "all 54 training images are constant images (every value 0)"),
    ({"iterations": 0}, lambda X: np.repeat(X[:1], len(X), 0), "all 54 training images are the same image"),
])
def test_meaningless_fit_warns_once(digits, params, data, phrase):
    X, y = digits
    X = X if data is None else data(X)
    assert len(_with(_warnings_of(lambda: small(**{"iterations": 1, **params}).fit(X, y)), phrase)) == 1


def test_tied_iterates_warn_once_naming_the_kept_one(digits):
    X, y = digits  # 6 validation images: the iterations tie
    model = small(iterations=2).fit(X, y)
    scores = [r["val_accuracy"] for r in model.history_]
    messages = _with(_warnings_of(lambda: small(iterations=2).fit(X, y)), "tie at val_accuracy")
    assert len(messages) == 1 and scores.count(scores[model.best_iteration_]) > 1
    assert f"iteration {model.best_iteration_} is kept (the first of them)" in messages[0]


def test_clipped_pool_window_is_the_same_kernel(digits):
    X, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide, exact = small(iterations=0, pool_window=99).fit(X, y), small(iterations=0, pool_window=11).fit(X, y)
    assert np.allclose(wide.decision_function(X), exact.decision_function(X), atol=1e-10)


def test_values_on_another_scale_warn_at_prediction(fitted, digits, tmp_path):
    X, y = digits
    for call in (lambda: fitted.predict(255 * X), lambda: fitted.score(255 * X, y), lambda: fitted.predict(X / 255)):
        assert len(_with(_warnings_of(call), "but the model was fitted on values in [0, 1]")) == 1
    assert not _with(_warnings_of(lambda: fitted.predict(X)), "values in")
    fitted.save(tmp_path / "m.pt")
    loaded = ConvRFM.load(tmp_path / "m.pt")
    assert loaded.input_range_ == fitted.input_range_
    assert _with(_warnings_of(lambda: loaded.predict(255 * X)), "X has values in [0, 255]")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    del state["fitted"]["input_range_"]  # a file saved before the range was kept
    torch.save(state, tmp_path / "old.pt")
    old = ConvRFM.load(tmp_path / "old.pt")
    assert old.input_range_ is None and not _warnings_of(lambda: old.predict(255 * X))
    assert np.array_equal(old.predict(X), fitted.predict(X))


def test_validation_data_on_another_scale_warns(digits):
    X, y = digits
    messages = _warnings_of(lambda: small(iterations=0).fit(X, y, 255 * X[:20], y[:20]))
    assert len(_with(messages, "X_val has values in [0, 255]")) == 1
    assert len(_with(messages, "X_val has 20 images, fewer than 100")) == 1


def test_constant_images_name_the_median_distance(digits):
    X, y = digits
    with pytest.warns(UserWarning, match="constant images"), \
            pytest.raises(ValueError, match="median aligned-patch distance of the training images is 0") as info:
        small(sigma="median").fit(np.zeros_like(X), y)
    assert "must be a positive finite number" not in str(info.value)


def test_errors_name_validation_fraction(digits):
    X, y = digits
    with pytest.raises(ValueError, match=r"validation_fraction=0.001 gives 0 validation items") as info:
        small(validation_fraction=0.001).fit(X, y)
    assert "val_size" not in str(info.value)
