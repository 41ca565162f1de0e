r"""Convolutional Neural Feature Ansatz check for torch CNNs.

For a ``nn.Conv2d`` layer with filters W (k × c × q × q, seen as k × d), the ansatz says
WᵀW ∝ G, the patch AGOP of the network outputs with respect to that layer's input patches:

.. math::  G = \frac1n Σ_i Σ_p Σ_o ∇_{u_p} f_o(x_i)\, ∇_{u_p} f_o(x_i)ᵀ

where u_p are the patches of the layer's input, each treated as an independent variable. The
layer is evaluated as ``W @ unfold(input)`` on a patch tensor that requires gradients, so one
backward pass per output gives every patch gradient at once.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metric import psd_power


@contextlib.contextmanager
def _patch_leaf(layer: nn.Conv2d, store: dict):
    """Run ``layer`` as W·unfold(x) + b with the unfolded patches as a grad-requiring leaf."""
    if layer.groups != 1 or layer.dilation != (1, 1) or isinstance(layer.padding, str):
        raise ValueError("cnfa supports Conv2d layers with groups=1, dilation=1 and numeric padding")

    def forward(module, inputs):
        (x,) = inputs
        cols = F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)  # (n, d, P)
        cols = cols.detach().requires_grad_(True)
        store["patches"] = cols
        n, _, P = cols.shape
        H = (x.shape[2] + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
        W = (x.shape[3] + 2 * layer.padding[1] - layer.kernel_size[1]) // layer.stride[1] + 1
        out = layer.weight.reshape(layer.out_channels, -1) @ cols
        if layer.bias is not None:
            out = out + layer.bias[:, None]
        return out.reshape(n, layer.out_channels, H, W)

    original = layer.forward
    layer.forward = lambda x: forward(layer, (x,))
    try:
        yield
    finally:
        layer.forward = original


def conv_patch_agop(model: nn.Module, layer: nn.Conv2d, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """G (d × d): the patch AGOP of ``model``'s outputs w.r.t. ``layer``'s input patches, in
    chunks of ``chunk`` images, accumulated in float64."""
    if layer not in list(model.modules()):
        raise ValueError("layer is not a module of model")
    d = layer.weight[0].numel()
    G = torch.zeros(d, d, dtype=torch.float64)
    store = {}
    was_training = model.training
    model.eval()
    try:
        with _patch_leaf(layer, store):
            for i in range(0, images.shape[0], chunk):
                out = model(images[i : i + chunk])
                out = out.reshape(out.shape[0], -1)
                for o in range(out.shape[1]):
                    (grad,) = torch.autograd.grad(out[:, o].sum(), store["patches"], retain_graph=o + 1 < out.shape[1])
                    g = grad.transpose(1, 2).reshape(-1, d).double()  # (n·P, d)
                    G += g.T @ g
    finally:
        model.train(was_training)
    return G / images.shape[0]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def cnfa_correlation(model: nn.Module, layer: nn.Conv2d, images: torch.Tensor, chunk: int = 64) -> dict:
    """Pearson correlations between the entries of WᵀW and of G, and of G^{1/2}.

    Returns ``{"G": ρ(WᵀW, G), "sqrtG": ρ(WᵀW, G^{1/2})}``.
    """
    W = layer.weight.detach().reshape(layer.out_channels, -1).double()
    G = conv_patch_agop(model, layer, images, chunk)
    WtW = W.T @ W
    return {"G": _pearson(WtW, G), "sqrtG": _pearson(WtW, psd_power(G, 0.5))}
