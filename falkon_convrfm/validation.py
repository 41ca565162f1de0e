"""Input validation in one place: tensors, numbers, choices, kernel names and bandwidths, images,
labels, the validation split and the preprocessing step of the estimators.

Used by the kernel, the estimators and the CLI; every check raises a one-line ``ValueError`` or
``TypeError`` that names the argument and the problem. Inputs that are read in a way the user
might not expect (a float target taken as regression, a parameter that has no effect) give a
``UserWarning`` (:func:`warn`) instead of being silently reinterpreted.
"""
from __future__ import annotations

import numbers
import os
import sys
import warnings

import numpy as np
import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category=UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (the user's line)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# ---------------------------------------------------------------------------- tensors and numbers
def as_tensor(X, name: str) -> torch.Tensor:
    """torch tensors pass through, numeric numpy arrays are wrapped (copied only when torch cannot
    share them: negative strides, non-native byte order); anything else is a TypeError."""
    if isinstance(X, torch.Tensor):
        return X
    if isinstance(X, np.ndarray):
        if X.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got a numpy array of dtype {X.dtype}")
        if not X.dtype.isnative or any(s < 0 for s in X.strides):
            X = np.ascontiguousarray(X, dtype=X.dtype.newbyteorder("="))
        return torch.from_numpy(X)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(X).__name__}")


def check_finite(X: torch.Tensor, name: str, rows_per_chunk: int = 4096) -> None:
    """ValueError if X holds NaN or Inf (checked in row chunks, no full-size temporary)."""
    for i in range(0, X.shape[0], rows_per_chunk):
        if not torch.isfinite(X[i : i + rows_per_chunk]).all():
            raise ValueError(f"{name} contains NaN or Inf")


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, or ValueError unless it is an integer ≥ ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_number(name: str, value) -> float:
    """``value`` as a float, or ValueError unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def number_in(name: str, value, low: float, high: float, high_open: bool = False) -> float:
    """``value`` as a float, or ValueError unless low ≤ value ≤ high (value < high if ``high_open``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or not (low <= value and (value < high if high_open else value <= high)):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}{')' if high_open else ']'}, got {value!r}")
    return float(value)


def _is_choice(value, choice) -> bool:
    if choice is None or isinstance(choice, bool):
        return value is choice
    return isinstance(value, type(choice)) and not isinstance(value, bool) and value == choice


