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
def falkon_cuda_status() -> tuple[bool, str]:
    """Whether Falkon can run on CUDA in this process: ``(True, description)`` or ``(False, reason)``.

    Falkon loads its compiled extension lazily, at its first GPU operation (``falkon.c_ext._backend``
    calls ``torch.ops.load_library``). A build that does not match torch fails there with an
    ``OSError`` (``libtorch_cuda_linalg.so`` not found, an undefined symbol) or a ``RuntimeError``
    (CUDA version mismatch), which Falkon's own import does not reveal. This loads the extension
    and runs one tiny CUDA op of it (``copy_triang`` on a 2×2 CUDA tensor), in-process; cached.
    """
    if not torch.cuda.is_available():
        return False, "CUDA not available"
    if not HAS_FALKON:
        return False, f"Falkon is not installed ({FALKON_IMPORT_ERROR})"
    try:
        from falkon import c_ext

        if c_ext.cuda_version() == -1:  # the first call loads the extension
            return False, "Falkon's extension was built without CUDA (FORCE_ONLY_CPU)"
        c_ext.copy_triang(torch.eye(2, device="cuda"), upper=True)
        torch.cuda.synchronize()
    except (OSError, ImportError, RuntimeError, ValueError, AttributeError) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return False, f"Falkon's CUDA extension does not load ({type(exc).__name__}: {first_line})"
    return True, f"Falkon {_falkon.__version__} CUDA extension loaded (CUDA {torch.version.cuda})"


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
