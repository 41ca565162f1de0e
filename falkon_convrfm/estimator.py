r"""The estimator base of :class:`~falkon_convrfm.ConvRFM` and :class:`~falkon_convrfm.DeepConvRFM`.

What both do the same way lives here: the parameters they share and their checks, the
preparation of images and labels (:mod:`falkon_convrfm.inputs`: layout, label encoding,
validation split; preprocessing; device), the checkpoint of an interruptible fit, the output
types (numpy in → numpy out, torch in → torch out), ``predict``/``score``, ``to(device)``, and
saving and loading (files: :mod:`falkon_convrfm.persistence`). The base knows no subclass:
:func:`falkon_convrfm.models.load_model` loads a model of any class.

**random_state.** An int seeds every random choice of a fit (validation split, Nyström centres,
AGOP rows, random filters). ``None`` draws a fresh seed from torch's global generator (so
``torch.manual_seed`` makes it reproducible), as in scikit-learn; a fit that resumes from a
checkpoint reuses the seed the checkpoint was made with. ``seed_`` holds the seed a fit used.

**Warnings.** A fit warns (:class:`~falkon_convrfm.validation.DataWarning`, once) when its
validation set has fewer than ``MIN_VALIDATION`` images, when its training images are all the
same, and when ``X_val``'s values lie on another scale than ``X``'s; it warns when several
iterations tie on the validation score (:func:`warn_tied_iterates`). ``input_range_``, the
(min, max) of the training values (uint8 scaled to [0, 1], before preprocessing), is saved with
the model; ``predict``, ``score`` and the other methods that take images warn when theirs lie
on another scale (:func:`other_scale`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from sklearn.base import BaseEstimator

from ._compat import resolve_device
from .inputs import (TASKS, as_labels, class_labels, count_known, encode_labels, image_rows, resolve_task, row_hashes,
                     train_val_split)
from .params import DEVICE, FLAG, PATH_OR_NONE, SEED, AnyOf, Integer, Interval, OneOf, Param, Positive, check_params, table
from .persistence import (CheckpointStore, FILE_FORMAT, atomic_save, file_name, from_plain, read_file, register_estimator,
                          to_plain)
from .preprocessing import PREPROCESSING, make_preprocessor, preprocess_rows
from .progress import scoped
from .scoring import accuracy, class_scores, decision_codes, evaluate
from .solvers import SOLVERS
from .validation import DTYPES, DataWarning, resolve_dtype, warn

# Fewer validation images than this: one image moves the validation accuracy by more than a
# point, about the size of the differences between iterates, so the choice among them is noise.
MIN_VALIDATION = 100
# Values lie on another scale than the training values when they reach beyond the training range
# by more than its width, or span less than 1/SCALE_RATIO of it.
SCALE_RATIO = 20
# Fewer patch locations than this, with pixels no patch sees: the model ignores most of the image.
MIN_LOCATIONS = 4


@dataclasses.dataclass
class PreparedData:
    """Training and validation rows (preprocessed, on the fit device) and targets (one-hot or
    real), the image shape and the seeded generator of the fit's later random choices."""

    Xtr: torch.Tensor
    Ytr: torch.Tensor
    Xval: torch.Tensor
    Yval: torch.Tensor
    image_shape: tuple
    generator: torch.Generator


@dataclasses.dataclass(frozen=True)
class LearnedMetric:
    """The metrics one ConvRFM learned (:meth:`ConvRFM.learned_metric`,
    :meth:`~falkon_convrfm.DeepConvRFM.learned_metric`): M by iteration (a deep model's feature
    layers keep only the best one), the per-iteration history, the kept iteration and the patch
    geometry M acts on."""

    name: str
    metrics: dict
    history: list
    best: int
    image_shape: tuple
    patch_size: int
    stride: int
    padding: int

    def location_share(self, iteration: int):
        """(per-location AGOP share, description): the AGOP that produced M of ``iteration``
        (for the fixed M of iteration 0, the AGOP of iteration 0's predictor)."""
        source = max(iteration - 1, 0)
        if "location_share" not in self.history[source]:
            raise ValueError(f"{self.name} computed no AGOP (fitted with iterations=0)")
        what = "fixed M's predictor" if iteration == 0 else f"iteration {source}, which gave M of iteration {iteration}"
        return self.history[source]["location_share"], f"{self.name}: AGOP share per location ({what})"

    def validation_scores(self, iteration: int) -> dict:
        """The validation scores of ``iteration`` by name (``val_accuracy``, ``val_r2``, ...)."""
        return {k: v for k, v in self.history[iteration].items() if k.startswith("val_")}


