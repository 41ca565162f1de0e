"""Exact kernel ridge regression: the small-problem solver and the reference for Falkon."""
from __future__ import annotations

import torch

from ._compat import HAS_FALKON, make_options, require_falkon


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


def solver_options(max_memory=None, device: str = "cpu", **overrides):
    """Options for the kernel and the solver: ``falkon.FalkonOptions`` (or
    :class:`~falkon_convrfm.KernelOptions` without Falkon) with the memory budget on both
    devices and K_nm stored whenever it fits (``store_kernel_d_threshold=0``): a convolutional
    kernel costs P·r per entry whatever the row length, so re-evaluating it at every CG
    iteration never pays."""
    opts = {}
    if max_memory is not None:
        opts.update(max_cpu_mem=float(max_memory), max_gpu_mem=float(max_memory))
    if HAS_FALKON:  # no_single_kernel=False: float32 data keeps float32 kernel blocks (2× faster)
        opts.update(store_kernel_d_threshold=0, no_single_kernel=False, use_cpu=(device == "cpu"))
    opts.update(overrides)
    return make_options(**opts)


def fit_kernel_machine(
    kernel,
    X: torch.Tensor,
    Y: torch.Tensor,
    centre_idx: torch.Tensor,
    penalty: float,
    solver: str,
    loss: str = "squared",
    maxiter: int = 20,
    options=None,
):
    """Fit f(x) = K(x, centres) α; returns (centres, α).

    ``solver='exact'``: every row is a centre, α = (K + nλI)⁻¹Y. ``'falkon'``: Nyström with the
    rows ``centre_idx`` as centres (the same centres at every call), squared loss with
    ``falkon.Falkon`` or logistic loss (binary, Y in {−1, +1}) with ``falkon.LogisticFalkon``.
    """
    if solver == "exact":
        if loss != "squared":
            raise ValueError("the exact solver supports the squared loss only; use solver='falkon'")
        return X, exact_ridge_fit(kernel, X, Y, penalty)
    falkon = require_falkon()
    centres = X[centre_idx]
    selector = falkon.center_selection.FixedSelector(centres, y_centers=Y[centre_idx])
    if loss == "logistic":
        penalties = [max(penalty, p) for p in (penalty * 1e4, penalty * 1e2, penalty)]
        model = falkon.LogisticFalkon(
            kernel, penalties, [3, 3, maxiter], falkon.gsc_losses.LogisticLoss(kernel),
            M=len(centre_idx), center_selection=selector, options=options,
        )
    else:
        model_cls = falkon.InCoreFalkon if X.is_cuda else falkon.Falkon  # data on the GPU: in-core
        model = model_cls(
            kernel, penalty, M=len(centre_idx), center_selection=selector, maxiter=maxiter, options=options
        )
    model.fit(X, Y)
    return model.ny_points_, model.alpha_
