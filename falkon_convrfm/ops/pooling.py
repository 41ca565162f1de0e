r"""Local pooling windows on top of any aligned-patch backend.

.. math::  K(x, z) = \sum_p \sum_{δ ∈ \{−h..h\}^2,\ p+δ \text{ valid}} ω_{p,p+δ}\, κ(x_p, z_{p+δ}),
           \qquad ω_{p,q} = (ω_p + ω_q)/2

is a sum over the window offsets δ of aligned kernels between the locations p that have a
partner p + δ and those partners. The pair weight is the mean of the two locations' weights, so K
stays symmetric for any ω (it is ω_p for uniform ω, the textbook local-pooling kernel). The
backends stay aligned-only: this module gathers the location pairs
(:meth:`~falkon_convrfm.patches.PatchGeometry.window_partners`).

The flat window is not positive semi-definite by construction (the 0/1 band matrix of the window
has negative eigenvalues); the eigenvalues measured on CIFAR-10 Gram matrices are in
``docs/results.md`` ("Early experiments (small n)"). When a factorisation fails, the Nyström solve
adds jitter and Falkon's preconditioner is rebuilt with more (:mod:`falkon_convrfm.solvers`).
"""
from __future__ import annotations

import torch


def location_pairs(partners: torch.Tensor, weights: torch.Tensor) -> list:
    """For every window offset with a valid pair: (locations p, partners p + δ, pair weights ω_{p,p+δ})."""
    pairs = []
    for row in partners.to(weights.device):
        src = torch.nonzero(row >= 0).flatten()
        if src.numel():
            dst = row[src]
            pairs.append((src, dst, 0.5 * (weights[src] + weights[dst])))
    return pairs


def window_sum(aligned, T1: torch.Tensor, T2: torch.Tensor, pairs: list, out=None):
    """Σ over offsets of ``aligned(T1[p], T2[p + δ], ω_{p,p+δ})``, an aligned-patch backend call that
    returns a fresh block (K, diag K or K v), accumulated into ``out`` (a new tensor if None)."""
    for k, (src, dst, w) in enumerate(pairs):
        part = aligned(T1[src], T2[dst], w)
        if out is None:
            out = part
        elif k == 0:
            out.copy_(part.reshape(out.shape))
        else:
            out.add_(part.reshape(out.shape))
    return out


def window_memory(num_locations: int, rank: int) -> dict:
    """Extra elements of :func:`window_sum`: the gathered patches (P, r) per row of either block
    and one output block (Falkon's ``"nm"`` coefficient)."""
    return {"n": num_locations * rank, "m": num_locations * rank, "nm": 1}
