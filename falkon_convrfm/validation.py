"""Checks of single values, with no imports from the package (a leaf module).

Numbers, choices, flags, bandwidths, pooling windows, seeds and dtypes; every check raises a
one-line ``ValueError`` or ``TypeError`` that names the argument and the problem. Inputs that are
read in a way the user might not expect (a float target taken as regression, a parameter that has
no effect) give a ``UserWarning`` (:func:`warn`) instead of being silently reinterpreted. Images,
labels and the validation split are read in :mod:`falkon_convrfm.inputs`.
"""
from __future__ import annotations

import numbers
import os
import sys
import warnings

import numpy as np
import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class DataWarning(UserWarning):
    """A warning about the data a model was given (too few validation images, identical images,
    values on another scale): the model that received the data from the user gives it; the models
    fitted inside it (the layers of a deep model) do not repeat it."""


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


def check_pooling(value):
    """Pooled regions of the patch grid: an int g ≥ 1 (a g×g grid) or (window, stride) with
    1 ≤ stride ≤ window."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"pooling must be an int g (g×g regions) or (window, stride), got {value!r}")
        window = positive_int("pooling window", value[0])
        stride = positive_int("pooling stride", value[1])
        if stride > window:
            raise ValueError(f"pooling stride {stride} is larger than the window {window} (locations would be skipped)")
        return (window, stride)
    return positive_int("pooling", value)


def check_random_state(value) -> int | None:
    """None (a fresh seed) or a non-negative integer seed."""
    return None if value is None else positive_int("random_state", value, minimum=0)


DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32, torch.float64: torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    """'float32' / 'float64' (or the torch dtypes) as a torch dtype."""
    if not isinstance(dtype, (str, torch.dtype)) or dtype not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return DTYPES[dtype]
