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
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle

import numpy as np
import torch

from ._compat import resolve_device
from .preprocessing import Preprocessor
from .validation import warn

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
    except OSError:  # missing file, a directory, no permission: the OS message names the path
        raise
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Check the documentation")]
        detail = f" ({lines[-1]})" if lines else ""
        raise ValueError(f"{file_name(source)} is not a falkon_convrfm {what}: it is not made of tensors and plain data, "
                         f"and is refused without running it{detail}") from exc
    except Exception as exc:  # EOFError, a zip that is not a torch file, ...
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{file_name(source)} is not a falkon_convrfm {what} ({type(exc).__name__}: {first})") from exc


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


def estimator_class(state, source: str) -> type:
    """The registered estimator class a saved state names (ValueError when it names none)."""
    kind = state.get("class") if isinstance(state, dict) else None
    if not isinstance(kind, str) or kind not in _ESTIMATORS:
        raise ValueError(f"{source} is not a model file saved by falkon_convrfm"
                         + (f" (unknown model class {kind!r})" if kind is not None else ""))
    return _ESTIMATORS[kind]
