"""Neural-collapse metrics of a feature matrix H (n × p) with class labels y."""
from __future__ import annotations

import torch


def _class_means(H: torch.Tensor, y: torch.Tensor):
    H = torch.as_tensor(H, dtype=torch.float64)
    y = torch.as_tensor(y)
    if H.dim() != 2 or y.dim() != 1 or H.shape[0] != y.shape[0]:
        raise ValueError(f"need features (n, p) and labels (n,), got {tuple(H.shape)} and {tuple(y.shape)}")
    classes = torch.unique(y)
    if classes.numel() < 2:
        raise ValueError("neural-collapse metrics need at least 2 classes")
    means = torch.stack([H[y == c].mean(0) for c in classes])
    return H, y, classes, means


def nc1(H, y) -> float:
    """NC1 = tr(Σ_W) / tr(Σ_B): within-class over between-class variability.

    Σ_W = (1/n) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ, Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ,
    μ_G the mean of the class means. 0 when every feature equals its class mean.
    """
    H, y, classes, means = _class_means(H, y)
    codes = torch.searchsorted(classes, y)
    within = (H - means[codes]).pow(2).sum(1).mean()
    between = (means - means.mean(0)).pow(2).sum(1).mean()
    return (within / between).item()


def nc2(H, y) -> float:
    """NC2 = ‖G/‖G‖_F − E/‖E‖_F‖_F: distance of the Gram matrix G of the normalised centred
    class means from the simplex ETF Gram E = (C/(C−1))(I − 11ᵀ/C). 0 for a simplex ETF."""
    _, _, classes, means = _class_means(H, y)
    C = classes.numel()
    centred = means - means.mean(0)
    unit = centred / centred.norm(dim=1, keepdim=True)
    G = unit @ unit.T
    E = (torch.eye(C, dtype=G.dtype) - 1.0 / C) * (C / (C - 1))
    return (G / G.norm() - E / E.norm()).norm().item()
