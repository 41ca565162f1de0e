"""The backends in one table (:data:`BACKENDS`, each keeping :mod:`.interface`), and which one
evaluates the kernel, decided so that nothing can crash the user's process.

- ``torch``: the tiled CPU/GPU path (:mod:`.dense`), any dtype, always available.
- ``triton``: the fused GPU kernel (:mod:`.triton`), float32 on CUDA (or on CPU tensors under
  ``TRITON_INTERPRET=1``, for tests). The default on CUDA.
- ``keops``: kernel-vector products through pykeops. pykeops can crash natively (a segfault on
  CUDA 13 with pykeops 2.3), which no ``try`` can catch, so ``auto`` picks it only after a health
  check in a subprocess has passed; the result is cached on disk per machine, device type and
  versions, and in the process (:func:`keops_health`). ``keops_active="force"`` is the user's explicit choice and skips it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import torch

from ..validation import warn
from .dense import TORCH
from .keops import KEOPS, keops_importable
from .triton import TRITON, triton_available

BACKENDS = {backend.name: backend for backend in (TORCH, TRITON, KEOPS)}
BACKEND_CHOICES = ("auto", *BACKENDS)
KEOPS_PROBE_TIMEOUT = 600  # seconds: the first KeOps formula compiles C++/CUDA code


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple:
    """(usable, reason) of the Triton backend (:func:`.triton.triton_available`)."""
    return triton_available()


def keops_probe_command(device_type: str) -> list:
    """The subprocess that evaluates one small KeOps formula on ``device_type``."""
    code = (
        "import torch; from pykeops.torch import LazyTensor; "
        f"x = torch.randn(50, 3, device={device_type!r}); "
        "K = (-(LazyTensor(x[:, None, :]) - LazyTensor(x[None, :, :])).sqnorm2()).exp(); "
        "s = (K @ torch.ones(50, 1, device=x.device)).cpu(); "
        "assert torch.isfinite(s).all() and (s >= 1).all()"
    )
    return [sys.executable, "-c", code]


def _cache_file() -> Path:
    root = os.environ.get("FALKON_CONVRFM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "falkon_convrfm"
    )
    return Path(root) / "keops_probe.json"


def _probe_key(device_type: str) -> str:
    try:
        from importlib.metadata import version

        keops_version = version("pykeops")
    except Exception:
        keops_version = "?"
    ident = f"{platform.node()}|pykeops {keops_version}|torch {torch.__version__}|cuda {torch.version.cuda}|{device_type}"
    return hashlib.sha1(ident.encode()).hexdigest()[:16] + " " + ident


def _run_probe(device_type: str) -> tuple:
    cmd = keops_probe_command(device_type)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=KEOPS_PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, f"the KeOps probe did not finish in {KEOPS_PROBE_TIMEOUT} s"
    except OSError as exc:
        return False, f"the KeOps probe could not start ({exc})"
    if res.returncode == 0:
        return True, "KeOps probe passed"
    if res.returncode < 0:
        try:
            name = signal.Signals(-res.returncode).name
        except ValueError:
            name = f"signal {-res.returncode}"
        return False, f"the KeOps probe was killed by {name}"
    last = (res.stderr.strip().splitlines() or ["no message"])[-1]
    return False, f"the KeOps probe failed (exit {res.returncode}: {last[:200]})"


@functools.lru_cache(maxsize=None)
def keops_health(device_type: str) -> tuple:
    """(ok, reason) of a one-time KeOps health check on ``device_type``, run in a subprocess (a
    crash there cannot reach this process) and cached on disk per machine, versions and device
    type, and per process. A failure is reported once per process, as a warning."""
    if not keops_importable():
        return False, "pykeops is not importable"
    key = _probe_key(device_type)
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        ok, reason = _run_probe(device_type)
        cache[key] = [ok, reason]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass
    ok, reason = cache[key]
    if not ok:
        warn(f"KeOps is not used on {device_type}: {reason} (cached in {path}; keops_active='force' overrides)",
             RuntimeWarning)
    return ok, reason


def choose_backend(requested: str, device_type: str, dtype: torch.dtype, keops_active: str = "auto") -> str:
    """The backend that evaluates the kernel for data on ``device_type`` in ``dtype``.

    ``keops_active='force'`` (Falkon's option) → KeOps. An explicit ``requested`` backend is
    used when it can run (``triton`` with float64 data falls back to torch, with a warning);
    ``auto``: torch on CPU; on CUDA Triton for float32, else KeOps when ``keops_active='auto'``
    and its health check passed, else torch.
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {requested!r}")
    if keops_active == "force" or requested == "keops":
        if not keops_importable():
            raise ImportError("the KeOps backend was asked for but pykeops is not importable: `pip install pykeops`")
        return "keops"
    triton_ok, reason = triton_status()
    if requested == "triton":
        if not triton_ok:
            raise RuntimeError(f"backend='triton' cannot run here: {reason}")
        if dtype != torch.float32:
            warn(f"the Triton backend is float32 only; {dtype} data runs on the torch backend", RuntimeWarning)
            return "torch"
        return "triton"
    if requested == "torch" or device_type != "cuda":
        return "torch"
    if triton_ok and dtype == torch.float32:
        return "triton"
    if keops_active == "auto" and keops_health(device_type)[0]:
        return "keops"
    return "torch"


def backend_report() -> list:
    """Lines for ``convrfm info``: per device, which backend ``auto`` runs and why."""
    triton_ok, triton_reason = triton_status()
    lines = ["cpu: torch (tiled, torch.compile-fused); KeOps only with keops_active='force'"]
    if not torch.cuda.is_available():
        lines.append("cuda: not available")
    else:
        keops = keops_health("cuda") if keops_importable() else (False, "pykeops is not importable")
        auto = choose_backend("auto", "cuda", torch.float32)
        lines.append(f"cuda float32: {auto} ({triton_reason}; KeOps: {keops[1]})")
        lines.append("cuda float64: " + choose_backend("auto", "cuda", torch.float64))
    if not triton_ok:
        lines.append(f"triton: {triton_reason}")
    return lines
