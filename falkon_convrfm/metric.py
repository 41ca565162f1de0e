"""Patch metrics M: validation, factorisation M = L Lᵀ, powers and normalisation."""
from __future__ import annotations

import torch

# Relative tolerances, against the largest absolute eigenvalue / entry of M.
SYMMETRY_RTOL = 1e-6
PSD_RTOL = 1e-6


def as_metric(M, d: int, name: str = "M") -> torch.Tensor:
    """Validate a d×d symmetric PSD matrix; return it symmetrised, in float64.

    Raises ValueError naming the problem: wrong shape, non-finite entries, M = 0 (a constant
    kernel: every pair of images equally similar), asymmetry beyond ``SYMMETRY_RTOL·max|M|``, or
    an eigenvalue below ``-PSD_RTOL·max|λ|``.
    """
    if not isinstance(M, torch.Tensor):
        try:
            M = torch.as_tensor(M)
        except Exception as exc:
            raise TypeError(f"{name} must be a tensor or array, got {type(M).__name__}") from exc
    if M.is_complex() or not (M.is_floating_point() or M.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real matrix, got dtype {M.dtype}")
    M = M.detach().to(device="cpu", dtype=torch.float64)
    if M.shape != (d, d):
        raise ValueError(f"{name} must have shape (d, d) = ({d}, {d}) with d = c·q², got {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} contains NaN or Inf")
    scale = M.abs().max().item()
    if scale == 0:
        raise ValueError(f"{name} is zero: the kernel would be constant (every pair of images equally similar)")
    asym = (M - M.T).abs().max().item()
    if asym > SYMMETRY_RTOL * max(scale, 1e-300):
        raise ValueError(f"{name} is not symmetric (max |M - Mᵀ| = {asym:.3g}, max |M| = {scale:.3g})")
    M = 0.5 * (M + M.T)
    evals = torch.linalg.eigvalsh(M)
    if evals[0].item() < -PSD_RTOL * max(evals.abs().max().item(), 1e-300):
        raise ValueError(f"{name} is not positive semi-definite (smallest eigenvalue {evals[0].item():.3g})")
    return M


def psd_power(M: torch.Tensor, power: float) -> torch.Tensor:
    """M^power for symmetric PSD M (negative eigenvalues clipped to 0)."""
    evals, evecs = torch.linalg.eigh(M)
    evals = evals.clamp_min(0)
    if power != 1:
        evals = torch.where(evals > 0, evals.pow(power), torch.zeros_like(evals))
    return (evecs * evals) @ evecs.T


def metric_factor(M: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """L (d×r) with M = L Lᵀ, from the eigendecomposition; r counts eigenvalues > rtol·λ_max.

    A zero M gives one zero column so the convolution view stays well defined.
    """
    evals, evecs = torch.linalg.eigh(M)
    keep = evals > rtol * max(evals[-1].item(), 0.0)
    if not keep.any():
        return torch.zeros(M.shape[0], 1, dtype=M.dtype, device=M.device)
    return evecs[:, keep] * evals[keep].sqrt()


def normalise_trace(M: torch.Tensor, target: float) -> torch.Tensor:
    """M scaled so that tr(M) = target (a zero M is returned unchanged)."""
    tr = torch.trace(M)
    return M if tr <= 0 else M * (target / tr)


def dc_direction(d: int) -> torch.Tensor:
    """e = 1/√d: the patch-brightness (DC) direction, the normalised all-ones vector."""
    return torch.full((d,), d**-0.5, dtype=torch.float64, device="cpu")


def fixed_metric(d: int, dc_weight: float | None = None) -> torch.Tensor:
    """The fixed patch metric: I, or (I − eeᵀ) + w·eeᵀ when a DC weight w is given."""
    M = torch.eye(d, dtype=torch.float64, device="cpu")
    if dc_weight is None:
        return M
    e = dc_direction(d)
    return M + (dc_weight - 1.0) * torch.outer(e, e)


def update_metric(
    G: torch.Tensor,
    power: float = 1.0,
    dc_weight: float | None = None,
    shrinkage: float = 0.0,
) -> torch.Tensor:
    """The ConvRFM update M ← normalise(G^power), with optional DC handling and shrinkage.

    Without a DC weight: M = d·G^p / tr(G^p), so tr(M) = tr(I) = d.
    With DC weight w: DC is projected out, G⊥ = (I − eeᵀ) G (I − eeᵀ), and
    M = (d − 1)·G⊥^p / tr(G⊥^p) + w·eeᵀ, so tr(M) = d − 1 + w, the trace of the fixed metric.
    Shrinkage λ: M ← (1 − λ)·M + λ·fixed_metric(d, w).

    G may come on any device and in any floating dtype: the update is computed in float64 on
    the CPU (d × d, cheap) and M is returned there, like every metric of the package. A G that
    leaves M = 0 (a constant predictor has a zero AGOP) is a ValueError.
    """
    d = G.shape[0]
    G = G.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(G).all():
        raise ValueError("the AGOP G contains NaN or Inf")
    G = 0.5 * (G + G.T)
    if dc_weight is None:
        M = normalise_trace(psd_power(G, power), d)
    else:
        e = dc_direction(d)
        proj = torch.eye(d, dtype=torch.float64, device="cpu") - torch.outer(e, e)
        M = normalise_trace(psd_power(proj @ G @ proj, power), d - 1) + dc_weight * torch.outer(e, e)
    if shrinkage:
        M = (1 - shrinkage) * M + shrinkage * fixed_metric(d, dc_weight)
    if not M.abs().max() > 0:
        raise ValueError("the metric update gives M = 0: the AGOP G is zero"
                         + ("" if dc_weight is None else " outside the DC direction") + " (the fitted predictor is constant)")
    return 0.5 * (M + M.T)


def spectrum_summary(M: torch.Tensor, top: int = 5) -> dict:
    """Top eigenvalues, effective rank (tr M / λ_max) and DC share (eᵀMe / tr M) of a metric."""
    evals = torch.linalg.eigvalsh(M).flip(0)
    e = dc_direction(M.shape[0])
    tr = torch.trace(M).item()
    return {
        "top_eigenvalues": [round(v, 6) for v in evals[:top].tolist()],
        "effective_rank": tr / max(evals[0].item(), 1e-300),
        "dc_share": (e @ M @ e).item() / max(tr, 1e-300),
        "trace": tr,
    }


def patch_covariance(patches: torch.Tensor) -> torch.Tensor:
    """Σ = (1/N) Σ_i (x_i − x̄)(x_i − x̄)ᵀ of patches (N, d), in float64."""
    X = patches.reshape(-1, patches.shape[-1]).double()
    X = X - X.mean(0)
    return X.T @ X / max(X.shape[0], 1)


def whitening_metric(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """M₀ = (Σ + ε·λ̄·I)⁻¹ scaled to tr(M₀) = d, with λ̄ = tr(Σ)/d: the patch-whitening metric
    (‖u − v‖_{M₀} is the distance of ZCA-whitened patches); ε ≥ 0 is relative to the mean eigenvalue."""
    evals, evecs = _whitening_spectrum(cov, eps)
    return normalise_trace((evecs / evals) @ evecs.T, evals.shape[0])


def _refined_inner(G_t: torch.Tensor, r: int, power: float, shrinkage: float) -> torch.Tensor:
    """(1 − s)·r·G̃^p / tr(G̃^p) + s·I_r: the new metric in the current metric's coordinates."""
    G_t = G_t.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(G_t).all():
        raise ValueError("the AGOP G contains NaN or Inf")
    inner = normalise_trace(psd_power(0.5 * (G_t + G_t.T), power), r)
    if not inner.abs().max() > 0:
        raise ValueError("the metric update gives M = 0: the AGOP is zero (the fitted predictor is constant)")
    return (1 - shrinkage) * inner + shrinkage * torch.eye(r, dtype=torch.float64)


def refine_metric(factor: torch.Tensor, G_t: torch.Tensor, power: float = 0.5, shrinkage: float = 0.0) -> torch.Tensor:
    """The update in the current metric's coordinates: with M = L Lᵀ and G̃ the AGOP taken with
    respect to u = Lᵀx,  M' = L·[(1 − s)·r·G̃^p / tr(G̃^p) + s·I_r]·Lᵀ  (r = rank of L).

    s = 1 keeps M; s = 0 replaces the metric in u-space by the AGOP's power. Starting from the
    whitening metric this refines whitening instead of replacing it."""
    inner = _refined_inner(G_t, factor.shape[1], power, shrinkage)
    L = factor.detach().to(device="cpu", dtype=torch.float64)
    M = L @ inner @ L.T
    return 0.5 * (M + M.T)


def refine_factor(factor: torch.Tensor, G_t: torch.Tensor, power: float = 0.5, shrinkage: float = 0.0) -> torch.Tensor:
    """:func:`refine_metric` as a factor: L' = L·inner^{1/2} (d × r, float64 on the CPU), so that
    L' L'ᵀ = refine_metric(L, G̃): the rank r of the metric is kept and no d × d matrix is formed."""
    inner = _refined_inner(G_t, factor.shape[1], power, shrinkage)
    return factor.detach().to(device="cpu", dtype=torch.float64) @ psd_power(inner, 0.5)


def _whitening_spectrum(cov: torch.Tensor, eps: float):
    """(λ + ε·λ̄, V) of Σ, ascending, checked as :func:`whitening_metric` checks them."""
    if not eps >= 0:
        raise ValueError(f"the whitening regulariser eps must be >= 0, got {eps!r}")
    cov = cov.detach().to(device="cpu", dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    evals = evals.clamp_min(0) + eps * evals.clamp_min(0).mean()
    if not evals.max() > 0:
        raise ValueError("the patch covariance is 0 (the training patches are all the same, e.g. constant images): "
                         "there is nothing to whiten (metric='whiten')")
    if not evals.min() > 0:
        raise ValueError("the patch covariance is singular: whitening needs eps > 0")
    return evals, evecs


def whitening_factor(cov: torch.Tensor, eps: float, rank: int | None = None) -> torch.Tensor:
    """L = c·V_r (λ_r + ε·λ̄)^{-1/2} (d × r): PCA whitening on the top r principal directions of Σ
    (all d when ``rank`` is None or ≥ d), c chosen so that the full-rank metric has trace d; at full
    rank L Lᵀ = :func:`whitening_metric` (Σ, ε), at rank r its restriction to the top r directions."""
    evals, evecs = _whitening_spectrum(cov, eps)
    d = evals.shape[0]
    r = d if rank is None else min(rank, d)
    scale = d / (1 / evals).sum()
    return evecs.flip(1)[:, :r] * (scale / evals.flip(0)[:r]).sqrt()


def principal_factor(cov: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """L = V_r (d × r): the projection on the top r principal directions of Σ; I_d when ``rank``
    is None or ≥ d (the identity metric)."""
    d = cov.shape[0]
    if rank is None or rank >= d:
        return torch.eye(d, dtype=torch.float64)
    evecs = torch.linalg.eigh(0.5 * (cov + cov.T).detach().to(device="cpu", dtype=torch.float64))[1]
    return evecs.flip(1)[:, :rank]
