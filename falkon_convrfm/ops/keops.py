r"""KeOps kernel-vector products with the patch location as a KeOps batch dimension.

Patches are transformed by the metric factor beforehand (T = Lᵀx_p, (P, n, r)), so the base
kernel's LazyTensor formula is the plain Euclidean one; M never enters the inner loop. KeOps
reduces over centres j for every (location, row) pair and the weighted sum over locations is one
small einsum afterwards.
"""
from __future__ import annotations

import math

import torch


def keops_memory(num_locations: int, rank: int, outputs: int) -> dict:
    """Elements per row of X1 that :func:`keops_conv_mmv` holds at once, in ``extra_mem`` form:
    the (P, rows, T) partial sums and the (P, rows, r) transformed rows, twice (inputs and copies)."""
    return {"n": 2 * num_locations * (outputs + rank), "m": 0, "0": 0}


def rows_within(budget_bytes: float, memory: dict, n: int, itemsize: int) -> int:
    """Rows of X1 per chunk so that a chunk's ``memory['n']`` elements per row fit the budget."""
    if math.isinf(budget_bytes):
        return n
    return int(max(1, min(n, budget_bytes // (memory["n"] * itemsize))))


def keops_conv_mmv(
    T1: torch.Tensor,
    T2: torch.Tensor,
    v: torch.Tensor,
    base,
    sigma: float,
    weights: torch.Tensor,
    max_mem: float = math.inf,
) -> torch.Tensor:
    """Σ_p ω_p Σ_j κ(T1[p, i], T2[p, j]) v[j] for all i, shape (n, T), in row chunks within
    ``max_mem`` bytes (see :func:`keops_memory`)."""
    from .backends import keops_importable

    if not keops_importable():
        raise ImportError("The KeOps backend needs pykeops: `pip install pykeops` (and a C++ compiler).")
    from pykeops.torch import LazyTensor

    P, n, r = T1.shape
    T = v.shape[1]
    chunk = rows_within(max_mem, keops_memory(P, r, T), n, T1.element_size())
    T2 = T2.contiguous()
    vj = LazyTensor(v.contiguous()[None, None, :, :])
    out = T1.new_empty(n, T)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        K = base.keops_kernel(T1[:, i0:i1].contiguous(), T2, sigma)
        partial = (K * vj).sum(dim=2)  # (P, rows, T)
        out[i0:i1] = torch.einsum("p,pnt->nt", weights, partial)
    return out
