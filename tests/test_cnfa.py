"""Convolutional Neural Feature Ansatz check (falkon_convrfm.cnfa) against brute-force autograd.

The reference runs the layers before the inspected conv by hand, unfolds that conv's input,
and evaluates the rest of the network by hand as a function of the unfolded patches (n, d, P);
``torch.autograd.functional.jacobian`` of the outputs w.r.t. the patches gives every
∇_{u_p} f_o(x_i) (the i-th image's outputs depend only on its own patches, so the diagonal
blocks of the Jacobian are taken). Acceptance: relative error ≤ 1e-8 in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from falkon_convrfm.cnfa import _pearson, cnfa_correlation, conv_patch_agop


pytestmark = pytest.mark.usefixtures("one_thread")


N_OUT = 4


def tiny_cnn(seed=0, bias=True):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=1, padding=1, bias=bias),  # 3×8×8 → 4×8×8
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=bias),  # → 5×4×4
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, N_OUT),
    ).double()
    return model


def images(n=10, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _conv_from_patches(conv: nn.Conv2d, cols: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """conv's output from its unfolded input (n, d, P), by hand."""
    Ho = (H + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    Wo = (W + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
    out = torch.einsum("kd,ndp->nkp", conv.weight.reshape(conv.out_channels, -1), cols)
    if conv.bias is not None:
        out = out + conv.bias[None, :, None]
    return out.reshape(cols.shape[0], conv.out_channels, Ho, Wo)


def brute_force_agop(model: nn.Sequential, layer_index: int, x: torch.Tensor) -> torch.Tensor:
    """G = (1/n) Σ_i Σ_p Σ_o ∇_{u_p} f_o(x_i) ∇_{u_p} f_o(x_i)ᵀ by full Jacobians."""
    layers = list(model)
    conv = layers[layer_index]
    with torch.no_grad():
        h = x
        for mod in layers[:layer_index]:
            h = mod(h)
    H, W = h.shape[2:]
    cols = F.unfold(h, conv.kernel_size, padding=conv.padding, stride=conv.stride).detach()  # (n, d, P)

    def rest(c):
        z = _conv_from_patches(conv, c, H, W)
        for mod in layers[layer_index + 1 :]:
            z = mod(z)
        return z  # (n, O)

    J = torch.autograd.functional.jacobian(rest, cols)  # (n, O, n, d, P)
    n = x.shape[0]
    idx = torch.arange(n)
    g = J[idx, :, idx]  # (n, O, d, P): own patches only
    # the off-diagonal blocks are exactly 0 (images do not interact)
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[idx, idx] = False
    assert J.permute(0, 2, 1, 3, 4)[mask].abs().max().item() == 0.0
    return torch.einsum("nodp,noep->de", g, g) / n


def rel_err(result, reference) -> float:
    scale = reference.abs().max().item()
    return (result - reference).abs().max().item() / (scale if scale > 0 else 1.0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layer_index", [0, 2])
def test_conv_patch_agop_matches_brute_force(layer_index, bias):
    model = tiny_cnn(bias=bias)
    x = images()
    layer = model[layer_index]
    G_ref = brute_force_agop(model, layer_index, x)
    d = layer.weight[0].numel()
    assert G_ref.shape == (d, d) and G_ref.abs().max() > 0
    G = conv_patch_agop(model, layer, x, chunk=3)
    assert G.shape == (d, d) and G.dtype == torch.float64
    assert rel_err(G, G_ref) <= 1e-8
    G_all = conv_patch_agop(model, layer, x, chunk=100)
    assert rel_err(G_all, G) <= 1e-12
    assert torch.allclose(G, G.T, atol=1e-12 * G.abs().max().item())
    evals = torch.linalg.eigvalsh(0.5 * (G + G.T))
    assert evals.min().item() >= -1e-10 * evals.abs().max().item()


def test_conv_patch_agop_restores_model():
    model = tiny_cnn()
    model.train()
    x = images(4)
    before = model(x).detach()
    layer = model[2]
    conv_patch_agop(model, layer, x, chunk=2)
    assert model.training  # mode restored
    assert "forward" not in vars(layer) or vars(layer)["forward"] == layer.forward  # no leftover override
    assert torch.equal(model(x), before)
    for p in model.parameters():
        assert p.grad is None  # gradients w.r.t. patches only


def test_conv_patch_agop_float32_model():
    model = tiny_cnn()
    x = images(6)
    G64 = conv_patch_agop(model, model[0], x, chunk=4)
    model32 = model.float()
    G32 = conv_patch_agop(model32, model32[0], x.float(), chunk=4)
    assert G32.dtype == torch.float64
    assert rel_err(G32, G64) <= 1e-4


def test_cnfa_correlation_keys_and_range():
    model = tiny_cnn()
    x = images(6)
    for idx in (0, 2):
        res = cnfa_correlation(model, model[idx], x, chunk=4)
        assert set(res) == {"G", "sqrtG"}
        for v in res.values():
            assert isinstance(v, float) and -1.0 - 1e-12 <= v <= 1.0 + 1e-12


def test_cnfa_correlation_matches_manual_pearson():
    model = tiny_cnn()
    x = images(6)
    layer = model[2]
    res = cnfa_correlation(model, layer, x, chunk=4)
    W = layer.weight.detach().reshape(layer.out_channels, -1)
    WtW = (W.T @ W).flatten()
    G = conv_patch_agop(model, layer, x, chunk=4)
    a, b = WtW - WtW.mean(), G.flatten() - G.flatten().mean()
    assert res["G"] == pytest.approx((a @ b / (a.norm() * b.norm())).item(), abs=1e-12)


def test_pearson_self_and_negation():
    A = torch.randn(5, 5, dtype=torch.float64)
    assert _pearson(A, A) == pytest.approx(1.0, abs=1e-14)
    assert _pearson(A, -3 * A + 2) == pytest.approx(-1.0, abs=1e-14)
    assert _pearson(A, 2.5 * A) == pytest.approx(1.0, abs=1e-14)


def test_layer_not_in_model():
    model = tiny_cnn()
    other = nn.Conv2d(3, 4, 3).double()
    with pytest.raises(ValueError, match="not a module"):
        conv_patch_agop(model, other, images(2))
    with pytest.raises(ValueError, match="not a module"):
        cnfa_correlation(model, other, images(2))


def test_grouped_conv_rejected():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="groups"):
        conv_patch_agop(model, model[0], x)


def test_dilated_conv_rejected():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, dilation=2), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).double()
    with pytest.raises(ValueError, match="dilation"):
        conv_patch_agop(model, model[0], images(2))
