"""Model and checkpoint files: tensors and plain data only, written atomically.

Models and checkpoints hold only tensors and plain data (dicts, lists, tuples, str, int, float,
bool, None); they are read with ``torch.load(weights_only=True)``, so a file holding anything else
(a crafted pickle, a JSON or binary file) is refused without running it, with a one-line
``ValueError`` naming the file. Tensors are loaded on ``map_location`` (default the CPU), so a
model fitted on a GPU loads on a machine without one.

This module knows no estimator class: estimators register themselves
(:func:`register_estimator`, done by every subclass of
:class:`~falkon_convrfm.estimator.RFMEstimator`) and provide ``_state()`` /
``_from_state(state, source)``; :func:`falkon_convrfm.models.load_model` loads any of them.

Every file the package writes (models, checkpoints, and through :func:`atomic_file` the CLI's
histories, reports, predictions and the pictures) goes to a temporary file next to it that is
renamed onto its name once complete: a failure (disk full, no permission, Ctrl-C) removes the
temporary file, leaves an earlier file of that name as it was, and is an OSError naming the file
(a KeyboardInterrupt stays one, naming the file too). A checkpoint of another fit (other data or
parameters) is refused (:class:`CheckpointMismatch`), never overwritten.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import secrets
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ._compat import resolve_device
from .preprocessing import Preprocessor

FILE_FORMAT = "falkon_convrfm"
_ESTIMATORS: dict[str, type] = {}  # class name → estimator class, for loading nested models
_DATACLASSES: dict[str, type] = {}  # dataclasses that may appear in parameters (LayerSpec)


def register_estimator(cls):
    """Register an estimator class (it provides ``_state()`` and ``_from_state(state, source)``),
    so that its models, nested ones included, can be saved and loaded."""
    _ESTIMATORS[cls.__name__] = cls
    return cls


def plain_dataclass(cls):
    """Register a dataclass whose instances may be saved as parameters (field dicts)."""
    _DATACLASSES[cls.__name__] = cls
    return cls


def _registered(value, registry: dict) -> bool:
    return registry.get(type(value).__name__) is type(value)


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
    if _registered(value, _ESTIMATORS):
        return {"__estimator__": value._state()}
    if dataclasses.is_dataclass(value) and _registered(value, _DATACLASSES):
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
        return estimator_class(value["__estimator__"], source)._from_state(value["__estimator__"], source)
    if "__dataclass__" in value:
        cls = _DATACLASSES.get(value["__dataclass__"])
        if cls is None:
            raise ValueError(f"{source} holds an unknown parameter type {value['__dataclass__']!r}")
        return cls(**from_plain(value["fields"], source))
    return {k: from_plain(v, source) for k, v in value.items()}


def file_name(source) -> str:
    """A path as a string, any other source (a buffer) as its repr, for messages."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def read_file(source, map_location="cpu", what: str = "model file"):
    """``torch.load(source, weights_only=True, map_location=...)``; a one-line ValueError naming
    the file when it is not a file of tensors and plain data (its content is never run). A device
    name or torch.device is checked first (CUDA asked for without CUDA: a clear error); other
    ``torch.load`` map_location forms (dicts, functions) pass through."""
    if isinstance(map_location, (str, torch.device)):
        map_location = resolve_device(map_location)
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise  # the OS message names the path
    except pickle.UnpicklingError as exc:
        if not _pickle_or_zip(source):  # a text file, read by torch as an old-format file
            raise ValueError(f"{file_name(source)} is not a falkon_convrfm {what} ({_unreadable(source, exc)})") from exc
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Check the documentation")]
        detail = f" ({lines[-1]})" if lines else ""
        raise ValueError(f"{file_name(source)} is not a falkon_convrfm {what}: it is not made of tensors and plain data, "
                         f"and is refused without running it{detail}") from exc
    except Exception as exc:  # EOFError, OSError of a truncated zip, a zip that is not a torch file, ...
        raise ValueError(f"{file_name(source)} is not a falkon_convrfm {what} ({_unreadable(source, exc)})") from exc


