r"""Closed-form patch gradients and the patch AGOP of a fitted convolutional kernel machine.

For f_o(x) = Σ_j α_jo K(x, z_j) with K(x, z) = Σ_p ω_p κ(Lᵀx_p, Lᵀz_p), every patch x_p is
treated as an independent variable:

.. math::

    ∇_{x_p} f_o(x) = ω_p\, L\, \tilde g_{po}(x), \qquad
    \tilde g_{po} = Σ_j α_{jo}\, ∇_u κ(u, v_j)\big|_{u = Lᵀx_p,\; v_j = Lᵀz_{j,p}}

    G = \frac1n Σ_i Σ_p Σ_o ∇_{x_p} f_o(x_i)\, ∇_{x_p} f_o(x_i)ᵀ = L \Big(Σ_p \tilde G_p\Big) Lᵀ

In the transformed space every base kernel's gradient has the GEMM shape (the weights Q, S
and the vectors ũ, Ṽ come from the base kernel's ``gradient_weights``,
:mod:`falkon_convrfm.base_kernels`)

.. math::  \tilde g_{po}(x_i) = (Q_p (α_o ⊙ \tilde V_p))_i + (S_p α)_{io}\, \tilde u_i

with weight matrices Q_p, S_p (n × m per location) whose formulas each base kernel documents,
so a chunk of rows × locations costs two batched GEMMs against the centres. Rows may be
any images (the AGOP is usually estimated on a random subset of the training set).
"""
from __future__ import annotations

import torch

from .progress import phase


def transformed_gradients(U, V, alpha, base, sigma: float) -> torch.Tensor:
    """g̃ (p, n, C, r): Σ_j α_jo ∇_u κ(U[p, i], V[p, j]) for every location, row and output, from
    the base kernel's gradient weights (Ũ, Ṽ, Q, S): g̃ = Q (α_o ⊙ Ṽ) + (S α) ũ, with S = −Q when
    the base kernel returns S = None."""
    Ut, Vt, Q, S = base.gradient_weights(U, V, sigma)
    p, m, r = Vt.shape
    C = alpha.shape[1]
    weighted = (alpha.unsqueeze(2) * Vt.unsqueeze(2)).reshape(p, m, C * r)  # α_o ⊙ Ṽ
    g = torch.bmm(Q, weighted).view(p, -1, C, r)
    if S is None:  # S = −Q
        return g.sub_(torch.matmul(Q, alpha).unsqueeze(3) * Ut.unsqueeze(2))
    return g.add_(torch.matmul(S, alpha).unsqueeze(3) * Ut.unsqueeze(2))


def _as_2d(alpha: torch.Tensor) -> torch.Tensor:
    return alpha.reshape(alpha.shape[0], -1)


def window_gradients(kernel, Tx, Tz, alpha, pairs, p0: int, p1: int) -> torch.Tensor:
    """ω-weighted g̃ (p1 − p0, n, C, r) of the x-locations p0 ≤ p < p1: for every location the sum
    over its window partners q of ω_{pq} Σ_j α_jo ∇_u κ(u_p, v_{j,q}) (q = p when aligned)."""
    g = Tx.new_zeros(p1 - p0, Tx.shape[1], alpha.shape[1], Tx.shape[2])
    for src, dst, w in pairs:
        inside = (src >= p0) & (src < p1)
        src, dst, w = src[inside], dst[inside], w[inside]
        if src.numel():
            part = transformed_gradients(Tx[src], Tz[dst], alpha, kernel.base, kernel.sigma)
            g.index_add_(0, src - p0, part.mul_(w.view(-1, 1, 1, 1)))
    return g


