r"""Image datasets as channels-first tensors, and a synthetic local-signal task.

Every loader returns an :class:`ImageDataset`: ``images`` (n, c, H, W) of a floating ``dtype``
(float32 by default) and ``labels`` (n,) int64. uint8 pixel data is scaled to [0, 1] on load
(x / 255); data stored as floats is only cast. Files are read in their distributed formats, with
no torchvision needed (its download folders work as they are), and a missing or malformed file
raises a one-line FileNotFoundError / ValueError that names the file and the problem. No file
can run code: CIFAR pickles go through an unpickler that admits only numpy arrays, npz files are
read with ``allow_pickle=False``. Preprocessing and the train/validation split are in
:mod:`falkon_convrfm.preprocessing`.
"""
from __future__ import annotations

import dataclasses
import gzip
import numbers
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from .inputs import guess_channels_last, pixels_as_float
from .validation import positive_int

__all__ = [
    "ImageDataset",
    "load_cifar",
    "load_dataset",
    "load_image_folder",
    "load_mnist",
    "load_npz",
    "load_svhn",
    "make_local_signal",
]

DIGITS = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)


@dataclasses.dataclass
class ImageDataset:
    """images (n, c, H, W) float, labels (n,) int64, class names (index = label) or None."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.images.ndim != 4 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(
                f"ImageDataset needs images (n, c, H, W) and labels (n,), "
                f"got {tuple(self.images.shape)} and {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------- file helpers
def _existing(path, what: str) -> Path:
    """``path`` as a Path, or FileNotFoundError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _find_dir(root, subdirs, markers) -> Path:
    """The first of ``root``, ``root/subdir``… that holds one of the ``markers`` files."""
    root = _existing(root, "dataset folder")
    for folder in [root, *(root / s for s in subdirs)]:
        if any((folder / m).is_file() for m in markers):
            return folder
    raise FileNotFoundError(f"{' / '.join(markers)} not found in {root} or its sub-folders {', '.join(subdirs)}")


def _decode(path: Path, reader, what: str):
    """``reader(path)``, any decoding failure re-raised as a one-line ValueError naming the file."""
    try:
        return reader(path)
    except Exception as exc:  # decoders (pickle, scipy, numpy, gzip, PIL) raise many types
        reason = " ".join(str(exc).split())
        raise ValueError(f"{path}: not a valid {what} file ({type(exc).__name__}: {reason})") from None


def _get(mapping, key: str, path: Path):
    """``mapping[key]``, or a ValueError naming the file, the key and the keys present."""
    if key not in mapping:
        found = ", ".join(repr(k) for k in mapping if not str(k).startswith("__"))
        raise ValueError(f"{path}: missing key {key!r} (found: {found or 'none'})")
    return mapping[key]