def _pickle_or_zip(source) -> bool:
    """Whether ``source`` (a path; other sources count as True) starts as a pickle or a zip archive."""
    if not isinstance(source, (str, os.PathLike)):
        return True
    with open(source, "rb") as f:
        return f.read(1) == b"\x80" or zipfile.is_zipfile(f)


def _unreadable(source, exc: Exception) -> str:
    """Why torch could not read ``source``: not a zip archive at all (a text file, a truncated or
    damaged file), a zip of other files (an .npz), or torch's own first line."""
    if isinstance(source, (str, os.PathLike)):
        if not zipfile.is_zipfile(source):
            return "not a zip archive as torch.save writes: a truncated or damaged file, or another kind of file"
        with zipfile.ZipFile(source) as archive:
            if not any(name.endswith("/data.pkl") for name in archive.namelist()):
                return "a zip archive of other files (an .npz of arrays?), not one torch.save writes"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or its cause or context (torch reports a failed write
    of its file writer as a RuntimeError whose context is the OSError)."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc


def _write_failure(exc: BaseException, what: str, path: str, existed: bool) -> BaseException:
    """The exception to raise for ``exc`` while writing ``what`` to ``path``: an OSError of the same
    kind naming both, a KeyboardInterrupt naming both, or ``exc`` itself (not an I/O failure)."""
    earlier = "the earlier file is unchanged" if existed else "nothing was written"
    if isinstance(exc, KeyboardInterrupt):
        return KeyboardInterrupt(f"while writing the {what} {path} ({earlier})")
    cause = _os_error(exc)
    if cause is None:
        return exc
    error = type(cause)(f"cannot write the {what} {path}: {cause.strerror or cause} ({earlier})")
    error.errno = cause.errno
    return error


@contextlib.contextmanager
def atomic_file(path, what: str):
    """A binary file object for writing ``what`` (e.g. "model file") to ``path``: a temporary file
    next to it, flushed to disk and renamed onto ``path`` when the block ends without error. On any
    failure, Ctrl-C included, the temporary file is removed, ``path`` is left as it was, and the
    error names ``what`` and ``path`` (:func:`_write_failure`). A buffer (file object) is yielded
    as it is."""
    if not isinstance(path, (str, os.PathLike)):
        yield path
        return
    path = os.fspath(path)
    existed = os.path.exists(path)
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(3)}.tmp"
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        error = _write_failure(exc, what, path, existed)
        if error is exc:
            raise
        raise error from exc


def atomic_save(obj, path, what: str = "model file") -> None:
    """``torch.save`` of ``obj`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path, what) as f:
        torch.save(obj, f)


def check_folder(path, name: str) -> None:
    """Check, creating nothing, that ``path`` is a folder a file can be written in, or can be created
    as one (its missing parents too). OSError ``'{name}: ...'`` naming the reason: a file on the
    way, no permission, a read-only file system."""
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{name}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        error = type(exc)(f"{name}: cannot write in {existing} ({exc.strerror or exc})")
        error.errno = exc.errno
        raise error from None


def data_fingerprint(*tensors) -> str:
    """A cheap content hash of the training data: shapes and a strided sample of ≤ ~10⁵ values
    per tensor (the same data and split give the same fingerprint)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        flat = t.reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 100_000)].double().cpu().numpy().tobytes())
    return h.hexdigest()


