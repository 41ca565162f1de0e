"""Input conversion and validation shared by the estimators: images, labels, splits."""
from __future__ import annotations

import numpy as np
import torch

from .kernel import as_tensor, check_finite

DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32, torch.float64: torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return DTYPES[dtype]


def image_rows(X, image_shape=None, channels_last: bool = False, dtype=torch.float32, name: str = "X"):
    """Images → (rows (n, c·H·W), image_shape).

    Accepts (n, c, H, W), (n, H, W, c) with ``channels_last``, (n, H, W) grey images, or flat
    rows (n, c·H·W) when ``image_shape`` is given; torch tensors or numpy arrays. uint8 images
    are scaled to [0, 1]. Raises ValueError on shape mismatch, NaN/Inf or
    empty data.
    """
    X = as_tensor(X, name)
    if X.dim() == 3:
        X = X.unsqueeze(-1 if channels_last else 1)
    if X.dim() == 4:
        if channels_last:
            X = X.permute(0, 3, 1, 2)
        shape = tuple(X.shape[1:])
        if image_shape is not None and tuple(image_shape) != shape:
            raise ValueError(f"{name} has images of shape {shape} but image_shape={tuple(image_shape)}")
        image_shape = shape
    elif X.dim() == 2:
        if image_shape is None:
            raise ValueError(f"{name} is 2-D (flat rows): pass image_shape=(c, H, W) to say how to read them")
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


def resolve_task(y: torch.Tensor, task: str) -> str:
    if task not in ("auto", "classification", "regression"):
        raise ValueError(f"task must be 'auto', 'classification' or 'regression', got {task!r}")
    if task != "auto":
        return task
    return "regression" if y.is_floating_point() else "classification"


def encode_labels(y, n: int, task: str, dtype, classes=None):
    """Targets for ridge regression: one-hot (classification) or real (regression).

    Returns (Y (n, C), class labels or None, integer codes or None).
    """
    y = as_tensor(y, "y")
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels but X has {n} images")
    if task == "regression":
        Y = y.reshape(n, -1).to(dtype)
        check_finite(Y, "y")
        return Y, None, None
    if y.dim() != 1:
        raise ValueError(f"class labels must be 1-D, got shape {tuple(y.shape)}")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError("class labels must be integers (use task='regression' for real targets)")
    y = y.long()
    if classes is None:
        classes = torch.unique(y)
        if classes.numel() < 2:
            raise ValueError(f"classification needs at least 2 classes, y has only {classes.tolist()}")
    codes = torch.searchsorted(classes, y)
    if (codes >= classes.numel()).any() or not torch.equal(classes[codes.clamp_max(classes.numel() - 1)], y):
        raise ValueError("y contains labels not seen in the training labels")
    return torch.nn.functional.one_hot(codes, classes.numel()).to(dtype), classes, codes


def split_indices(n: int, fraction: float, generator: torch.Generator, codes=None):
    """(train, validation) index tensors; stratified by ``codes`` when given."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return torch.arange(n), torch.arange(0)
    if codes is None:
        perm = torch.randperm(n, generator=generator)
        n_val = max(1, int(round(fraction * n)))
        return perm[n_val:].sort().values, perm[:n_val].sort().values
    val = []
    for c in torch.unique(codes):
        idx = torch.nonzero(codes == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        val.append(idx[: int(round(fraction * idx.numel()))])
    val = torch.cat(val).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val


PREPROCESSING = (None, "standardize", "zca")


def make_preprocessor(preprocess):
    """A :class:`~falkon_convrfm.datasets.Preprocessor` for ``preprocess`` (None: no transform):
    ``"standardize"`` (per-channel) or ``"zca"`` (standardise, then ZCA over whole images)."""
    if preprocess not in PREPROCESSING:
        raise ValueError(f"preprocess must be one of {PREPROCESSING}, got {preprocess!r}")
    if preprocess is None:
        return None
    from .datasets import Preprocessor

    return Preprocessor(scale=False, standardize=True, zca=preprocess == "zca")


def preprocess_rows(prep, rows: torch.Tensor, image_shape) -> torch.Tensor:
    """Apply a fitted preprocessor to image rows (identity when ``prep`` is None)."""
    if prep is None or rows.shape[0] == 0:
        return rows
    return prep.transform(rows.reshape(-1, *image_shape)).reshape(rows.shape[0], -1).to(rows.dtype).contiguous()
