"""Exact kernel ridge regression: the small-problem solver and the reference for Falkon."""
from __future__ import annotations

import torch


def exact_ridge_fit(kernel, X: torch.Tensor, Y: torch.Tensor, penalty: float) -> torch.Tensor:
    """α = (K + nλI)⁻¹ Y with K = kernel(X, X), by Cholesky in float64.

    The penalty follows Falkon's convention (λ is multiplied by n), so Falkon with every
    training point as a centre solves the same problem. Returns α in X's dtype.
    """
    if penalty <= 0:
        raise ValueError(f"penalty must be positive, got {penalty}")
    n = X.shape[0]
    K = kernel(X, X).to(torch.float64)
    K.diagonal().add_(n * penalty)
    chol, info = torch.linalg.cholesky_ex(K)
    if info.item() != 0:
        raise ValueError(f"K + nλI is not positive definite (penalty={penalty:g} too small for this kernel)")
    Y2 = Y.reshape(n, -1).to(torch.float64)
    return torch.cholesky_solve(Y2, chol).to(X.dtype)


def kernel_predict(kernel, X: torch.Tensor, centres: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """f(X) = K(X, centres) α."""
    return kernel.mmv(X, centres, alpha)