class CheckpointMismatch(ValueError):
    """A checkpoint of another fit where a fit would write its own: it is refused and left as it is.
    ``changed`` maps each parameter that differs to (its value there, its value now); it is empty
    when the data differs. :meth:`message` lets a caller say it in its own words (the CLI names
    its options)."""

    def __init__(self, folder: str, path: str, changed: dict):
        self.folder, self.path, self.changed = folder, path, changed
        super().__init__(self.message(f"checkpoint_dir={folder!r}", "use another checkpoint_dir"))

    def message(self, where: str, fix: str, name=str, shown: int = 3, show=repr) -> str:
        """'{where}: {path} is the checkpoint of another fit (...); {fix}, or remove ...', each
        parameter called ``name(parameter)`` and each value written ``show(value)``."""
        def short(value):
            text = show(value)
            return text if len(text) <= 40 else text[:37] + "..."

        listed = ", ".join(f"{name(k)} {short(a)} there, {short(b)} now" for k, (a, b) in list(self.changed.items())[:shown])
        more = f" and {len(self.changed) - shown} more" if len(self.changed) > shown else ""
        what = f"made with other parameters: {listed}{more}" if self.changed else "made with other data"
        return (f"{where}: {self.path} is the checkpoint of another fit ({what}); {fix}, "
                f"or remove the folder {self.folder} to start over")


def _changed(saved: dict, params: dict) -> dict:
    """{parameter: (value in ``saved``, value in ``params``)} for each that differs ("(unset)": absent)."""
    keys = [k for k in {**saved, **params} if (k in saved, saved.get(k)) != (k in params, params.get(k))]
    return {k: (saved.get(k, "(unset)"), params.get(k, "(unset)")) for k in keys}


class CheckpointStore:
    """The checkpoint file of an interruptible fit with parameters ``params`` (``directory/name``;
    no file when ``directory`` is None): :meth:`open` checks the folder and reads the checkpoint
    there before any work; :meth:`load` gives its state back when the data is the same; :meth:`save`
    writes it atomically after every step. A checkpoint of another fit is refused
    (:class:`CheckpointMismatch`)."""

    def __init__(self, directory, name: str, params: dict):
        self.folder = None if directory is None else os.fspath(directory)
        self.path = None if directory is None else os.path.join(self.folder, name)
        self.params, self._saved = params, None
        self.seed: int | None = None  # the seed of the checkpoint read by open()

    def open(self) -> CheckpointStore:
        """Check that the folder can be written (OSError ``checkpoint_dir='...': ...``), read its
        checkpoint (ValueError for a file that is not one) and refuse one made with other parameters."""
        if self.path is None:
            return self
        check_folder(self.folder, f"checkpoint_dir={self.folder!r}")
        if not os.path.exists(self.path):
            return self
        state = read_file(self.path, "cpu", "checkpoint")
        if not (isinstance(state, dict) and state.get("kind") == "checkpoint"
                and {"fingerprint", "params", "seed", "state"} <= set(state)):
            raise ValueError(f"{self.path} is not a falkon_convrfm checkpoint")
        if state["params"] != self.params:
            raise CheckpointMismatch(self.folder, self.path, _changed(state["params"], self.params))
        self._saved, self.seed = state, int(state["seed"])
        return self

    def load(self, fingerprint: str):
        """The saved state (tensors on the CPU) when the checkpoint was made with this data, None
        when there is no checkpoint; CheckpointMismatch when it was made with other data."""
        if self._saved is None:
            return None
        if self._saved["fingerprint"] != fingerprint:
            raise CheckpointMismatch(self.folder, self.path, {})
        state, self._saved = self._saved["state"], None  # read once: its memory is released
        return from_plain(state, self.path)

    def save(self, fingerprint: str, seed: int, state: dict) -> None:
        if self.path is None:
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise type(exc)(f"cannot create the checkpoint folder {self.folder}: {exc.strerror or exc}") from exc
        atomic_save({"format": FILE_FORMAT, "kind": "checkpoint", "fingerprint": fingerprint, "params": self.params,
                     "seed": seed, "state": to_plain(state, "checkpoint")}, self.path, "checkpoint")


def estimator_class(state, source: str) -> type:
    """The registered estimator class a saved state names (ValueError when it names none)."""
    kind = state.get("class") if isinstance(state, dict) else None
    if not isinstance(kind, str) or kind not in _ESTIMATORS:
        raise ValueError(f"{source} is not a model file saved by falkon_convrfm"
                         + (f" (unknown model class {kind!r})" if kind is not None else ""))
    return _ESTIMATORS[kind]