def patch_gradients(kernel, centres: torch.Tensor, alpha: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """∇_{x_p} f_o(x_i) for all rows, locations and outputs, shape (n, P, C, d). Small inputs only."""
    alpha = _as_2d(alpha).to(X.dtype)
    factor, _ = kernel.factor_and_weights(X)
    Tx = kernel.patch_features(X)
    g = window_gradients(kernel, Tx, kernel.patch_features(centres), alpha, kernel.location_pairs(X), 0, Tx.shape[0])
    return torch.einsum("pncr,dr->npcd", g, factor)


def _per_pair(m: int, r: int, C: int) -> int:
    """Temporaries per (location, row) of a chunk, in elements: inner products and Q (m each),
    the gradients, their product with Ũ and their window sum (C·r each), Ũ (r)."""
    return 2 * m + 3 * C * r + r


def agop_chunks(n: int, P: int, m: int, r: int, C: int, itemsize: int, max_mem: float):
    """(rows, locations) per chunk so that the chunk's temporaries fit in ``max_mem`` bytes."""
    per_pair = _per_pair(m, r, C) * itemsize
    rows = int(max(1, min(n, max_mem // (per_pair * min(P, 8)))))
    return rows, int(max(1, min(P, max_mem // (per_pair * rows))))


def agop_memory(n: int, P: int, m: int, r: int, C: int, itemsize: int, max_mem: float = 2**30) -> int:
    """Peak bytes of :func:`patch_agop`: transformed centres and one row chunk (P·(m + rows)·r),
    the per-location accumulators (float64), the chunk's temporaries and α ⊙ Ṽ."""
    rows, locs = agop_chunks(n, P, m, r, C, itemsize, max_mem)
    return int((P * (m + rows) * r + locs * rows * _per_pair(m, r, C) + locs * m * C * r) * itemsize
               + P * r * r * 8)


AGOP_MEMORY_SHARE = 0.25


def agop_memory_budget(max_memory) -> dict:
    """Keyword arguments of :func:`~falkon_convrfm.agop.patch_agop` for a ``max_memory`` budget.

    Rule: ``max_memory`` bounds what one step of a fit allocates. In the AGOP step the chunk
    temporaries (the ``max_mem`` of ``patch_agop``) get ``AGOP_MEMORY_SHARE`` (a quarter) of it;
    the rest covers what ``patch_agop`` holds beside its chunks: the transformed centres and row
    chunk (P·(m + rows)·r), α ⊙ Ṽ and the per-location float64 accumulators. ``None``: no budget,
    ``patch_agop``'s default (1 GiB of chunk temporaries).
    """
    return {} if max_memory is None else {"max_mem": float(max_memory) * AGOP_MEMORY_SHARE}


def patch_agop(
    kernel,
    centres: torch.Tensor,
    alpha: torch.Tensor,
    X: torch.Tensor,
    max_mem: float = 2**30,
):
    """Patch AGOP of f(x) = K(x, centres) α over the rows of X.

    Returns ``(G, location_share)``: G (d, d) = (1/n) Σ_i Σ_p Σ_o ∇_{x_p} f_o(x_i) ∇_{x_p} f_o(x_i)ᵀ
    (symmetric PSD, float64), and tr_p = (1/n) Σ_i Σ_o ‖∇_{x_p} f_o(x_i)‖² per location (P,),
    which sums to tr(G). Rows and locations are processed in chunks whose temporaries fit in
    ``max_mem`` bytes; centres are transformed once. Progress: a ``patch AGOP`` bar in images
    (:mod:`~falkon_convrfm.progress`).
    """
    alpha = _as_2d(alpha).to(X.dtype)
    if X.shape[0] == 0:
        raise ValueError("patch_agop needs at least one row of X")
    factor, _ = kernel.factor_and_weights(X)
    pairs = kernel.location_pairs(X)
    Tz = kernel.patch_features(centres)  # (P, m, r)
    P, m, r = Tz.shape
    C = alpha.shape[1]
    n = X.shape[0]
    rows, locs = agop_chunks(n, P, m, r, C, X.element_size(), max_mem)
    Gp = torch.zeros(P, r, r, dtype=torch.float64, device=X.device)
    with phase("patch AGOP", n, "img") as bar:
        for i0 in range(0, n, rows):
            Tx = kernel.patch_features(X[i0 : i0 + rows])
            for p0 in range(0, P, locs):
                g = window_gradients(kernel, Tx, Tz, alpha, pairs, p0, min(P, p0 + locs))
                g = g.reshape(g.shape[0], -1, r)
                Gp[p0 : p0 + locs] += torch.bmm(g.transpose(1, 2), g).double()
            bar.update(Tx.shape[1])
    Gp /= n
    L = factor.double()
    G = L @ Gp.sum(0) @ L.T
    share = torch.einsum("rs,psr->p", L.T @ L, Gp)
    return 0.5 * (G + G.T), share