def value_range(rows: torch.Tensor) -> tuple:
    """(min, max) of the values of ``rows``, as floats."""
    return float(rows.min()), float(rows.max())


def other_scale(values: tuple, fitted: tuple) -> bool:
    """Whether values with range ``values`` (min, max) lie on another scale than the training
    range ``fitted``: beyond it by more than its width, or spanning less than 1/``SCALE_RATIO``
    of it (e.g. pixels in [0, 255] for a model fitted on [0, 1], or the other way round). A
    constant training range admits anything."""
    (low, high), (f_low, f_high) = values, fitted
    width = f_high - f_low
    if width <= 0:
        return False
    return low < f_low - width or high > f_high + width or (high - low) * SCALE_RATIO < width


def warn_other_scale(rows: torch.Tensor, fitted: tuple, name: str) -> None:
    """Warn (once) when the values of ``rows`` lie on another scale than ``fitted`` (:func:`other_scale`)."""
    values = value_range(rows)
    if fitted is not None and other_scale(values, fitted):
        warn(f"{name} has values in [{values[0]:.4g}, {values[1]:.4g}] but the model was fitted on values in "
             f"[{fitted[0]:.4g}, {fitted[1]:.4g}]: on another scale (e.g. pixels in [0, 255] instead of [0, 1]) its "
             f"predictions mean nothing; give {name} on the training scale", DataWarning)


def warn_few_locations(geometry) -> None:
    """Warn when the patch grid of ``geometry`` (a :class:`~falkon_convrfm.patches.PatchGeometry`)
    has fewer than ``MIN_LOCATIONS`` locations and its patches leave pixels unseen."""
    _, h, w = geometry.image_shape
    count, seen = geometry.num_locations, geometry.covered_pixels
    if count < MIN_LOCATIONS and seen < h * w:
        padding = f", padding={geometry.padding}" if geometry.padding else ""
        warn(f"patch_size={geometry.patch_size}, stride={geometry.stride}{padding} leave {count} patch "
             f"location{'s' if count > 1 else ''} on the {h}×{w} images, whose patches see {seen} of the {h * w} "
             "pixels: the model ignores the rest; use a smaller stride")


def warn_tied_iterates(history: list, best: int, key: str, where: str = "") -> None:
    """Warn when other iterations of ``history`` reach the validation score ``val_<key>`` of the
    kept iteration ``best`` (the first of the tied ones is kept); ``where`` (e.g. "layer 1: ")
    starts the message."""
    name = "val_" + key
    kept = next(r for r in history if r["iteration"] == best)
    tied = [r["iteration"] for r in history if name in r and r[name] == kept.get(name)]
    if len(tied) > 1:
        warn(f"{where}iterations {', '.join(map(str, tied))} tie at {name} {kept[name]:.4f}: iteration {best} is kept "
             "(the first of them), so the validation split does not show whether the metric updates helped; "
             "more validation images tell them apart")


def median_bandwidth(median: float, what: str) -> float:
    """``sigma='median'``: the median distance ``median``, or a ValueError saying why there is
    none (``what``: which distance)."""
    if not median > 0:
        raise ValueError(f"sigma='median' cannot be used: the median {what} distance of the training images is "
                         f"{median:g} (most patches are the same in every image, e.g. constant images); give a "
                         "positive bandwidth instead, or images that differ")
    return median


# The parameters of every estimator (defaults: the estimators' signatures).
COMMON_PARAMS = table(
    Param("task", OneOf(TASKS), "classification, regression, or auto (read from the labels)"),
    Param("validation_fraction", Interval(0, 1, high_open=True),
          "share of the training images held out to pick the best iterate (not used with --val-data)",
          "--val-fraction", "F"),
    Param("preprocess", OneOf(PREPROCESSING), "pixel preprocessing fitted on the training split", "--preprocess"),
    Param("dtype", OneOf(DTYPES), "floating-point precision", "--dtype"),
    Param("device", DEVICE, "cpu or cuda", "--device"),
    Param("max_memory", AnyOf((OneOf((None,)), Positive())), "bytes for kernel blocks and AGOP chunks"),
    Param("random_state", SEED, "random seed of the split, centres and AGOP rows (default: none, a fresh seed; "
          "a fit resumed from its checkpoint reuses the checkpoint's seed)", "--seed", "N"),
    Param("checkpoint_dir", PATH_OR_NONE, "folder of the checkpoint of an interruptible fit"),
    Param("channels_last", OneOf(("auto", True, False)), "layout of 4-D images"),
    Param("progress", FLAG, "progress bars"),
)
# ... and of every estimator with a kernel solver (ConvRFM, DeepConvRFM).
SHARED_PARAMS = {**table(
    Param("penalty", Positive(), "ridge penalty λ", "--penalty"),
    Param("n_centres", Integer(1), "Nyström centres", "--centres", "M"),
    Param("maxiter", Integer(1), "Falkon CG iterations", "--maxiter"),
    Param("solver", OneOf(SOLVERS), "kernel ridge solver (auto: Falkon when installed)", "--solver"),
), **COMMON_PARAMS}


