"""Input handling of the estimators: images as rows, the channel layout, labels, the split.

One layout rule (:func:`guess_channels_last`) serves the estimators and the file loaders, and one
uint8 scaling (:func:`pixels_as_float`) serves the estimators, the loaders and
:class:`~falkon_convrfm.preprocessing.Preprocessor`. Errors are one-line ``ValueError`` /
``TypeError`` naming the argument; readings the user might not expect warn
(:func:`~falkon_convrfm.validation.warn`).
"""
from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch

from .validation import as_tensor, check_choice, check_finite, check_random_state, positive_int, warn

__all__ = ["channels_last_layout", "image_rows", "resolve_task", "row_hashes", "train_val_split"]


def pixels_as_float(x: torch.Tensor, dtype) -> torch.Tensor:
    """``x`` as ``dtype``; uint8 pixels are scaled to [0, 1] (x / 255), other values only cast."""
    out = x.to(dtype)
    return out.div_(255) if x.dtype == torch.uint8 else out


# ---------------------------------------------------------------------------- images
CHANNEL_COUNTS = (1, 3, 4)  # sizes of an axis that reads as image channels (grey, RGB, RGBA)
LAYOUT_HINT = "pass channels_last=False for (n, c, H, W) images or channels_last=True for (n, H, W, c)"


def guess_channels_last(shape) -> bool | None:
    """The layout rule for 4-D images of ``shape`` (n, a, b, c) when none is stated: True
    ((n, H, W, c)) when the last axis has a channel count (1, 3 or 4) while the second has not
    and H, W > 4, False ((n, c, H, W)) when the last axis has no channel count, None when it is
    ambiguous (e.g. (n, 3, 32, 3), (n, 64, 4, 4) or (n, 4, 4, 3))."""
    a, b, c = (int(s) for s in shape[1:])
    if c not in CHANNEL_COUNTS:
        return False
    if a not in CHANNEL_COUNTS and a > 4 and b > 4:
        return True
    return None


def channels_last_layout(shape, channels_last="auto", image_shape=None, name: str = "X") -> bool:
    """Whether 4-D images of ``shape`` are (n, H, W, c).

    ``channels_last`` True/False is taken as given. ``"auto"``: with a known ``image_shape``
    (c, H, W) the layout whose shape matches it; otherwise :func:`guess_channels_last`. An
    ambiguous shape is a ValueError asking for ``channels_last``.
    """
    if channels_last is not True and channels_last is not False:
        check_choice("channels_last", channels_last, ("auto", True, False))
    if isinstance(channels_last, bool):
        return channels_last
    images = tuple(int(s) for s in shape[1:])
    if image_shape is not None:
        c, H, W = (int(s) for s in image_shape)
        first, last = images == (c, H, W), images == (H, W, c)
        if first != last or not first or c == 1:  # both match with c == 1 only for 1-pixel grey images: one layout
            return last and not first
    else:
        guess = guess_channels_last(shape)
        if guess is not None:
            return guess
    raise ValueError(f"{name} has shape {tuple(shape)}: cannot tell where its channel axis is; {LAYOUT_HINT}")


def as_images(X, name: str = "X"):
    """Tensors and numpy arrays as they are; other array-likes (nested lists of pixels, objects with
    ``__array__``) read by numpy, as scikit-learn reads them; anything else is a TypeError."""
    if isinstance(X, (torch.Tensor, np.ndarray)):
        return X
    if not (isinstance(X, (list, tuple)) or hasattr(X, "__array__")):
        raise TypeError(f"{name} must be images: a numpy array, a torch tensor or nested lists of pixel values, "
                        f"got {type(X).__name__}")
    try:
        return np.asarray(X)
    except ValueError:
        raise ValueError(f"{name} cannot be read as an array: its images or rows differ in size") from None


def image_rows(X, image_shape=None, channels_last="auto", dtype=torch.float32, name: str = "X",
               expected: str = "image_shape={}"):
    """Images → (rows (n, c·H·W), image_shape).

    Accepts (n, c, H, W) or (n, H, W, c) (see :func:`channels_last_layout`), (n, H, W) grey
    images, or flat rows (n, c·H·W) in the C-order of (c, H, W) when ``image_shape`` is given;
    torch tensors, numpy arrays or other array-likes (:func:`as_images`). uint8 images are scaled
    to [0, 1]. Raises ValueError on shape mismatch, NaN/Inf or empty data, TypeError on other types.
    ``expected`` says where a given ``image_shape`` comes from in a mismatch error (formatted with
    the shape).
    """
    X = as_tensor(as_images(X, name), name)
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if X.dim() == 4:
        if channels_last_layout(X.shape, channels_last, image_shape, name):
            X = X.permute(0, 3, 1, 2)
        shape = tuple(X.shape[1:])
        if image_shape is not None and tuple(image_shape) != shape:
            raise ValueError(f"{name} has images of shape {shape} but {expected.format(tuple(image_shape))}")
        image_shape = shape
    elif X.dim() == 2:
        if image_shape is None:
            raise ValueError(f"{name} is 2-D (flat rows): pass image_shape=(c, H, W) to say how to read them")
        if channels_last is True:
            warn(f"channels_last=True is ignored for the flat rows {name}: rows are read in the C-order of (c, H, W)")
        if X.shape[1] != int(np.prod(image_shape)):
            raise ValueError(
                f"{name} has rows of length {X.shape[1]} but {expected.format(tuple(image_shape))} "
                f"(rows of length {int(np.prod(image_shape))})"
            )
    else:
        raise ValueError(f"{name} must be images (n, c, H, W) / (n, H, W, c) or rows (n, D), got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 images)")
    rows = pixels_as_float(X.reshape(X.shape[0], -1), dtype).contiguous()
    check_finite(rows, name)
    return rows, tuple(int(s) for s in image_shape)