def check_choice(name: str, value, choices):
    """``value``, or ValueError listing ``choices`` unless it is one of them."""
    if not any(_is_choice(value, c) for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value``, or TypeError unless it is a bool (numpy bools included)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_base_kernel(name) -> str:
    """The base kernel's name, or ValueError listing the registered ones."""
    from .base_kernels import BASE_KERNELS

    if not isinstance(name, str) or name not in BASE_KERNELS:
        raise ValueError(f"Unknown base kernel {name!r}; choose one of {tuple(BASE_KERNELS)}")
    return name


def check_sigma(sigma, allow=()) -> float | str:
    """A bandwidth: a positive finite number, or one of the strings in ``allow`` (e.g. 'median')."""
    if isinstance(sigma, str) and sigma in allow:
        return sigma
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not np.isfinite(sigma) or sigma <= 0:
        extra = "".join(f" or {a!r}" for a in allow)
        raise ValueError(f"sigma must be a positive finite number{extra}, got {sigma!r}")
    return float(sigma)


def check_pool_window(value) -> int:
    """An odd pooling window w ≥ 1 (a window centred on each location)."""
    w = positive_int("pool_window", value)
    if w % 2 == 0:
        raise ValueError(f"pool_window must be odd (a window centred on each location), got {value}")
    return w


def check_random_state(value) -> int | None:
    """None (a fresh seed) or a non-negative integer seed."""
    return None if value is None else positive_int("random_state", value, minimum=0)


DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32, torch.float64: torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    """'float32' / 'float64' (or the torch dtypes) as a torch dtype."""
    if not isinstance(dtype, (str, torch.dtype)) or dtype not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------- images
CHANNEL_COUNTS = (1, 3, 4)  # sizes of an axis that reads as image channels (grey, RGB, RGBA)
LAYOUT_HINT = "pass channels_last=False for (n, c, H, W) images or channels_last=True for (n, H, W, c)"


def channels_last_layout(shape, channels_last="auto", image_shape=None, name: str = "X") -> bool:
    """Whether 4-D images of ``shape`` are (n, H, W, c).

    ``channels_last`` True/False is taken as given. ``"auto"``: with a known ``image_shape``
    (c, H, W) the layout whose shape matches it; otherwise (n, H, W, c) when the last axis has a
    channel count (1, 3 or 4) while the second has not and H, W > 4, and (n, c, H, W) when the last
    axis has no channel count. Any other shape (e.g. (n, 3, 32, 3) or (n, 64, 4, 4)) is ambiguous:
    ValueError asking for ``channels_last``.
    """
    if channels_last is not True and channels_last is not False:
        check_choice("channels_last", channels_last, ("auto", True, False))
    if isinstance(channels_last, bool):
        return channels_last
    images = tuple(int(s) for s in shape[1:])
    if image_shape is not None:
        c, H, W = (int(s) for s in image_shape)
        first, last = images == (c, H, W), images == (H, W, c)
        if first != last or not first:
            return last
    else:
        a, b, c = images
        if c not in CHANNEL_COUNTS:
            return False
        if a not in CHANNEL_COUNTS and a > 4 and b > 4:
            return True
    raise ValueError(f"{name} has shape {tuple(shape)}: cannot tell where its channel axis is; {LAYOUT_HINT}")


def image_rows(X, image_shape=None, channels_last="auto", dtype=torch.float32, name: str = "X"):
    """Images → (rows (n, c·H·W), image_shape).

    Accepts (n, c, H, W) or (n, H, W, c) (see :func:`channels_last_layout`), (n, H, W) grey
    images, or flat rows (n, c·H·W) in the C-order of (c, H, W) when ``image_shape`` is given;
    torch tensors or numpy arrays. uint8 images are scaled to [0, 1]. Raises ValueError on shape
    mismatch, NaN/Inf or empty data, TypeError on other types.
    """
    X = as_tensor(X, name)
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if X.dim() == 4:
        if channels_last_layout(X.shape, channels_last, image_shape, name):
            X = X.permute(0, 3, 1, 2)
        shape = tuple(X.shape[1:])
        if image_shape is not None and tuple(image_shape) != shape:
            raise ValueError(f"{name} has images of shape {shape} but image_shape={tuple(image_shape)}")
        image_shape = shape
    elif X.dim() == 2:
        if image_shape is None:
            raise ValueError(f"{name} is 2-D (flat rows): pass image_shape=(c, H, W) to say how to read them")
        if channels_last is True:
            warn(f"channels_last=True is ignored for the flat rows {name}: rows are read in the C-order of (c, H, W)")
        if X.shape[1] != int(np.prod(image_shape)):
            raise ValueError(
                f"{name} has rows of length {X.shape[1]} but image_shape={tuple(image_shape)} needs "
                f"{int(np.prod(image_shape))}"
            )
    else:
        raise ValueError(f"{name} must be images (n, c, H, W) / (n, H, W, c) or rows (n, D), got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 images)")
    rows = X.reshape(X.shape[0], -1).to(dtype)
    rows = (rows / 255 if X.dtype == torch.uint8 else rows).contiguous()
    check_finite(rows, name)
    return rows, tuple(int(s) for s in image_shape)


# ---------------------------------------------------------------------------- labels
TASKS = ("auto", "classification", "regression")


def as_labels(y, name: str = "y") -> np.ndarray:
    """Labels or targets as a 1-D or 2-D numpy array: torch tensors (any device), numpy arrays,
    lists and other array-likes (e.g. a pandas Series). A column (n, 1) becomes (n,)."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu()
        y = (y.double() if y.dtype in (torch.bfloat16, torch.float16) else y).numpy()
    elif not isinstance(y, np.ndarray):
        if y is None or isinstance(y, (str, bytes, numbers.Number)) or not hasattr(y, "__len__"):
            raise TypeError(f"{name} must be an array, tensor or list of labels, got {type(y).__name__}")
        try:
            y = np.asarray(y)
        except ValueError as exc:
            raise ValueError(f"{name} cannot be read as an array of labels ({exc})") from exc
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D labels (n,) or 2-D targets (n, k), got shape {y.shape}")
    return y


def is_one_hot(y: np.ndarray) -> bool:
    """Rows of 0/1 with exactly one 1 each (Falkon's convention for class targets), C ≥ 2."""
    if y.ndim != 2 or y.shape[1] < 2 or y.dtype.kind not in "biuf":
        return False
    return bool(np.isin(y, (0, 1)).all() and (y.sum(1) == 1).all())


def resolve_task(y: np.ndarray, task: str = "auto") -> str:
    """'classification' or 'regression' for labels ``y`` (see :func:`as_labels`).

    ``task='auto'``: one-hot rows, integer, bool, string and other non-numeric labels →
    classification; 2-D real targets → regression. Floats warn, since both readings are common:
    integer-valued floats (0.0, 1.0, ...) → classification, other floats → regression.
    """
    check_choice("task", task, TASKS)
    if task != "auto":
        return task
    if y.ndim == 2:
        return "classification" if is_one_hot(y) else "regression"
    if np.issubdtype(y.dtype, np.floating):
        if np.isfinite(y).all() and np.array_equal(y, np.round(y)):
            warn("y holds integer-valued floats: task='auto' takes them as class labels "
                 "(pass task='classification' or task='regression' to say which)")
            return "classification"
        warn("y holds non-integer floats: task='auto' takes them as regression targets "
             "(pass task='regression' to confirm, or integer class labels for classification)")
        return "regression"
    if np.issubdtype(y.dtype, np.complexfloating):
        raise TypeError(f"y must hold real numbers or class labels, got dtype {y.dtype}")
    return "classification"


def unique_labels(y: np.ndarray) -> np.ndarray:
    """The distinct labels, sorted when they are mutually comparable, else in order of first
    appearance."""
    try:
        return np.unique(y)
    except TypeError:  # e.g. a mix of strings and numbers in an object array
        seen = list(dict.fromkeys(y.tolist()))
        out = np.empty(len(seen), dtype=object)
        out[:] = seen
        return out


def label_codes(y: np.ndarray, classes: np.ndarray, name: str = "y") -> np.ndarray:
    """Integer codes of the labels ``y`` in ``classes`` (ValueError naming unseen labels)."""
    index = {label: i for i, label in enumerate(classes.tolist())}
    values = y.tolist()
    unseen = [v for v in dict.fromkeys(values) if v not in index]
    if unseen:
        raise ValueError(f"{name} contains labels not seen in the training labels: {unseen[:5]}")
    return np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values))