def _to_images(array: np.ndarray, dtype: torch.dtype, path: Path) -> torch.Tensor:
    """NCHW numpy array of real numbers → contiguous tensor of ``dtype``; uint8 is scaled to [0, 1] (x / 255)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise ValueError(f"{path}: images must hold integers or floats, got dtype {array.dtype}")
    return pixels_as_float(torch.from_numpy(np.require(array, requirements=("C", "W"))), dtype)


def _to_labels(labels, n: int, path: Path, num_classes: int | None = None, first: int = 0) -> torch.Tensor:
    """Integer labels as an (n,) int64 tensor, checked for length, integrality and the range
    [first, first + num_classes) (or ≥ first without ``num_classes``)."""
    y = np.asarray(labels).reshape(-1)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{path}: labels must be integer class indices, got dtype {y.dtype}")
    if y.size != n or not np.all(y == np.round(y)):
        raise ValueError(f"{path}: expected {n} integer labels, got {y.size} of dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < first or (num_classes is not None and y.max() >= first + num_classes)):
        bound = f"[{first}, {first + num_classes})" if num_classes is not None else f">= {first}"
        raise ValueError(f"{path}: labels must be {bound}, got range [{y.min()}, {y.max()}]")
    return torch.from_numpy(y)


# ---------------------------------------------------------------------------- CIFAR
@dataclasses.dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str


_CIFAR = {
    10: _CifarLayout(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    100: _CifarLayout(
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes under protocol 2: ``(text, 'latin1')`` only."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r}): only latin1 text")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """``bytes()`` as Python 3 pickles b'' under protocol 2."""
    return b""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data and numpy arrays: it cannot run code.

    CIFAR's python batches are Python 2 pickles of dicts with bytes keys, lists, ints, strings
    and uint8 arrays; their only globals are numpy's array reconstruction (``_reconstruct``,
    ``ndarray``, ``dtype``, under numpy 1's and numpy 2's module names). Batches re-saved by
    Python 3 with protocol ≤ 2 also write bytes as ``_codecs.encode(text, 'latin1')`` and b'' as
    ``bytes()``, admitted in those forms only. Any other global raises UnpicklingError.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
        ("__builtin__", "bytes"): _empty_bytes,
        ("builtins", "bytes"): _empty_bytes,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name} (a CIFAR batch holds only numpy arrays and plain data)"
            ) from None


def _unpickle(path: Path) -> dict:
    """A CIFAR pickle (written by Python 2: bytes keys) as a dict with str keys, read safely."""
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(d, dict):
        raise pickle.UnpicklingError(f"holds a {type(d).__name__}, expected a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar(root, train: bool = True, num_classes: int = 10, dtype=torch.float32) -> ImageDataset:
    """CIFAR-10 / CIFAR-100 from the distributed python-pickle batches.

    ``root`` is the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (torchvision's
    root) or that batches folder itself. CIFAR-100 uses the 100 fine labels. Each batch holds
    ``data`` (N, 3072) uint8 in (c, H, W) order and ``labels`` / ``fine_labels``; the meta file
    gives the class names. Images come back (n, 3, 32, 32) in [0, 1].
    """
    if num_classes not in _CIFAR:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes!r}")
    layout = _CIFAR[num_classes]
    folder = _find_dir(root, [layout.folder], [layout.meta])
    meta_path = folder / layout.meta
    names = _get(_decode(meta_path, _unpickle, "CIFAR meta pickle"), layout.names_key, meta_path)
    images, labels = [], []
    for name in layout.train if train else layout.test:
        path = _existing(folder / name, f"CIFAR-{num_classes} batch")
        batch = _decode(path, _unpickle, "CIFAR pickle")
        data = np.asarray(_get(batch, "data", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: 'data' must be an (N, 3072) uint8 array, got {data.dtype} {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(_to_labels(_get(batch, layout.label_key, path), len(data), path, num_classes))
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return ImageDataset(_to_images(np.concatenate(images), dtype, folder), torch.cat(labels), classes)


# ---------------------------------------------------------------------------- SVHN
def load_svhn(root_or_file, split: str = "train", dtype=torch.float32) -> ImageDataset:
    """SVHN cropped digits from ``{split}_32x32.mat`` (split: train, test or extra).

    ``root_or_file`` is the .mat file itself (then ``split`` is not used) or its folder
    (torchvision's root). The file (MATLAB v5) holds X (32, 32, 3, N) uint8 and y (N, 1) with
    labels 1..10, the digit 0 stored as 10 and mapped here to 0; anything else is refused.
    Images come back (n, 3, 32, 32) in [0, 1].
    """
    from scipy.io import loadmat

    if split not in ("train", "test", "extra"):
        raise ValueError(f"SVHN split must be 'train', 'test' or 'extra', got {split!r}")
    path = _existing(root_or_file, "SVHN file or folder")
    if path.is_dir():
        path = _existing(path / f"{split}_32x32.mat", "SVHN file")
    mat = _decode(path, loadmat, "MATLAB (v5)")
    X = _get(mat, "X", path)
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[2] != 3:
        raise ValueError(f"{path}: 'X' must be an (H, W, 3, N) uint8 array, got {X.dtype} {X.shape}")
    y = _to_labels(_get(mat, "y", path), X.shape[3], path, num_classes=10, first=1)
    return ImageDataset(_to_images(X.transpose(3, 2, 0, 1), dtype, path), y % 10, DIGITS)


# ---------------------------------------------------------------------------- MNIST
def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in ``.gz``."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        return f.read()


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (optionally gzipped) as an ndim-d uint8 array.

    Header: magic 0x0000_08_ndim (2049 for labels, 2051 for images), then ndim big-endian
    uint32 dimensions, then the data, row-major.
    """
    raw = _decode(path, _read_bytes, "IDX")
    header, expected = 4 + 4 * ndim, 0x0800 | ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected:
        raise ValueError(f"{path}: IDX magic number {magic}, expected {expected} ({ndim}-d uint8 array)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    if len(raw) - header != np.prod(dims):
        raise ValueError(
            f"{path}: IDX header dims {dims} need {np.prod(dims)} data bytes, found {len(raw) - header} "
            "(truncated or corrupt file)"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_mnist(root, train: bool = True, fashion: bool = False, dtype=torch.float32) -> ImageDataset:
    """MNIST or Fashion-MNIST from the IDX files, gzipped (``.gz``) or not.

    Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (``t10k-…`` for the test
    split), in ``root`` itself, ``root/raw`` or torchvision's ``root/MNIST/raw``
    (``root/FashionMNIST/raw`` when ``fashion``). ``fashion`` also sets the class names.
    Images come back (n, 1, 28, 28) in [0, 1].
    """
    prefix = "train" if train else "t10k"
    image_name, label_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    subdirs = ["raw", f"{'FashionMNIST' if fashion else 'MNIST'}/raw"]
    folder = _find_dir(root, subdirs, [image_name, image_name + ".gz"])

    def idx_path(name):
        return folder / name if (folder / name).is_file() else _existing(folder / f"{name}.gz", "IDX file")

    images = _read_idx(idx_path(image_name), 3)
    label_path = idx_path(label_name)
    labels = _to_labels(_read_idx(label_path, 1), len(images), label_path, num_classes=10)
    classes = FASHION_MNIST_CLASSES if fashion else DIGITS
    return ImageDataset(_to_images(images[:, None], dtype, folder), labels, classes)


# ---------------------------------------------------------------------------- npz
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of a .npy file
def _read_npz(path: Path) -> dict:
    """The arrays of an .npz archive by name (no pickled objects: ``allow_pickle=False``)."""
    if path.is_dir():
        raise IsADirectoryError("a folder, not a file")
    with open(path, "rb") as f:
        npy = f.read(len(NPY_MAGIC)) == NPY_MAGIC
    if not (npy or zipfile.is_zipfile(path)):
        raise ValueError("not an .npz archive (a zip of .npy arrays, as numpy.savez writes): a truncated or damaged "
                         "file, or another kind of file")
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array, not an .npz archive of named arrays ('images', 'labels')")
    with data as f:
        if not all(name.endswith(".npy") for name in f.zip.namelist()):
            raise ValueError("a zip archive of other files (a torch.save file?), not an .npz archive of .npy arrays")
        return {k: f[k] for k in f.files}


def _channel_axis_first(images: np.ndarray, layout: str, path: Path) -> np.ndarray:
    """(N, H, W) grey, (N, H, W, C) or (N, C, H, W) → (N, C, H, W) (a view).

    ``layout="auto"``: the estimators' rule, :func:`~falkon_convrfm.inputs.guess_channels_last`;
    an ambiguous shape is an error asking for ``layout``.
    """
    if images.ndim == 3:
        return images[:, None]
    if images.ndim != 4:
        raise ValueError(f"{path}: 'images' must be (N, H, W), (N, H, W, C) or (N, C, H, W), got {images.shape}")
    if layout == "auto":
        channels_last = guess_channels_last(images.shape)
        if channels_last is None:
            raise ValueError(
                f"{path}: cannot tell the channel axis of images {images.shape}; pass load_npz(..., "
                "layout='hwc') for (N, H, W, C) or layout='chw' for (N, C, H, W) (on the command line: --layout)"
            )
        layout = "hwc" if channels_last else "chw"
    return images.transpose(0, 3, 1, 2) if layout == "hwc" else images


def load_npz(path, layout: str = "auto", dtype=torch.float32) -> ImageDataset:
    """An .npz with ``images`` and ``labels`` (and optionally ``classes``, the class names).

    ``images``: (N, H, W) grey, (N, H, W, C) ("hwc") or (N, C, H, W) ("chw"); ``layout="auto"``
    reads the layout as the estimators do (:func:`~falkon_convrfm.inputs.guess_channels_last`:
    HWC when the last axis has size 1, 3 or 4 and the others not, with H, W > 4; CHW when the last
    axis has no channel count) and asks for ``layout`` when the shape is ambiguous. uint8 images are scaled to [0, 1]. ``labels`` are integer
    class indices; with ``classes`` (1-d, names as str or bytes) they must index it.
    """
    if layout not in ("auto", "hwc", "chw"):
        raise ValueError(f"layout must be 'auto', 'hwc' or 'chw', got {layout!r}")
    path = _existing(path, "npz file")
    arrays = _decode(path, _read_npz, "npz")
    images = _channel_axis_first(_get(arrays, "images", path), layout, path)
    classes = None
    if "classes" in arrays:
        names = arrays["classes"]
        if names.ndim != 1:
            raise ValueError(f"{path}: 'classes' must be a 1-d array of class names, got shape {names.shape}")
        classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in names.tolist())
    labels = _to_labels(_get(arrays, "labels", path), len(images), path, None if classes is None else len(classes))
    return ImageDataset(_to_images(images, dtype, path), labels, classes)


# ---------------------------------------------------------------------------- image folder
def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("load_image_folder needs Pillow: `pip install pillow`") from None
    return Image


def _image_mode(path: Path) -> str:
    with _pil().open(path) as im:
        return im.mode


def _image_array(path: Path, mode: str, size) -> np.ndarray:
    """The image as an (H, W, C) uint8 array in ``mode``, resized to ``size`` = (H, W) if given."""
    Image = _pil()
    with Image.open(path) as im:
        im = im.convert(mode)
        if size is not None:
            im = im.resize(size[::-1], Image.Resampling.BILINEAR)
        return np.asarray(im).reshape(im.height, im.width, -1)


def _image_size(size):
    """None, an int or (H, W) → None or an (H, W) tuple of positive ints."""
    if size is None:
        return None
    hw = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in hw):
        raise ValueError(f"size must be None, a positive int or (H, W), got {size!r}")
    return hw


def load_image_folder(root, size=None, dtype=torch.float32) -> ImageDataset:
    """Images in one sub-folder per class (``root/<class>/<image>``, torchvision's ImageFolder).

    Labels index the sorted class names. Images are read with Pillow, as grey (1 channel) when
    every image is grey ("1" or "L" mode), as RGB otherwise, and resized (bilinear) to ``size``
    (int or (H, W)) if given; without ``size`` they must all have the same size.
    Returns images (n, c, H, W) in [0, 1] and the class names.
    """
    Image = _pil()
    root = _existing(root, "image folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders")
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in extensions)
        if not found:
            raise ValueError(f"{root / name}: no image files in class folder {name!r}")
        files += found
        labels += [label] * len(found)
    size = _image_size(size)
    grey = all(_decode(p, _image_mode, "image") in ("1", "L") for p in files)
    arrays = [_decode(p, lambda q: _image_array(q, "L" if grey else "RGB", size), "image") for p in files]
    for path, a in zip(files, arrays):
        if a.shape != arrays[0].shape:
            raise ValueError(f"{path}: size {a.shape[:2]} differs from {arrays[0].shape[:2]} of {files[0]}; pass size=")
    images = np.stack(arrays).transpose(0, 3, 1, 2)
    return ImageDataset(_to_images(images, dtype, root), torch.tensor(labels, dtype=torch.int64), tuple(classes))


