"""Optional dependencies (Falkon, KeOps) behind import guards, and device helpers."""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

try:  # Falkon is not on PyPI: everything that needs it is optional.
    import falkon as _falkon
    from falkon.kernels import Kernel as FalkonKernelBase
    from falkon.options import FalkonOptions as OptionsBase

    HAS_FALKON = True
    FALKON_IMPORT_ERROR = ""
except (ImportError, OSError) as exc:  # OSError: a Falkon build that does not match torch
    _falkon = None
    FalkonKernelBase = None
    OptionsBase = None
    HAS_FALKON = False
    FALKON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

FALKON_INSTALL_HINT = (
    "Falkon is not installed (it is not on PyPI). Install it from its repository, e.g. "
    "`pip install --no-build-isolation git+https://github.com/falkonml/falkon.git` "
    "(set FORCE_ONLY_CPU=1 on a machine without CUDA). See docs/install.md."
)


def require_falkon():
    """Return the ``falkon`` module or raise an ImportError that says how to get it."""
    if not HAS_FALKON:
        raise ImportError(f"{FALKON_INSTALL_HINT} (import failed with {FALKON_IMPORT_ERROR})")
    return _falkon


@functools.lru_cache(maxsize=1)
def keops_available() -> bool:
    """True when ``pykeops`` imports (formulas are compiled lazily at first use)."""
    try:
        import pykeops.torch  # noqa: F401
    except Exception:  # pykeops raises a variety of errors when its toolchain is missing
        return False
    return True


@dataclasses.dataclass
class KernelOptions:
    """The subset of ``falkon.FalkonOptions`` the kernel reads, used when Falkon is absent.

    ``keops_active``: ``"auto"`` (KeOps for CUDA data when pykeops imports), ``"force"``
    (KeOps on any device, e.g. KeOps-on-CPU for testing) or ``"no"``.
    ``max_cpu_mem`` / ``max_gpu_mem``: memory budget in bytes for blocked products.
    """

    keops_active: str = "auto"
    max_cpu_mem: float = math.inf
    max_gpu_mem: float = math.inf


def make_options(**fields):
    """``falkon.FalkonOptions(**fields)`` when Falkon is installed, else :class:`KernelOptions`."""
    return OptionsBase(**fields) if HAS_FALKON else KernelOptions(**fields)


def merge_options(base, opt):
    """``base`` overridden by the fields of ``opt`` (Falkon's convention for per-call options)."""
    if opt is None:
        return base
    if type(opt) is type(base):
        return dataclasses.replace(base, **dataclasses.asdict(opt))
    fields = {f.name for f in dataclasses.fields(base)}
    return dataclasses.replace(base, **{k: v for k, v in dataclasses.asdict(opt).items() if k in fields})


def resolve_device(device) -> torch.device:
    """A ``torch.device``; a clear error when CUDA is asked for and not available."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was requested but CUDA is not available "
            "(torch.cuda.is_available() is False): use device='cpu'."
        )
    return dev