def class_labels(y, n: int, classes=None, name: str = "y") -> np.ndarray:
    """1-D class labels from labels or one-hot rows (decoded as ``classes[argmax]``, or column
    indices before ``classes`` are known), checked for length n."""
    y = as_labels(y, name)
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels but X has {n} images")
    if y.ndim == 2:
        if not is_one_hot(y):
            raise ValueError(f"class labels {name} must be 1-D or one-hot rows (n, C), got a {y.shape} array "
                             "that is not one-hot (use task='regression' for real targets)")
        if classes is not None and y.shape[1] != len(classes):
            raise ValueError(f"{name} has {y.shape[1]} one-hot columns but the model has {len(classes)} classes")
        codes = y.argmax(1)
        return codes if classes is None else classes[codes]
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise ValueError(f"class labels {name} contain NaN or Inf")
        if not np.array_equal(y, np.round(y)):
            raise ValueError(f"class labels {name} must be integers (use task='regression' for real targets)")
    return y


def encode_labels(y, n: int, task: str, dtype, classes=None, name: str = "y"):
    """Targets for ridge regression: one-hot (classification) or real (regression).

    Returns (Y (n, C) tensor of ``dtype``, classes (numpy array) or None, codes (int64 tensor) or
    None). Known ``classes`` (validation labels) must contain every label of ``y``.
    """
    if task == "regression":
        y = as_labels(y, name)
        if y.shape[0] != n:
            raise ValueError(f"{name} has {y.shape[0]} labels but X has {n} images")
        if y.dtype.kind not in "biuf":
            raise TypeError(f"regression targets {name} must be numbers, got dtype {y.dtype}")
        Y = torch.from_numpy(np.ascontiguousarray(y)).reshape(n, -1).to(dtype)
        check_finite(Y, name)
        return Y, None, None
    y = as_labels(y, name)
    if classes is None and is_one_hot(y):
        classes = np.arange(y.shape[1])
    labels = class_labels(y, n, classes, name)
    if classes is None:
        classes = unique_labels(labels)
        if len(classes) < 2:
            raise ValueError(f"classification needs at least 2 classes, {name} has only {classes.tolist()}")
    codes = torch.from_numpy(label_codes(labels, classes, name))
    return torch.nn.functional.one_hot(codes, len(classes)).to(dtype), classes, codes


# ---------------------------------------------------------------------------- split
# ---------------------------------------------------------------------------- preprocessing
PREPROCESSING = (None, "standardize", "zca")


def make_preprocessor(preprocess):
    """A :class:`~falkon_convrfm.preprocessing.Preprocessor` for ``preprocess`` (None: no
    transform): ``"standardize"`` (per-channel) or ``"zca"`` (standardise, then ZCA over whole
    images)."""
    check_choice("preprocess", preprocess, PREPROCESSING)
    if preprocess is None:
        return None
    from .preprocessing import Preprocessor

    return Preprocessor(scale=False, standardize=True, zca=preprocess == "zca")


def preprocess_rows(prep, rows: torch.Tensor, image_shape) -> torch.Tensor:
    """Apply a fitted preprocessor to image rows (identity when ``prep`` is None)."""
    if prep is None or rows.shape[0] == 0:
        return rows
    return prep.transform(rows.reshape(-1, *image_shape)).reshape(rows.shape[0], -1).to(rows.dtype).contiguous()
