"""Estimator input rules, files and devices (falkon_convrfm.estimator, validation, metric).

Table-driven: every bad input to ConvRFM / DeepConvRFM raises the named error type with a
one-line message that names the problem; every formerly silent case (issue 11: channels-last
arrays, one-hot and float targets, ignored parameters, M = 0, string labels, output types)
now works as a scikit-learn user expects or warns. Crafted model and checkpoint files do not
run code. Device handling that needs no GPU: map_location, to() (update_metric on other dtypes:
test_metric.py).
All fits are tiny (digits 0–2, 1×8×8, exact solver, float64).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import falkon_convrfm.rfm as rfm_module
from falkon_convrfm import ConvMahalanobisKernel, ConvRFM, DeepConvRFM, DeepRFM, LayerSpec, load_model
from falkon_convrfm.metric import as_metric, update_metric
from falkon_convrfm.inputs import channels_last_layout
from falkon_convrfm.validation import DataWarning

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    keep = np.flatnonzero(data.target < 3)[:60]
    return (data.images[keep] / 16.0)[:, None].astype(np.float64), data.target[keep].astype(np.int64)


def small(**overrides):
    params = dict(patch_size=3, sigma=2.0, penalty=1e-3, iterations=1, agop_samples=60, solver="exact",
                  dtype="float64", random_state=0, progress=False)
    params.update(overrides)
    return ConvRFM(**params)


def deep(**overrides):
    params = dict(layers=(LayerSpec(width=3, pool=2, sigma=1.0, iterations=0),), final=dict(iterations=0, sigma=1.0),
                  penalty=1e-3, solver="exact", dtype="float64", random_state=0, progress=False)
    params.update(overrides)
    return DeepConvRFM(**params)


@pytest.fixture(scope="module")
def fitted(digits):
    X, y = digits
    return small().fit(X, y)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Bad input: error type and a message naming the problem
# ---------------------------------------------------------------------------------------------
def _X(X):
    return X


BAD_FIT = [
    # (id, estimator params, X transform, y transform, error, message)
    ("X-ragged-list", {}, lambda X: [X[0].tolist(), X[1, :, :4].tolist()], _X, ValueError, "differ in size"),
    ("X-string", {}, lambda X: "train.npz", _X, TypeError, "X must be images"),
    ("X-object-array", {}, lambda X: X.astype(object), _X, TypeError, "real numbers"),
    ("X-5d", {}, lambda X: X[:, None], _X, ValueError, "images"),
    ("X-empty", {}, lambda X: X[:0], lambda y: y[:0], ValueError, "empty"),
    ("X-nan", {}, lambda X: np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X), _X, ValueError, "NaN"),
    ("X-ambiguous-layout", {}, lambda X: np.zeros((len(X), 3, 8, 3)), _X, ValueError, "channels_last=True"),
    ("X-flat-no-shape", {}, lambda X: X.reshape(len(X), -1), _X, ValueError, "image_shape"),
    ("X-wrong-image-shape", {"image_shape": (1, 7, 7)}, _X, _X, ValueError, "image_shape"),
    ("y-length", {}, _X, lambda y: y[:-1], ValueError, "labels but X has"),
    ("y-one-class", {}, _X, lambda y: np.zeros_like(y), ValueError, "at least 2 classes"),
    ("y-none", {}, _X, lambda y: None, TypeError, "labels"),
    ("y-3d", {}, _X, lambda y: y[:, None, None].repeat(2, 1).repeat(2, 2), ValueError, "1-D"),
    ("y-2d-not-one-hot", {"task": "classification"}, _X, lambda y: np.stack([y, y], 1), ValueError, "one-hot"),
    ("y-fractional-classes", {"task": "classification"}, _X, lambda y: y + 0.5, ValueError, "integers"),
    ("y-nan-regression", {"task": "regression"}, _X, lambda y: np.where(y == 0, np.nan, y * 1.0), ValueError, "NaN"),
    ("y-strings-regression", {"task": "regression"}, _X, lambda y: y.astype(str), TypeError, "numbers"),
    ("task", {"task": "clustering"}, _X, _X, ValueError, "task"),
    ("channels_last", {"channels_last": "yes"}, _X, _X, ValueError, "channels_last"),
    ("random_state-negative", {"random_state": -1}, _X, _X, ValueError, "random_state"),
    ("random_state-object", {"random_state": np.random.RandomState(0)}, _X, _X, ValueError, "random_state"),
    ("validation_fraction", {"validation_fraction": 1.0}, _X, _X, ValueError, "validation_fraction"),
    ("preprocess", {"preprocess": "pca"}, _X, _X, ValueError, "preprocess"),
    ("max_memory", {"max_memory": -1}, _X, _X, ValueError, "max_memory"),
    ("sigma_grid", {"sigma_grid": ()}, _X, _X, ValueError, "sigma_grid"),
    ("penalty_grid", {"penalty_grid": (1.0, -2.0)}, _X, _X, ValueError, "penalty_grid"),
    ("image_shape", {"image_shape": (1, 8)}, _X, _X, ValueError, "image_shape"),
    ("dc_weight", {"dc_weight": -0.5}, _X, _X, ValueError, "dc_weight"),
    ("stride", {"stride": 0}, _X, _X, ValueError, "stride"),
    ("padding", {"padding": -1}, _X, _X, ValueError, "padding"),
    ("tune", {"tune": "yes"}, _X, _X, TypeError, "tune"),
    ("solver", {"solver": "cg"}, _X, _X, ValueError, "solver"),
]


@pytest.mark.parametrize("params, fx, fy, error, match", [case[1:] for case in BAD_FIT], ids=[c[0] for c in BAD_FIT])
def test_bad_fit_input(digits, params, fx, fy, error, match):
    X, y = digits
    with pytest.raises(error, match=match) as info:
        small(**params).fit(fx(X), fy(y))
    one_line(info)


def test_bad_validation_data(digits):
    X, y = digits
    for kwargs, match in [
        (dict(X_val=X[:5]), "both"),
        (dict(y_val=y[:5]), "both"),
        (dict(X_val=X[:5], y_val=np.array([0, 1, 2, 5, 0])), "not seen"),
        (dict(X_val=X[:5, :, :7], y_val=y[:5]), r"X_val has images of shape \(1, 7, 8\) but X has images of shape"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            small(iterations=0).fit(X, y, **kwargs)
        one_line(info)


def test_bad_prediction_input(fitted, digits):
    X, y = digits
    for call, error, match in [
        (lambda: fitted.predict(np.zeros((2, 1, 7, 7))), ValueError, "but the model was fitted on images of shape"),
        (lambda: fitted.predict("images.npz"), TypeError, "X must be images: a numpy array, a torch tensor or nested"),
        (lambda: fitted.predict([X[0].tolist(), X[1, :, :4].tolist()]), ValueError, "differ in size"),
        (lambda: fitted.predict([["a", "b"]]), TypeError, "real numbers"),
        (lambda: fitted.score(X, y[:-1]), ValueError, "labels but X has"),
        (lambda: fitted.score(X, np.eye(4)[y]), ValueError, "one-hot columns"),
        (lambda: small().predict(X), RuntimeError, "not fitted"),
        (lambda: small().to("cpu"), RuntimeError, "not fitted"),
    ]:
        with pytest.raises(error, match=match) as info:
            call()
        one_line(info)


def test_zero_metric_is_rejected():
    """A user-given M = 0 would make the kernel constant; the kernel's own handling of a zero
    factor (metric_factor) stays."""
    with pytest.raises(ValueError, match="zero") as info:
        as_metric(np.zeros((9, 9)), 9)
    one_line(info)
    with pytest.raises(ValueError, match="zero"):
        ConvMahalanobisKernel(torch.zeros(9, 9), (1, 8, 8), 3)
    with pytest.raises(ValueError, match="M = 0"):
        update_metric(torch.zeros(9, 9, dtype=torch.float64))


DEEP_BAD = [
    ("penalty", dict(penalty=-1.0), ValueError, "penalty"),
    ("solver", dict(solver="cg"), ValueError, "solver"),
    ("layer-kernel", dict(layers=(LayerSpec(kernel="cosine"),)), ValueError, "kernel"),
    ("layer-dict-field", dict(layers=({"width": 2, "colour": 1},)), TypeError, "colour"),
    ("layers-not-sequence", dict(layers=LayerSpec()), TypeError, "layers"),
    ("final-unknown", dict(final={"bogus": 1}), ValueError, "final"),
    ("final-image_shape", dict(final={"image_shape": (3, 2, 2)}), ValueError, "final"),
    ("final-sigma", dict(final={"sigma": -1.0}), ValueError, "sigma"),
    ("final-type", dict(final=[("sigma", 1.0)]), TypeError, "final"),
    ("channels_last", dict(channels_last=1), ValueError, "channels_last"),
]


@pytest.mark.parametrize("params, error, match", [c[1:] for c in DEEP_BAD], ids=[c[0] for c in DEEP_BAD])
def test_deep_parameters_checked_before_fitting(digits, monkeypatch, params, error, match):
    """DeepConvRFM validates its own, its layers' and its final model's parameters before any
    layer is fitted."""
    X, y = digits

    def no_fit(*args, **kwargs):
        raise AssertionError("a ConvRFM was fitted before the parameters were checked")

    monkeypatch.setattr(ConvRFM, "fit", no_fit)
    with pytest.raises(error, match=match) as info:
        deep(**params).fit(X, y)
    one_line(info)


def test_deep_rfm_takes_vectors(digits):
    X, y = digits
    with pytest.raises(ValueError, match="vectors") as info:
        DeepRFM(widths=(4,), solver="exact", progress=False).fit(X, y)
    one_line(info)


# ---------------------------------------------------------------------------------------------
# Formerly silent cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, expected",
    [((5, 32, 32, 3), True), ((5, 8, 8, 1), True), ((5, 28, 28, 4), True), ((5, 3, 32, 32), False),
     ((5, 1, 8, 8), False), ((5, 64, 4, 7), False), ((5, 2, 8, 8), False)],
)
def test_channel_layout_detection(shape, expected):
    assert channels_last_layout(shape) is expected


def test_one_pixel_grey_images_have_one_layout():
    assert channels_last_layout((5, 1, 1, 1), image_shape=(1, 1, 1)) is False  # both layouts: the same rows
    with pytest.raises(ValueError, match="channels_last=False"):
        channels_last_layout((5, 3, 3, 3), image_shape=(3, 3, 3))  # both match, and they differ


@pytest.mark.parametrize("shape", [(5, 3, 32, 3), (5, 64, 4, 4), (5, 4, 4, 4), (5, 8, 4, 3)])
def test_ambiguous_layout_asks_for_channels_last(shape):
    with pytest.raises(ValueError, match="channels_last=False") as info:
        channels_last_layout(shape)
    one_line(info)
    assert channels_last_layout(shape, channels_last=True) is True
    assert channels_last_layout(shape, channels_last=False) is False


def test_layout_from_image_shape():
    assert channels_last_layout((5, 8, 8, 3), image_shape=(3, 8, 8)) is True
    assert channels_last_layout((5, 3, 8, 8), image_shape=(3, 8, 8)) is False
    assert channels_last_layout((5, 64, 4, 4), image_shape=(64, 4, 4)) is False  # ambiguous alone


def test_channels_last_images_are_detected(digits):
    """Float (n, H, W, 3) images without channels_last were read as H channels of W×3 images."""
    X, y = digits
    rgb = np.repeat(X, 3, axis=1) * np.array([1.0, 0.5, 0.25])[None, :, None, None]
    hwc = np.ascontiguousarray(rgb.transpose(0, 2, 3, 1))  # (n, 8, 8, 3)
    auto = small().fit(hwc, y)
    explicit = small(channels_last=True).fit(hwc, y)
    first = small().fit(rgb, y)
    assert auto.image_shape_ == (3, 8, 8)
    assert torch.equal(auto.M_, explicit.M_) and torch.equal(auto.M_, first.M_)
    assert np.array_equal(auto.decision_function(hwc), first.decision_function(rgb))
    assert np.array_equal(auto.predict(hwc), first.predict(hwc))  # predict reads the layout the same way


def test_one_hot_targets_are_classification(digits, fitted):
    """Falkon's convention: one-hot rows are classes (they were taken as regression, and scoring
    with integer labels crashed)."""
    X, y = digits
    onehot = np.eye(3)[y]
    model = small().fit(X, onehot)
    assert model.task_ == "classification"
    assert model.classes_.tolist() == [0, 1, 2]
    assert torch.equal(model.M_, fitted.M_)
    assert np.array_equal(model.predict(X), fitted.predict(X))
    assert model.score(X, onehot) == model.score(X, y) == fitted.score(X, y)
    assert fitted.score(X, onehot) == fitted.score(X, y)  # one-hot rows score a label-fitted model too
    assert small(iterations=0).fit(torch.from_numpy(X), torch.from_numpy(onehot)).task_ == "classification"


def test_float_targets_warn(digits):
    X, y = digits
    with pytest.warns(UserWarning, match="regression"):
        model = small(iterations=0).fit(X, y + 0.5)
    assert model.task_ == "regression"
    with pytest.warns(UserWarning, match="class labels"):
        model = small(iterations=0).fit(X, y.astype(np.float64))
    assert model.task_ == "classification" and model.classes_.dtype == np.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DataWarning)  # the small validation split: not about the task
        assert small(iterations=0, task="regression").fit(X, y + 0.5).task_ == "regression"


@pytest.mark.parametrize(
    "labels",
    [
        lambda y: np.array(["zero", "one", "two"])[y],
        lambda y: np.array(["zero", "one", "two"], dtype=object)[y],
        lambda y: [("zero", "one", "two")[v] for v in y],
        lambda y: np.array([None, "a", 3.5], dtype=object)[y],  # unorderable: first-appearance order
        lambda y: y == 1,
    ],
    ids=["str", "object", "list", "mixed", "bool"],
)
def test_hashable_labels(digits, fitted, labels):
    X, y = digits
    lab = labels(y)
    model = small().fit(X, lab)
    pred = model.predict(X)
    assert isinstance(pred, np.ndarray) and pred.shape == (len(X),)
    assert set(pred.tolist()) <= set(np.asarray(lab, dtype=object).tolist())
    assert model.score(X, lab) == pytest.approx(np.mean(pred == np.asarray(lab, dtype=object)))
    assert model.score(X, lab) > 0.9


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(n_centres=10), "ignored by the exact solver"),
        (dict(solver="nystrom", n_centres=500), "more than the"),
        (dict(maxiter=50), "maxiter=50 is ignored"),
        (dict(tune=True, validation_fraction=0.0), "nothing to tune"),
        (dict(kernel="ntk", sigma=3.0), "ignored by the ntk"),
    ],
)
def test_ignored_parameters_warn(digits, params, message):
    X, y = digits
    with pytest.warns(UserWarning, match=message):
        small(iterations=0, **params).fit(X, y)


def test_flat_rows_with_channels_last_warn(digits):
    X, y = digits
    with pytest.warns(UserWarning, match="channels_last=True is ignored"):
        small(iterations=0, image_shape=(1, 8, 8), channels_last=True).fit(X.reshape(len(X), -1), y)


def test_output_types_follow_input(fitted, digits):
    """numpy in → numpy out; torch in → torch out (decision_function, predict, transform)."""
    X, y = digits
    Xt = torch.from_numpy(X)
    for method in (fitted.decision_function, fitted.predict):
        out_np, out_t = method(X), method(Xt)
        assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor)
        assert np.array_equal(out_np, out_t.numpy())
    model = deep().fit(X, y)
    assert isinstance(model.transform(X), np.ndarray) and isinstance(model.transform(Xt), torch.Tensor)
    assert isinstance(model.predict(X), np.ndarray) and isinstance(model.predict(Xt), torch.Tensor)
    assert model.score(X, y) == model.score(Xt, torch.from_numpy(y))


def test_deep_with_string_labels_and_one_hot(digits):
    X, y = digits
    names = np.array(["zero", "one", "two"])[y]
    model = deep().fit(X, names)
    assert model.classes_.tolist() == ["one", "two", "zero"]
    assert set(model.predict(X).tolist()) <= {"zero", "one", "two"}
    assert model.score(X, names) > 0.8
    by_code = deep().fit(X, np.eye(3)[y])
    assert by_code.classes_.tolist() == [0, 1, 2] and by_code.score(X, y) > 0.8


# ---------------------------------------------------------------------------------------------
# random_state: one meaning in both estimators
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: small(random_state=None), lambda: deep(random_state=None)], ids=["conv", "deep"])
def test_random_state_none_draws_from_torch(digits, make):
    """None: a fresh seed from torch's global generator (reproducible under torch.manual_seed)."""
    X, y = digits
    torch.manual_seed(7)
    a = make().fit(X, y)
    torch.manual_seed(7)
    b = make().fit(X, y)
    torch.manual_seed(8)
    c = make().fit(X, y)
    assert a.seed_ == b.seed_ != c.seed_
    assert np.array_equal(a.decision_function(X), b.decision_function(X))


