"""Patch metrics M: validation, factorisation M = L Lᵀ, powers and normalisation."""
from __future__ import annotations

import torch

# Relative tolerances, against the largest absolute eigenvalue / entry of M.
SYMMETRY_RTOL = 1e-6
PSD_RTOL = 1e-6


def as_metric(M, d: int, name: str = "M") -> torch.Tensor:
    """Validate a d×d symmetric PSD matrix; return it symmetrised, in float64.

    Raises ValueError naming the problem: wrong shape, non-finite entries, asymmetry beyond
    ``SYMMETRY_RTOL·max|M|``, or an eigenvalue below ``-PSD_RTOL·max|λ|``.
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
        return torch.zeros(M.shape[0], 1, dtype=M.dtype)
    return evecs[:, keep] * evals[keep].sqrt()


def normalise_trace(M: torch.Tensor, target: float) -> torch.Tensor:
    """M scaled so that tr(M) = target (a zero M is returned unchanged)."""
    tr = torch.trace(M)
    return M if tr <= 0 else M * (target / tr)