# ---------------------------------------------------------------------------- dispatcher
def _is_train(split: str) -> bool:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split == "train"


_OPTIONS = {  # dataset name → the keyword options its loader takes
    "cifar10": ("dtype",),
    "cifar100": ("dtype",),
    "svhn": ("dtype",),
    "mnist": ("dtype",),
    "fashion-mnist": ("dtype",),
    "npz": ("dtype", "layout"),
    "folder": ("dtype", "size"),
}


def load_dataset(name: str, path, split: str = "train", **options) -> ImageDataset:
    """Load a dataset by name: cifar10, cifar100, svhn, mnist, fashion-mnist, npz or folder.

    ``path`` is the dataset root (torchvision's root works), or for "npz" / "folder" the file /
    folder of the wanted split, ``split`` then not being used. ``options`` go to the loader
    (``dtype``; ``layout`` for npz; ``size`` for folder); any other option is refused.
    uint8 images are scaled to [0, 1].
    """
    key = name.lower().replace("_", "-") if isinstance(name, str) else None
    if key not in _OPTIONS:
        raise ValueError(f"unknown dataset {name!r}: choose {', '.join(_OPTIONS)}")
    refused = sorted(set(options) - set(_OPTIONS[key]))
    if refused:
        raise ValueError(f"dataset {key!r} takes the options {', '.join(_OPTIONS[key])}; got {', '.join(refused)}")
    if key in ("cifar10", "cifar100"):
        return load_cifar(path, _is_train(split), int(key[5:]), **options)
    if key == "svhn":
        return load_svhn(path, split, **options)
    if key in ("mnist", "fashion-mnist"):
        return load_mnist(path, _is_train(split), key == "fashion-mnist", **options)
    if key == "npz":
        return load_npz(path, **options)
    return load_image_folder(path, **options)