def test_random_state_none_resumes_with_the_checkpoint_seed(digits, tmp_path, monkeypatch):
    X, y = digits
    first = small(random_state=None, checkpoint_dir=str(tmp_path)).fit(X, y)
    calls = {"n": 0}
    original = rfm_module.patch_agop

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(rfm_module, "patch_agop", counting)
    again = small(random_state=None, checkpoint_dir=str(tmp_path)).fit(X, y)
    assert calls["n"] == 0 and again.seed_ == first.seed_
    assert torch.equal(again.M_, first.M_)


# ---------------------------------------------------------------------------------------------
# Files: tensors and plain data only, crafted files never run
# ---------------------------------------------------------------------------------------------
class CreatesMarker:
    """Unpickling this creates a file (what a crafted model file would do, less harmfully)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _crafted(path, marker, zipped: bool):
    payload = {"class": "ConvRFM", "params": {}, "fitted": CreatesMarker(marker)}
    if zipped:
        torch.save(payload, path)  # a torch zip file whose pickle holds the payload
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))


@pytest.mark.parametrize("zipped", [False, True], ids=["pickle", "torch-zip"])
@pytest.mark.parametrize("loader", ["ConvRFM", "DeepConvRFM", "load_model", "checkpoint", "deep-checkpoint"])
def test_crafted_file_does_not_run(digits, tmp_path, loader, zipped):
    live, marker = tmp_path / "payload_is_live", tmp_path / "pwned"
    pickle.loads(pickle.dumps(CreatesMarker(live)))  # a plain pickle load runs it
    assert live.exists()
    X, y = digits
    if loader in ("checkpoint", "deep-checkpoint"):
        folder = tmp_path / "ckpt"
        folder.mkdir()
        path = folder / (rfm_module.CHECKPOINT_NAME if loader == "checkpoint" else DeepConvRFM._CHECKPOINT)
        _crafted(path, marker, zipped)
        model = small(checkpoint_dir=str(folder)) if loader == "checkpoint" else deep(checkpoint_dir=str(folder))
        run = lambda: model.fit(X, y)  # noqa: E731
    else:
        path = tmp_path / "model.pt"
        _crafted(path, marker, zipped)
        run = {"ConvRFM": lambda: ConvRFM.load(path), "DeepConvRFM": lambda: DeepConvRFM.load(path),
               "load_model": lambda: load_model(path)}[loader]
    with pytest.raises(ValueError) as info:
        run()
    assert not marker.exists()
    message = one_line(info)
    assert str(path) in message and "refused" in message


def _json(path):
    path.write_text(json.dumps({"class": "ConvRFM"}))


def _garbage(path):
    path.write_bytes(bytes(range(256)) * 4)


def _empty(path):
    path.write_bytes(b"")


def _npz(path):
    with open(path, "wb") as f:
        np.savez(f, images=np.zeros((2, 1, 8, 8)))


def _tensor(path):
    torch.save(torch.zeros(3), path)


def _checkpoint(path):
    torch.save({"format": "falkon_convrfm", "kind": "checkpoint"}, path)


@pytest.mark.parametrize("write", [_json, _garbage, _empty, _npz, _tensor, _checkpoint])
def test_non_model_files_name_the_file(tmp_path, write):
    path = tmp_path / "model.pt"
    write(path)
    for load in (ConvRFM.load, DeepConvRFM.load, load_model):
        with pytest.raises(ValueError) as info:
            load(path)
        assert str(path) in one_line(info)


def test_damaged_model_file_names_the_file(fitted, tmp_path):
    """A file of plain data whose content is not a valid model (here an asymmetric M_)."""
    path = tmp_path / "m.pt"
    fitted.save(path)
    state = torch.load(path, weights_only=True)
    state["fitted"]["M_"] = state["fitted"]["M_"] + torch.triu(torch.ones(9, 9, dtype=torch.float64), 1)
    torch.save(state, path)
    with pytest.raises(ValueError, match="not symmetric") as info:
        ConvRFM.load(path)
    assert str(path) in one_line(info)


def test_map_location_without_cuda(fitted, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    fitted.save(tmp_path / "m.pt")
    with pytest.raises(RuntimeError, match="CUDA"):
        ConvRFM.load(tmp_path / "m.pt", map_location="cuda")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        ConvRFM.load(tmp_path / "nowhere.pt")


def test_saved_files_are_plain(fitted, digits, tmp_path):
    """Models (string labels and a preprocessor included) load with weights_only=True, on CPU."""
    X, y = digits
    names = np.array(["zero", "one", "two"])[y]
    model = small(preprocess="zca").fit(X, names)
    for m, name in ((model, "conv"), (deep(preprocess="standardize").fit(X, names), "deep")):
        path = tmp_path / f"{name}.pt"
        m.save(path)
        torch.load(path, weights_only=True)  # nothing but tensors and plain data
        loaded = load_model(path)
        assert type(loaded) is type(m)
        assert np.array_equal(loaded.classes_, m.classes_)
        assert np.array_equal(loaded.predict(X), m.predict(X))
        assert np.array_equal(loaded.decision_function(X), m.decision_function(X))
    buffer = io.BytesIO()
    fitted.save(buffer)
    buffer.seek(0)
    assert np.array_equal(ConvRFM.load(buffer).predict(X), fitted.predict(X))


def test_unsaveable_parameter_is_named(fitted, tmp_path):
    model = small()
    model.__dict__.update({k: getattr(fitted, k) for k in ConvRFM._FITTED})
    model.set_params(sigma_grid=(0.5, object()))
    with pytest.raises(TypeError, match="sigma_grid") as info:
        model.save(tmp_path / "m.pt")
    assert "[1]" in one_line(info)
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------------------------------------
# Devices (checks that need no GPU)
# ---------------------------------------------------------------------------------------------
def test_model_on_device_and_map_location(fitted, digits, tmp_path):
    X, y = digits
    assert fitted.alpha_.device == fitted.centres_.device == torch.device("cpu")
    assert fitted.to("cpu") is fitted
    path = tmp_path / "m.pt"
    fitted.save(path)
    loaded = ConvRFM.load(path, map_location="cpu")
    assert loaded.alpha_.device.type == "cpu" and loaded.centres_.device.type == "cpu"
    assert np.array_equal(loaded.predict(X), fitted.predict(X))
    loaded = ConvRFM.load(path, map_location=torch.device("cpu")).to(torch.device("cpu"))
    assert np.array_equal(loaded.decision_function(X), fitted.decision_function(X))
    model = deep().fit(X, y)
    assert model.to("cpu") is model
    model.save(tmp_path / "d.pt")
    assert np.array_equal(DeepConvRFM.load(tmp_path / "d.pt", map_location="cpu").predict(X), model.predict(X))


def test_to_unavailable_device(fitted):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(RuntimeError, match="CUDA"):
        fitted.to("cuda")


# ---------------------------------------------------------------------------------------------
# array-likes, the training-data fingerprint, progress bars (issue 18)
def test_a_list_of_images_predicts_as_the_array(fitted, digits):
    X, y = digits
    Xnew = X[::-1].copy() + 0.01  # not the training rows: no overlap warning
    assert np.array_equal(fitted.predict(Xnew.tolist()), fitted.predict(Xnew))
    assert np.allclose(fitted.decision_function(Xnew.tolist()), fitted.decision_function(Xnew))
    assert fitted.score(Xnew.tolist(), y.tolist()) == fitted.score(Xnew, y)
    model = small(iterations=0).fit(X.tolist(), y.tolist())  # fit reads lists too
    assert np.array_equal(model.predict(Xnew), small(iterations=0).fit(X, y).predict(Xnew))


def _seen_warnings(call) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "data this model was fitted on" in str(w.message)]


def test_scoring_training_rows_warns_once_with_the_count(fitted, digits):
    X, y = digits
    new = X[:25] + 0.5  # other images
    mixed = np.concatenate([X[:10], new])
    for call in (lambda: fitted.predict(mixed), lambda: fitted.score(mixed, y[:35]),
                 lambda: fitted.evaluate(mixed, y[:35]), lambda: fitted.decision_function(torch.from_numpy(mixed))):
        messages = _seen_warnings(call)
        assert len(messages) == 1 and messages[0].startswith("10 of the 35 images scored were in the data")
    assert _seen_warnings(lambda: fitted.predict(new)) == []
    # the validation rows of the fit count as seen too: every row of X was given to fit
    assert _seen_warnings(lambda: fitted.predict(X))[0].startswith(f"{len(X)} of the {len(X)} images")


def test_fingerprint_is_saved_and_old_files_still_load(fitted, digits, tmp_path):
    X, _ = digits
    assert fitted.train_row_hashes_.dtype == torch.int64 and fitted.train_row_hashes_.shape == (len(X),)
    fitted.save(tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert torch.equal(loaded.train_row_hashes_, fitted.train_row_hashes_)
    assert len(_seen_warnings(lambda: loaded.predict(X[:3]))) == 1
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    del state["fitted"]["train_row_hashes_"]  # a model saved before the fingerprint was stored
    torch.save(state, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert _seen_warnings(lambda: old.predict(X[:3])) == []
    assert np.array_equal(old.predict(X), fitted.predict(X))


@pytest.mark.parametrize("make", [lambda **p: small(**p), lambda **p: deep(**p)], ids=["ConvRFM", "DeepConvRFM"])
def test_progress_false_prints_nothing(digits, capfd, monkeypatch, make):
    import falkon_convrfm.progress as progress

    monkeypatch.setattr(progress, "DELAY", 0.0)  # even phases of no time would draw a bar
    X, y = digits
    model = make(progress=False).fit(X, y)
    model.predict(X[:5] + 0.5), model.score(X[:5] + 0.5, y[:5])
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    model.set_params(progress=True).predict(X[:5] + 0.5)  # and True does draw them (prediction's phase)
    assert "predict" in capfd.readouterr().err