class RFMEstimator(BaseEstimator):
    """Shared machinery of the ConvRFM estimators (not used directly).

    Subclasses define ``_PARAMS`` (their :class:`~falkon_convrfm.params.Param` table), ``_FITTED`` (fitted attributes saved by :meth:`save`, the first one marks
    a fitted model; ``_OPTIONAL_FITTED`` are saved too, and None when a file made before them
    lacks them), ``_CHECKPOINT`` (the checkpoint file name), ``_scores(rows)`` (decision values
    (n, C) of prepared rows), ``_to_device(device)`` and ``_restore()`` (rebuild derived state
    after loading).
    """

    _PARAMS: dict = {}
    _FITTED: tuple = ()
    _OPTIONAL_FITTED: tuple = ("input_range_", "train_row_hashes_")
    _CHECKPOINT = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_estimator(cls)

    # ------------------------------------------------------------------ parameters
    def _check_params(self):
        """Check every parameter of ``_PARAMS`` (one-line ValueError/TypeError) before any work."""
        check_params(self._PARAMS, self)

    def _checkpoint_params(self):
        """The parameters a checkpoint must have been made with (all but progress and the folder)."""
        params = self.get_params(deep=False)
        return to_plain({k: v for k, v in params.items() if k not in ("progress", "checkpoint_dir")}, "params")

    def _store(self) -> CheckpointStore:
        """The checkpoint of this fit, its folder checked and a checkpoint of other parameters
        refused before any work (:meth:`CheckpointStore.open`)."""
        return CheckpointStore(self.checkpoint_dir, self._CHECKPOINT, self._checkpoint_params()).open()

    def _fit_seed(self, store: CheckpointStore) -> int:
        """``random_state``, else the seed of a checkpoint of this fit, else a fresh one."""
        if self.random_state is not None:
            return int(self.random_state)
        return store.seed if store.seed is not None else int(torch.randint(2**31, ()).item())

    # ------------------------------------------------------------------ data
    def _input_shape(self, X, name: str, fitted_shape=None):
        """The image shape to read ``X`` with: the fitted one, else the ``image_shape`` parameter."""
        return fitted_shape if fitted_shape is not None else getattr(self, "image_shape", None)

    def _check_image_shape(self, image_shape) -> None:
        """Hook: reject an image shape the model cannot use, before any work."""

    def _prepare(self, X, y, X_val, y_val, seed: int) -> PreparedData:
        """Validate and encode the data, split off validation rows (stratified for classes) unless
        ``X_val, y_val`` are given, fit the preprocessing on the training rows, move to the device.
        Sets ``task_``, ``classes_``, ``image_shape_``, ``preprocessor_``, ``input_range_``, ``seed_``
        and ``train_row_hashes_`` (the fingerprint of the rows of X and X_val, :func:`row_hashes`);
        warns about data that cannot give a meaningful result (:meth:`_warn_data`)."""
        dtype, device = resolve_dtype(self.dtype), resolve_device(self.device)
        rows, image_shape = image_rows(X, self._input_shape(X, "X"), self.channels_last, dtype)
        self._check_image_shape(image_shape)
        labels = as_labels(y, "y")
        task = resolve_task(labels, self.task)
        Y, classes, codes = encode_labels(labels, rows.shape[0], task, dtype)
        generator = torch.Generator().manual_seed(seed)
        if (X_val is None) != (y_val is None):
            raise ValueError("pass both X_val and y_val, or neither")
        if X_val is None:
            tr, val = train_val_split(rows.shape[0], self.validation_fraction, seed,
                                      None if codes is None else codes.numpy(), name="validation_fraction")
            Xtr, Ytr, Xval, Yval = rows[tr], Y[tr], rows[val], Y[val]
        else:
            Xtr, Ytr = rows, Y
            Xval, _ = image_rows(X_val, self._input_shape(X_val, "X_val", image_shape), self.channels_last, dtype,
                                 name="X_val", expected="X has images of shape {}")
            Yval, _, _ = encode_labels(y_val, Xval.shape[0], task, dtype, classes, name="y_val")
            if Yval.shape[1] != Ytr.shape[1]:
                raise ValueError(f"y_val has {Yval.shape[1]} target columns but y has {Ytr.shape[1]}")
        self.input_range_ = value_range(Xtr)
        self._warn_data(Xtr, Xval, X_val is not None)
        self.train_row_hashes_ = row_hashes(rows, *([] if X_val is None else [Xval]))
        self.preprocessor_ = make_preprocessor(self.preprocess)
        if self.preprocessor_ is not None:
            self.preprocessor_.fit(Xtr.reshape(-1, *image_shape))
            Xtr, Xval = (preprocess_rows(self.preprocessor_, t, image_shape) for t in (Xtr, Xval))
        self.task_, self.classes_, self.image_shape_, self.seed_ = task, classes, image_shape, seed
        Xtr, Ytr, Xval, Yval = (t.to(device) for t in (Xtr, Ytr, Xval, Yval))
        return PreparedData(Xtr, Ytr, Xval, Yval, image_shape, generator)

    def _warn_data(self, Xtr: torch.Tensor, Xval: torch.Tensor, given_val: bool) -> None:
        """Warn (:class:`~falkon_convrfm.validation.DataWarning`) about training rows ``Xtr`` that
        are all the same and about validation rows ``Xval`` (``given_val``: passed as ``X_val``,
        else split off) too few to choose an iterate or on another scale."""
        n, n_val = Xtr.shape[0], Xval.shape[0]
        if n > 1 and bool((Xtr == Xtr[0]).all()):
            low, high = self.input_range_
            what = f"constant images (every value {low:g})" if low == high else "the same image"
            warn(f"X: all {n} training images are {what}: the model cannot tell them apart and predicts one "
                 "value for every image", DataWarning)
        if 0 < n_val < MIN_VALIDATION:
            where = (f"X_val has {n_val} images" if given_val else
                     f"validation_fraction={self.validation_fraction:g} leaves {n_val} of the {n + n_val} images "
                     "for validation")
            advice = "more validation images" if given_val else "more images or a larger validation_fraction"
            warn(f"{where}, fewer than {MIN_VALIDATION} (one image is {100 / n_val:.3g} % of them): the validation "
                 f"scores and the iterate chosen by them are mostly noise; use {advice}", DataWarning)
        if given_val:
            warn_other_scale(Xval, self.input_range_, "X_val")

    def _rows(self, X, name: str = "X") -> torch.Tensor:
        """Prediction input as preprocessed rows on the model's device (a warning when its values
        lie on another scale than the training values, and when some of its rows are rows the
        model was fitted on)."""
        self._check_fitted()
        rows, _ = image_rows(X, self._input_shape(X, name, self.image_shape_), self.channels_last,
                             resolve_dtype(self.dtype), name, expected="the model was fitted on images of shape {}")
        warn_other_scale(rows, self.input_range_, name)
        self._warn_seen(rows)
        return preprocess_rows(self.preprocessor_, rows.to(self._device()), self.image_shape_)

    def _warn_seen(self, rows: torch.Tensor) -> None:
        """Warn when rows of ``rows`` were in the data of the fit (models saved before the
        fingerprint was stored cannot tell)."""
        hashes = getattr(self, "train_row_hashes_", None)
        seen = 0 if hashes is None else count_known(rows, hashes)
        if seen:
            warn(f"{seen} of the {rows.shape[0]} images scored were in the data this model was fitted on "
                 "(training or validation rows): scores on them overstate accuracy on new images")

    # ------------------------------------------------------------------ prediction
    def _check_fitted(self):
        if not hasattr(self, self._FITTED[0]):
            raise RuntimeError(f"This {type(self).__name__} is not fitted yet: call fit(X, y) first")

    @staticmethod
    def _output(values, like):
        """numpy for numpy (or other) input; a tensor on the input's device for torch input (class
        labels that are not numbers stay a numpy array)."""
        if isinstance(like, torch.Tensor):
            if isinstance(values, np.ndarray):
                return torch.from_numpy(values).to(like.device) if values.dtype.kind in "biuf" else values
            return values.to(like.device)
        return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values

    @scoped
    def decision_function(self, X):
        """f(X) (n, C): class scores or regression outputs (numpy for numpy input, torch for torch)."""
        return self._output(self._scores(self._rows(X)), X)

    @scoped
    def predict(self, X):
        """Class labels (classification) or real predictions (regression); numpy for numpy input,
        torch (on the input's device) for torch input."""
        scores = self._scores(self._rows(X))
        if self.task_ == "regression":
            return self._output(scores.squeeze(1) if scores.shape[1] == 1 else scores, X)
        return self._output(self.classes_[decision_codes(scores)], X)

    def _true_codes(self, y, n: int) -> np.ndarray:
        """Codes of class labels ``y`` in ``classes_`` (labels or one-hot rows), −1 for a label
        the model does not know."""
        index = {label: i for i, label in enumerate(self.classes_.tolist())}
        return np.array([index.get(v, -1) for v in class_labels(y, n, self.classes_).tolist()])

    @scoped
    def evaluate(self, X, y) -> dict:
        """Scores on images ``X`` with labels or targets ``y``
        (:mod:`~falkon_convrfm.scoring`): classification: ``accuracy``, and ``confusion``, the
        counts of true class i predicted as class j in the order of ``classes_`` (a label the
        model does not know is a ValueError); regression: ``r2`` (pooled over outputs) and ``mse``."""
        scores = self._scores(self._rows(X))
        if self.task_ == "regression":
            return self._regression_scores(scores, y)
        true = self._true_codes(y, scores.shape[0])
        if (true < 0).any():
            labels = class_labels(y, scores.shape[0], self.classes_)
            unknown = sorted({v for v, c in zip(labels.tolist(), true) if c < 0}, key=str)
            raise ValueError(f"labels {unknown} of the data are not among the model's classes {self.classes_.tolist()}")
        return class_scores(true, decision_codes(scores), len(self.classes_))

    def _regression_scores(self, scores: torch.Tensor, y) -> dict:
        return evaluate("regression", scores, encode_labels(y, scores.shape[0], "regression", scores.dtype)[0])

    @scoped
    def score(self, X, y) -> float:
        """Accuracy (classification; ``y`` as labels of the kind given to ``fit``, or one-hot rows;
        a label the model does not know counts as an error) or R² = 1 − Σ(ŷ − y)² / Σ(y − ȳ)²
        (regression, pooled over outputs)."""
        scores = self._scores(self._rows(X))
        if self.task_ == "classification":
            return accuracy(self._true_codes(y, scores.shape[0]), decision_codes(scores))
        return self._regression_scores(scores, y)["r2"]

    # ------------------------------------------------------------------ fitted metric
    def learned_metric(self, name: str | None = None) -> LearnedMetric:
        """The metric of every iteration, the history and the patch geometry of a one-layer model
        (``name``: how to call this model, by default its class name)."""
        self._check_fitted()
        return LearnedMetric(name or type(self).__name__, dict(enumerate(self.metrics_)), self.history_,
                             self.best_iteration_, tuple(self.image_shape_), self.patch_size, self.stride, self.padding)

    # ------------------------------------------------------------------ device
    def to(self, device):
        """Move the fitted model to ``device`` (it then predicts there); returns self."""
        self._check_fitted()
        self._to_device(resolve_device(device))
        return self

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict:
        return {"format": FILE_FORMAT, "class": type(self).__name__,
                "params": to_plain(self.get_params(deep=False), "params"),
                "fitted": {**{k: to_plain(getattr(self, k), k) for k in self._FITTED},
                           **{k: to_plain(getattr(self, k, None), k) for k in self._OPTIONAL_FITTED}}}

    @classmethod
    def _from_state(cls, state, source: str):
        if not isinstance(state, dict) or "class" not in state:
            raise ValueError(f"{source} is not a model file saved by falkon_convrfm")
        if state["class"] != cls.__name__:
            raise ValueError(f"{source} holds a {state['class']!r}, not a {cls.__name__}")
        fitted = state.get("fitted")
        missing = [k for k in cls._FITTED if not isinstance(fitted, dict) or k not in fitted]
        if not isinstance(state.get("params"), dict) or missing:
            raise ValueError(f"{source} is an incomplete {cls.__name__} file (missing {missing or ['params']})")
        try:
            model = cls(**from_plain(state["params"], source))
            for k in cls._FITTED:
                setattr(model, k, from_plain(fitted[k], source))
            for k in cls._OPTIONAL_FITTED:
                setattr(model, k, from_plain(fitted.get(k), source))
            model._restore()
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(message if source in message else f"{source}: not a valid {cls.__name__} ({message})") from exc
        return model

    def save(self, path) -> None:
        """Save parameters and fitted state (tensors and plain data, written atomically: a failure
        leaves an earlier file at ``path`` as it was and is an OSError naming the model file)."""
        self._check_fitted()
        atomic_save(self._state(), path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        """Load a model written by :meth:`save`, its tensors on ``map_location`` (default the CPU,
        so a GPU-fitted model loads anywhere; ``model.to(device)`` moves it afterwards)."""
        return cls._from_state(read_file(path, map_location, "model file"), file_name(path))
