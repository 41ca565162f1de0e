"""A minimal stand-in for ``falkon.kernels.Kernel`` (``__call__``, ``mmv``, ``dmmv``) used when
Falkon is not installed. Products are computed in row blocks from ``kernel.compute`` within the
``max_cpu_mem`` / ``max_gpu_mem`` budget, sized from ``kernel.extra_mem`` like Falkon does."""
from __future__ import annotations

import math

import torch

from ._compat import KernelOptions, merge_options
from .memory import memory_budget


def _budget_elements(opt, X: torch.Tensor) -> float:
    return memory_budget(opt, X.device) / X.element_size()


def plan_blocks(n: int, m: int, extra: dict, budget: float, full_m: bool = False):
    """Row-block sizes (nb, mb) with nb·mb + extra['n']·nb + extra['m']·mb + extra['0'] ≤ budget
    elements (mb = m when ``full_m``). Raises ValueError when not even one row fits."""
    a, b, c = extra.get("n", 0), extra.get("m", 0), extra.get("0", 0)
    room = budget - c
    if math.isinf(room):
        return n, m
    if full_m:
        nb = math.floor((room - b * m) / (m + a)) if room > b * m else 0
        mb = m
    else:  # square blocks: s² + (a + b)s ≤ room
        s = math.floor((-(a + b) + math.sqrt((a + b) ** 2 + 4 * max(room, 0))) / 2)
        nb, mb = min(n, s), min(m, s)
        if nb < n and mb == m:  # m was small: give the rest to nb
            nb = math.floor((room - b * m) / (m + a))
        elif mb < m and nb == n:
            mb = math.floor((room - a * n) / (n + b))
    if nb < 1 or mb < 1:
        raise ValueError(
            f"The memory budget ({budget:.3g} elements) is too small for even one row block of this "
            f"kernel (needs ~{a + b + c + 1:.3g}): raise max_memory."
        )
    return min(nb, n), min(mb, m)


def blocked_mmv(X1, X2, v, kernel, out=None, opt=None, **_):
    """out = K(X1, X2) v, block by block."""
    n, m = X1.shape[0], X2.shape[0]
    nb, mb = plan_blocks(n, m, kernel.extra_mem(False, False, X1.dtype), _budget_elements(opt, X1))
    out = X1.new_zeros(n, v.shape[1]) if out is None else out.zero_()
    for i in range(0, n, nb):
        for j in range(0, m, mb):
            block = kernel.compute(X1[i : i + nb], X2[j : j + mb], X1.new_empty(min(nb, n - i), min(mb, m - j)), False)
            out[i : i + nb].addmm_(block, v[j : j + mb])
    return out


def blocked_dmmv(X1, X2, v, w, kernel, out=None, opt=None, differentiable=False, **_):
    """out = K(X1, X2)ᵀ (K(X1, X2) v + w) (either term may be None), one row block of K at a time."""
    n, m = X1.shape[0], X2.shape[0]
    t = (v if v is not None else w).shape[1]
    nb, _ = plan_blocks(n, m, kernel.extra_mem(False, False, X1.dtype), _budget_elements(opt, X1), full_m=True)
    out = X1.new_zeros(m, t) if out is None else out.zero_()
    for i in range(0, n, nb):
        block = kernel.compute(X1[i : i + nb], X2, X1.new_empty(min(nb, n - i), m), False)
        inner = block @ v if v is not None else torch.zeros_like(w[i : i + nb])
        if w is not None:
            inner += w[i : i + nb]
        out.addmm_(block.T, inner)
    return out


class StandaloneKernel(torch.nn.Module):
    """The parts of ``falkon.kernels.Kernel`` this package relies on, for use without Falkon."""

    def __init__(self, name: str, opt=None):
        super().__init__()
        self.name = name
        self.params = opt if opt is not None else KernelOptions()

    def __call__(self, X1, X2, diag=False, out=None, opt=None, **_):
        params = merge_options(self.params, opt)
        n, m = X1.shape[0], X2.shape[0]
        if diag:
            return self.compute(X1, X2, X1.new_empty(n) if out is None else out, True)
        out = X1.new_empty(n, m) if out is None else out
        nb, mb = plan_blocks(n, m, self.extra_mem(False, False, X1.dtype), _budget_elements(params, X1))
        for i in range(0, n, nb):
            for j in range(0, m, mb):
                self.compute(X1[i : i + nb], X2[j : j + mb], out[i : i + nb, j : j + mb], False)
        return out

    def mmv(self, X1, X2, v, out=None, opt=None, **_):
        params = merge_options(self.params, opt)
        v = v.reshape(-1, 1) if v.dim() == 1 else v
        impl = self._decide_mmv_impl(X1, X2, v, params)
        return impl(X1=X1, X2=X2, v=v, kernel=self, out=out, opt=params)

    def dmmv(self, X1, X2, v, w, out=None, opt=None, **_):
        params = merge_options(self.params, opt)
        v = v.reshape(-1, 1) if v is not None and v.dim() == 1 else v
        w = w.reshape(-1, 1) if w is not None and w.dim() == 1 else w
        impl = self._decide_dmmv_impl(X1, X2, v, w, params)
        return impl(X1=X1, X2=X2, v=v, w=w, kernel=self, out=out, differentiable=False, opt=params)

    def _decide_mmv_impl(self, X1, X2, v, opt):
        return blocked_mmv

    def _decide_dmmv_impl(self, X1, X2, v, w, opt):
        return blocked_dmmv

    def extra_mem(self, is_differentiable, is_sparse, dtype, density1=None, density2=None):
        return {}
