r"""KeOps kernel-vector products with the patch location as a KeOps batch dimension.

Patches are transformed by the metric factor beforehand (T = Lᵀx_p, (P, n, r)), so the base
kernel's LazyTensor formula is the plain Euclidean one; M never enters the inner loop. KeOps
reduces over centres j for every (location, row) pair and the weighted sum over locations is one
small einsum afterwards. Kernel blocks (``matrix``) come from the torch backend (:mod:`.dense`).
"""
from __future__ import annotations

import functools

import torch

from .dense import conv_kernel_matrix, dense_memory
from .interface import Backend


@functools.lru_cache(maxsize=1)
def keops_importable() -> bool:
    """True when ``pykeops.torch`` imports (formulas compile lazily at first use)."""
    try:
        import pykeops.torch  # noqa: F401
    except Exception:  # pykeops raises a variety of errors when its toolchain is missing
        return False
    return True


def keops_memory(num_locations: int, rank: int, outputs: int = 0) -> dict:
    """Elements per row of T1 that :func:`keops_conv_mmv` holds at once, in ``extra_mem`` form:
    the (P, rows, t) partial sums and the (P, rows, r) transformed rows, twice (inputs and
    copies); for ``outputs = 0`` (a kernel block) the torch backend's
    (:func:`~falkon_convrfm.ops.dense.dense_memory`)."""
    if not outputs:
        return dense_memory(num_locations, rank)
    return {"n": 2 * num_locations * (outputs + rank), "m": 0, "0": 0}


def keops_conv_mmv(
    T1: torch.Tensor,
    T2: torch.Tensor,
    v: torch.Tensor,
    base,
    sigma: float,
    weights: torch.Tensor,
    options=None,
) -> torch.Tensor:
    """Σ_p ω_p Σ_j κ(T1[p, i], T2[p, j]) v[j] for all i, shape (n, t) (``options``:
    :class:`~falkon_convrfm.ops.interface.BackendOptions`, none applies here)."""
    if not keops_importable():
        raise ImportError("The KeOps backend needs pykeops: `pip install pykeops` (and a C++ compiler).")
    from pykeops.torch import LazyTensor

    K = base.keops_kernel(T1.contiguous(), T2.contiguous(), sigma)
    partial = (K * LazyTensor(v.contiguous()[None, None, :, :])).sum(dim=2)  # (P, n, t)
    return torch.einsum("p,pnt->nt", weights, partial)


KEOPS = Backend("keops", matrix=conv_kernel_matrix, mmv=keops_conv_mmv, memory=keops_memory)