# ---------------------------------------------------------------------------- synthetic task
def _plus(size: int) -> np.ndarray:
    """'+' of the middle row and column (2·size − 1 ones)."""
    p = np.zeros((size, size))
    p[size // 2, :] = p[:, size // 2] = 1
    return p


def _cross(size: int) -> np.ndarray:
    """'×' of the two diagonals (2·size − 1 ones, as many as the plus)."""
    return np.maximum(np.eye(size), np.fliplr(np.eye(size)))


def _absent(size: int) -> np.ndarray:
    return np.zeros((size, size))


# kind → (pattern of label 0, pattern of label 1)
LOCAL_SIGNAL_PATTERNS = {"plus_vs_cross": (_plus, _cross), "present_vs_absent": (_absent, _plus)}


def make_local_signal(
    n: int,
    image_size: int = 16,
    pattern_size: int = 5,
    noise: float = 0.5,
    kind: str = "plus_vs_cross",
    channels: int = 1,
    random_state=None,
    dtype=torch.float32,
):
    r"""Noise images whose label is set by a small pattern at a uniformly random location.

    .. math::  x = A\,P_y(\text{at } (i, j)) + σ ε, \qquad ε_{c,h,w} \sim \mathcal N(0, 1),

    with amplitude A = 1 and σ = ``noise``; the pattern (``pattern_size``, odd) is added to every
    channel, (i, j) is uniform over the valid top-left corners. ``kind``:

    * ``"plus_vs_cross"``: label 0 has a plus '+' (middle row and column), label 1 a cross '×'
      (both diagonals); both have 2·pattern_size − 1 pixels, so the same energy;
    * ``"present_vs_absent"``: label 1 has a plus, label 0 is pure noise.

    Classes are balanced (n // 2 and n − n // 2) in random order. The default σ = 0.5 makes
    plus-vs-cross (16×16) hard for a fixed kernel yet learnable (docs/results.md, "The synthetic
    local-signal task"). ``random_state``: None, an int seed or a ``numpy.random.Generator``.
    Returns images (n, channels, image_size, image_size) of ``dtype`` and labels (n,) int64.
    """
    if kind not in LOCAL_SIGNAL_PATTERNS:
        raise ValueError(f"kind must be one of {tuple(LOCAL_SIGNAL_PATTERNS)}, got {kind!r}")
    integers = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (pattern_size, image_size))
    if not (integers and pattern_size >= 3 and pattern_size % 2 == 1 and image_size >= pattern_size):
        raise ValueError(
            f"need integers odd pattern_size >= 3 and image_size >= pattern_size, got {pattern_size}, {image_size}"
        )
    n, channels = positive_int("n", n), positive_int("channels", channels)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(random_state)
    labels = rng.permutation(np.arange(n) % 2)
    label0, label1 = (pattern(pattern_size) for pattern in LOCAL_SIGNAL_PATTERNS[kind])
    patterns = np.where(labels[:, None, None] == 0, label0, label1)
    images = noise * rng.standard_normal((n, channels, image_size, image_size))
    top, left = rng.integers(0, image_size - pattern_size + 1, size=(2, n))
    offsets = np.arange(pattern_size)
    rows = (top[:, None] + offsets)[:, None, :, None]
    cols = (left[:, None] + offsets)[:, None, None, :]
    images[np.arange(n)[:, None, None, None], np.arange(channels)[None, :, None, None], rows, cols] += patterns[:, None]
    return torch.from_numpy(images).to(dtype), torch.from_numpy(labels.astype(np.int64))
