r"""KeOps kernel-vector products with the patch location as a KeOps batch dimension.

Patches are transformed by the metric factor beforehand (T = Lᵀx_p, (P, n, r)), so the formula
is the plain Euclidean one; M never enters the inner loop. KeOps reduces over centres j for every
(location, row) pair and the weighted sum over locations is one small einsum afterwards.
"""
from __future__ import annotations

import math

import torch

from .._compat import keops_available
from .dense import _unit_rows


def _lazy_kernel(T1: torch.Tensor, T2: torch.Tensor, kind: str, sigma: float):
    from pykeops.torch import LazyTensor

    if kind == "ntk":
        a, U = _unit_rows(T1)
        b, V = _unit_rows(T2)
        c = (LazyTensor(U[:, :, None, :]) | LazyTensor(V[:, None, :, :])).clamp(-1.0, 1.0)
        profile = (2 * c * (math.pi - c.acos()) + (1 - c * c).relu().sqrt()) / math.pi
        return LazyTensor(a[:, :, None, None]) * LazyTensor(b[:, None, :, None]) * profile
    scale = sigma if kind == "laplace" else sigma * math.sqrt(2.0)
    x = LazyTensor((T1 / scale)[:, :, None, :])
    z = LazyTensor((T2 / scale)[:, None, :, :])
    sqdist = x.sqdist(z)
    return (-sqdist.sqrt()).exp() if kind == "laplace" else (-sqdist).exp()


def keops_conv_mmv(
    T1: torch.Tensor,
    T2: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    sigma: float,
    weights: torch.Tensor,
    max_mem: float = math.inf,
) -> torch.Tensor:
    """Σ_p ω_p Σ_j κ(T1[p, i], T2[p, j]) v[j] for all i, shape (n, T), in row chunks within
    ``max_mem`` bytes (the (P, chunk, T) partial sums dominate)."""
    if not keops_available():
        raise ImportError("The KeOps backend needs pykeops: `pip install pykeops` (and a C++ compiler).")
    from pykeops.torch import LazyTensor

    P, n, _ = T1.shape
    T = v.shape[1]
    per_row = 2 * P * (T + T1.shape[2]) * T1.element_size()
    chunk = n if math.isinf(max_mem) else int(max(1, min(n, max_mem // per_row)))
    T2 = T2.contiguous()
    vj = LazyTensor(v.contiguous()[None, None, :, :])
    out = T1.new_empty(n, T)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        K = _lazy_kernel(T1[:, i0:i1].contiguous(), T2, kind, sigma)
        partial = (K * vj).sum(dim=2)  # (P, rows, T)
        out[i0:i1] = torch.einsum("p,pnt->nt", weights, partial)
    return out