def row_hash_values(rows: torch.Tensor) -> np.ndarray:
    """The 64-bit hash (BLAKE2b of the bytes) of each row, in order (int64)."""
    data = rows.detach().cpu().contiguous().numpy().view(np.uint8).reshape(rows.shape[0], -1)
    return np.fromiter((int.from_bytes(hashlib.blake2b(memoryview(r), digest_size=8).digest(), "little", signed=True)
                        for r in data), dtype=np.int64, count=rows.shape[0])


def row_hashes(*rows: torch.Tensor) -> torch.Tensor:
    """The sorted distinct row hashes of the tensors ``rows``: a compact fingerprint of a data
    set (8 bytes per row), to count which rows of other data it holds (:func:`count_known`)."""
    return torch.from_numpy(np.unique(np.concatenate([row_hash_values(t) for t in rows])))


def count_known(rows: torch.Tensor, hashes: torch.Tensor) -> int:
    """How many of ``rows`` have a hash among ``hashes`` (a :func:`row_hashes` result)."""
    return int(np.isin(row_hash_values(rows), hashes.numpy()).sum())


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
def _generator(random_state) -> np.random.Generator:
    """None (fresh entropy), a non-negative int seed or a ``numpy.random.Generator`` (used as is)."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    return np.random.default_rng(check_random_state(random_state))


def _validation_count(n: int, val_size, name: str = "val_size") -> int:
    """The number of validation items for ``val_size`` (a count, or a fraction of n, rounded);
    errors call it ``name``."""
    if isinstance(val_size, numbers.Integral) and not isinstance(val_size, bool):
        n_val = int(val_size)
    elif isinstance(val_size, numbers.Real) and not isinstance(val_size, bool) and 0 <= val_size < 1:
        n_val = round(val_size * n)
    else:
        raise ValueError(f"{name} must be an int or a fraction in [0, 1), got {val_size!r}")
    if val_size != 0 and not 0 < n_val < n:
        raise ValueError(
            f"{name}={val_size!r} gives {n_val} validation items; the validation set must have "
            f"between 1 and n - 1 = {n - 1} items ({name}=0 for no validation set)"
        )
    return n_val


def train_val_split(n: int, val_size, random_state=None, labels=None, name: str = "val_size"):
    """Random (train, validation) index tensors (int64, sorted) partitioning range(n).

    Parameters
    ----------
    n : int
        Number of items.
    val_size : int or float
        The validation count (an int) or a fraction of n in (0, 1) (rounded); 0 or 0.0 means
        no validation set: ``(arange(n), empty)``.
    random_state : None, int or numpy.random.Generator
        Seed of the permutation (None: fresh entropy; a Generator is used, and advanced, as is).
    labels : array-like of shape (n,), optional
        Stratify by these labels: each class gives its proportional share
        ``n_val · n_c / n`` of the validation set, the largest remainders rounded up so that
        the total is exactly ``n_val``.
    name : str, default "val_size"
        What errors call ``val_size`` (the caller's parameter, e.g. ``validation_fraction``).

    Returns
    -------
    train_idx, val_idx : torch.Tensor
        Sorted int64 index tensors, disjoint, together ``range(n)``.
    """
    n = positive_int("n", n)
    n_val = _validation_count(n, val_size, name)
    if labels is not None:
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if y.size != n:
            raise ValueError(f"labels must have n = {n} entries, got {y.size}")
    rng = _generator(random_state)
    if n_val == 0:
        return torch.arange(n), torch.arange(0)
    perm = rng.permutation(n)
    if labels is None:
        val = perm[:n_val]
    else:
        _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        exact = counts * n_val / n
        quota = np.floor(exact).astype(np.int64)
        quota[np.argsort(quota - exact, kind="stable")[: n_val - quota.sum()]] += 1
        val = np.concatenate([perm[inverse[perm] == c][:q] for c, q in enumerate(quota)])
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return tuple(torch.from_numpy(np.flatnonzero(mask).astype(np.int64)) for mask in (~is_val, is_val))
