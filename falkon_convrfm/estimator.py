r"""The estimator base of :class:`~falkon_convrfm.ConvRFM` and :class:`~falkon_convrfm.DeepConvRFM`.

What both do the same way lives here: the parameters they share and their checks, the
preparation of images and labels (layout, label encoding, validation split, preprocessing,
device), the data fingerprint and the checkpoint store of an interruptible fit, the output types
(numpy in → numpy out, torch in → torch out), ``predict``/``score``, ``to(device)``, and saving and
loading.

**Files.** Models and checkpoints hold only tensors and plain data (dicts, lists, tuples, str,
int, float, bool, None); they are read with ``torch.load(weights_only=True)``, so a file holding
anything else (a crafted pickle, a JSON or binary file) is refused without running it, with a
one-line ``ValueError`` naming the file. Tensors are loaded on ``map_location`` (default the CPU),
so a model fitted on a GPU loads on a machine without one.

**random_state.** An int seeds every random choice of a fit (validation split, Nyström centres,
AGOP rows, random filters). ``None`` draws a fresh seed from torch's global generator (so
``torch.manual_seed`` makes it reproducible), as in scikit-learn; a fit that resumes from a
checkpoint reuses the seed the checkpoint was made with.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import pickle

import numpy as np
import torch
from sklearn.base import BaseEstimator

from ._compat import resolve_device
from .preprocessing import Preprocessor, train_val_split
from .solvers import SOLVERS
from .validation import (
    TASKS,
    as_labels,
    check_bool,
    check_choice,
    check_random_state,
    class_labels,
    encode_labels,
    image_rows,
    make_preprocessor,
    number_in,
    positive_int,
    positive_number,
    preprocess_rows,
    resolve_dtype,
    resolve_task,
    warn,
)

FILE_FORMAT = "falkon_convrfm"
_ESTIMATORS: dict[str, type] = {}  # class name → estimator class, for loading nested models
_DATACLASSES: dict[str, type] = {}  # dataclasses that may appear in parameters (LayerSpec)


def plain_dataclass(cls):
    """Register a dataclass whose instances may be saved as parameters (field dicts)."""
    _DATACLASSES[cls.__name__] = cls
    return cls


# ---------------------------------------------------------------------------- plain data
def to_plain(value, where: str = "value"):
    """``value`` as tensors and plain data for ``torch.save``: numpy scalars become Python numbers,
    numpy arrays, preprocessors, estimators and registered dataclasses tagged dicts. TypeError
    naming ``where`` for anything else."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return {"__ndarray__": to_plain(value.tolist(), where), "dtype": value.dtype.str}
    if isinstance(value, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {_plain_key(k, where): to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, Preprocessor):
        return {"__preprocessor__": value.state_dict()}
    if isinstance(value, RFMEstimator):
        return {"__estimator__": value._state()}
    if dataclasses.is_dataclass(value) and _DATACLASSES.get(type(value).__name__) is type(value):
        fields = {f.name: to_plain(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
        return {"__dataclass__": type(value).__name__, "fields": fields}
    raise TypeError(f"cannot save {where}: a {type(value).__name__} is neither a tensor nor plain data")


def _plain_key(key, where: str):
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise TypeError(f"cannot save {where}: dict key {key!r} is not a str or int")
    return key


def from_plain(value, source: str = "file"):
    """Inverse of :func:`to_plain`."""
    if isinstance(value, list):
        return [from_plain(v, source) for v in value]
    if isinstance(value, tuple):
        return tuple(from_plain(v, source) for v in value)
    if not isinstance(value, dict):
        return value
    if "__ndarray__" in value:
        values, dtype = from_plain(value["__ndarray__"], source), np.dtype(value["dtype"])
        if dtype.kind != "O":
            return np.array(values, dtype=dtype)
        out = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):
            out[i] = v
        return out
    if "__preprocessor__" in value:
        return Preprocessor.from_state_dict(value["__preprocessor__"])
    if "__estimator__" in value:
        return _estimator_class(value["__estimator__"], source)._from_state(value["__estimator__"], source)
    if "__dataclass__" in value:
        cls = _DATACLASSES.get(value["__dataclass__"])
        if cls is None:
            raise ValueError(f"{source} holds an unknown parameter type {value['__dataclass__']!r}")
        return cls(**from_plain(value["fields"], source))
    return {k: from_plain(v, source) for k, v in value.items()}


def _name(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def read_file(source, map_location="cpu", what: str = "model file"):
    """``torch.load(source, weights_only=True, map_location=...)``; a one-line ValueError naming
    the file when it is not a file of tensors and plain data (its content is never run)."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except OSError:  # missing file, a directory, no permission: the OS message names the path
        raise
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Check the documentation")]
        detail = f" ({lines[-1]})" if lines else ""
        raise ValueError(f"{_name(source)} is not a falkon_convrfm {what}: it is not made of tensors and plain data, "
                         f"and is refused without running it{detail}") from exc
    except Exception as exc:  # EOFError, a zip that is not a torch file, ...
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{_name(source)} is not a falkon_convrfm {what} ({type(exc).__name__}: {first})") from exc


def atomic_save(obj, path) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename: a kill never leaves a
    half-written file. Buffers (file objects) are written directly."""
    if not isinstance(path, (str, os.PathLike)):
        torch.save(obj, path)
        return
    path = os.fspath(path)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def data_fingerprint(*tensors) -> str:
    """A cheap content hash of the training data: shapes and a strided sample of ≤ ~10⁵ values
    per tensor (the same data and split give the same fingerprint)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        flat = t.reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 100_000)].double().cpu().numpy().tobytes())
    return h.hexdigest()


class CheckpointStore:
    """The checkpoint file of an interruptible fit (``directory/name``; no file when ``directory``
    is None): written atomically after every step, read back when a fit with the same data
    fingerprint and parameters runs again."""

    def __init__(self, directory, name: str):
        self.path = None if directory is None else os.path.join(os.fspath(directory), name)

    def _read(self, map_location="cpu"):
        if self.path is None or not os.path.exists(self.path):
            return None
        state = read_file(self.path, map_location, "checkpoint")
        if not (isinstance(state, dict) and state.get("kind") == "checkpoint"
                and {"fingerprint", "params", "seed", "state"} <= set(state)):
            raise ValueError(f"{self.path} is not a falkon_convrfm checkpoint")
        return state

    def saved_seed(self, params) -> int | None:
        """The seed of a checkpoint made with ``params`` (None when there is none)."""
        state = self._read()
        return int(state["seed"]) if state is not None and state["params"] == params else None

    def load(self, fingerprint: str, params, map_location="cpu"):
        """The saved state of a fit with this data and these parameters, else None (a checkpoint
        of another fit is ignored with a warning)."""
        state = self._read(map_location)
        if state is None:
            return None
        if state["fingerprint"] != fingerprint or state["params"] != params:
            warn(f"Ignoring checkpoint {self.path}: it was made with other data or parameters")
            return None
        return from_plain(state["state"], self.path)

    def save(self, fingerprint: str, params, seed: int, state: dict) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_save({"format": FILE_FORMAT, "kind": "checkpoint", "fingerprint": fingerprint, "params": params,
                     "seed": seed, "state": to_plain(state, "checkpoint")}, self.path)


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


def param_default(cls, name: str):
    """The default of parameter ``name`` in ``cls.__init__`` (the one source of defaults)."""
    return inspect.signature(cls.__init__).parameters[name].default


class RFMEstimator(BaseEstimator):
    """Shared machinery of the ConvRFM estimators (not used directly).

    Subclasses define ``_FITTED`` (fitted attributes saved by :meth:`save`, the first one marks
    a fitted model), ``_CHECKPOINT`` (the checkpoint file name), ``_scores(rows)`` (decision values
    (n, C) of prepared rows), ``_to_device(device)`` and ``_restore()`` (rebuild derived state
    after loading).
    """

    _FITTED: tuple = ()
    _CHECKPOINT = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _ESTIMATORS[cls.__name__] = cls

    # ------------------------------------------------------------------ parameters
    def _check_shared_params(self):
        """Checks of the parameters every estimator has (one-line ValueError/TypeError)."""
        positive_number("penalty", self.penalty)
        positive_int("n_centres", self.n_centres)
        positive_int("maxiter", self.maxiter)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("task", self.task, TASKS)
        number_in("validation_fraction", self.validation_fraction, 0, 1, high_open=True)
        make_preprocessor(self.preprocess)
        resolve_dtype(self.dtype)
        resolve_device(self.device)
        if self.max_memory is not None:
            positive_number("max_memory", self.max_memory)
        check_random_state(self.random_state)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be None or a path, got {type(self.checkpoint_dir).__name__}")
        check_choice("channels_last", self.channels_last, ("auto", True, False))
        check_bool("progress", self.progress)

    def _checkpoint_params(self):
        """The parameters a checkpoint must have been made with (all but progress and the folder)."""
        params = self.get_params(deep=False)
        return to_plain({k: v for k, v in params.items() if k not in ("progress", "checkpoint_dir")}, "params")

    def _store(self) -> CheckpointStore:
        return CheckpointStore(self.checkpoint_dir, self._CHECKPOINT)

    def _fit_seed(self, store: CheckpointStore) -> int:
        """``random_state``, else the seed of a checkpoint of this fit, else a fresh one."""
        if self.random_state is not None:
            return int(self.random_state)
        saved = store.saved_seed(self._checkpoint_params())
        return saved if saved is not None else int(torch.randint(2**31, ()).item())

    # ------------------------------------------------------------------ data
    def _input_shape(self, X, name: str, fitted_shape=None):
        """The image shape to read ``X`` with: the fitted one, else the ``image_shape`` parameter."""
        return fitted_shape if fitted_shape is not None else getattr(self, "image_shape", None)

    def _check_image_shape(self, image_shape) -> None:
        """Hook: reject an image shape the model cannot use, before any work."""

    def _prepare(self, X, y, X_val, y_val, seed: int) -> PreparedData:
        """Validate and encode the data, split off validation rows (stratified for classes) unless
        ``X_val, y_val`` are given, fit the preprocessing on the training rows, move to the device.
        Sets ``task_``, ``classes_``, ``image_shape_``, ``preprocessor_`` and ``seed_``."""
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
            tr, val = train_val_split(rows.shape[0], self.validation_fraction, seed, None if codes is None else codes.numpy())
            Xtr, Ytr, Xval, Yval = rows[tr], Y[tr], rows[val], Y[val]
        else:
            Xtr, Ytr = rows, Y
            Xval, _ = image_rows(X_val, self._input_shape(X_val, "X_val", image_shape), self.channels_last, dtype,
                                 name="X_val")
            Yval, _, _ = encode_labels(y_val, Xval.shape[0], task, dtype, classes, name="y_val")
            if Yval.shape[1] != Ytr.shape[1]:
                raise ValueError(f"y_val has {Yval.shape[1]} target columns but y has {Ytr.shape[1]}")
        self.preprocessor_ = make_preprocessor(self.preprocess)
        if self.preprocessor_ is not None:
            self.preprocessor_.fit(Xtr.reshape(-1, *image_shape))
            Xtr, Xval = (preprocess_rows(self.preprocessor_, t, image_shape) for t in (Xtr, Xval))
        self.task_, self.classes_, self.image_shape_, self.seed_ = task, classes, image_shape, seed
        Xtr, Ytr, Xval, Yval = (t.to(device) for t in (Xtr, Ytr, Xval, Yval))
        return PreparedData(Xtr, Ytr, Xval, Yval, image_shape, generator)

    def _rows(self, X, name: str = "X") -> torch.Tensor:
        """Prediction input as preprocessed rows on the model's device."""
        self._check_fitted()
        rows, _ = image_rows(X, self._input_shape(X, name, self.image_shape_), self.channels_last,
                             resolve_dtype(self.dtype), name)
        return preprocess_rows(self.preprocessor_, rows.to(self._device()), self.image_shape_)

    # ------------------------------------------------------------------ prediction
    def _check_fitted(self):
        if not hasattr(self, self._FITTED[0]):
            raise RuntimeError(f"This {type(self).__name__} is not fitted yet: call fit(X, y) first")

    def _codes(self, scores: torch.Tensor) -> np.ndarray:
        """Class codes of decision values: the sign of a single ±1 score, else the argmax."""
        codes = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(1)
        return codes.cpu().numpy()

    @staticmethod
    def _output(values, like):
        """numpy for numpy (or other) input; a tensor on the input's device for torch input (class
        labels that are not numbers stay a numpy array)."""
        if isinstance(like, torch.Tensor):
            if isinstance(values, np.ndarray):
                return torch.from_numpy(values).to(like.device) if values.dtype.kind in "biuf" else values
            return values.to(like.device)
        return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values

    def decision_function(self, X):
        """f(X) (n, C): class scores or regression outputs (numpy for numpy input, torch for torch)."""
        return self._output(self._scores(self._rows(X)), X)

    def predict(self, X):
        """Class labels (classification) or real predictions (regression); numpy for numpy input,
        torch (on the input's device) for torch input."""
        scores = self._scores(self._rows(X))
        if self.task_ == "regression":
            return self._output(scores.squeeze(1) if scores.shape[1] == 1 else scores, X)
        return self._output(self.classes_[self._codes(scores)], X)

    def score(self, X, y) -> float:
        """Accuracy (classification; ``y`` as labels of the kind given to ``fit``, or one-hot rows)
        or R² = 1 − Σ(ŷ − y)² / Σ(y − ȳ)² (regression, pooled over outputs)."""
        scores = self._scores(self._rows(X))
        n = scores.shape[0]
        if self.task_ == "classification":
            index = {label: i for i, label in enumerate(self.classes_.tolist())}
            true = np.array([index.get(v, -1) for v in class_labels(y, n, self.classes_).tolist()])
            return float(np.mean(self._codes(scores) == true))
        pred = scores.squeeze(1) if scores.shape[1] == 1 else scores
        Y = encode_labels(y, n, "regression", pred.dtype)[0].to(pred.device).reshape(pred.shape)
        return 1 - ((pred - Y) ** 2).sum().item() / ((Y - Y.mean(0)) ** 2).sum().item()

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
                "fitted": {k: to_plain(getattr(self, k), k) for k in self._FITTED}}

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
            model._restore()
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(message if source in message else f"{source}: not a valid {cls.__name__} ({message})") from exc
        return model

    def save(self, path) -> None:
        """Save parameters and fitted state (tensors and plain data, written atomically)."""
        self._check_fitted()
        atomic_save(self._state(), path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        """Load a model written by :meth:`save`, its tensors on ``map_location`` (default the CPU,
        so a GPU-fitted model loads anywhere; ``model.to(device)`` moves it afterwards)."""
        return cls._from_state(read_file(path, _map_location(map_location), "model file"), _name(path))


def _map_location(map_location):
    """A device name or torch.device is checked (CUDA asked for without CUDA: a clear error);
    other ``torch.load`` map_location forms (dicts, functions) pass through."""
    return resolve_device(map_location) if isinstance(map_location, (str, torch.device)) else map_location


def _estimator_class(state, source: str) -> type:
    """The estimator class a saved state names (ValueError when it names none)."""
    from . import deep, rfm  # noqa: F401  (importing them registers the estimator classes)

    kind = state.get("class") if isinstance(state, dict) else None
    if not isinstance(kind, str) or kind not in _ESTIMATORS:
        raise ValueError(f"{source} is not a model file saved by falkon_convrfm"
                         + (f" (unknown model class {kind!r})" if kind is not None else ""))
    return _ESTIMATORS[kind]


def load_model(path, map_location="cpu"):
    """Load any model written by ``save`` (ConvRFM, DeepConvRFM, DeepRFM), whatever its class;
    tensors on ``map_location`` (default the CPU)."""
    state = read_file(path, _map_location(map_location), "model file")
    return _estimator_class(state, _name(path))._from_state(state, _name(path))
