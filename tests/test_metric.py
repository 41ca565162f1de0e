"""The metric update and the fixed metrics (falkon_convrfm.metric): trace normalisation, the
matrix power, the DC weight, shrinkage towards the fixed metric, and dtype handling (the update
runs in float64 on the CPU whatever G's dtype). Estimator-level uses of the metric are in
test_rfm.py; the whitening metric and its refinement in test_features.py."""
from __future__ import annotations

import pytest
import torch

from falkon_convrfm.metric import dc_direction, fixed_metric, update_metric


def _random_psd(d, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return A @ A.T


def test_update_metric_trace_normalisation():
    d = 9
    G = _random_psd(d) * 1e-3
    M = update_metric(G)
    assert torch.equal(M, M.T)
    assert torch.trace(M).item() == pytest.approx(d, rel=1e-12)
    assert torch.allclose(M, G * d / torch.trace(G), rtol=1e-12, atol=0)
    assert torch.linalg.eigvalsh(M).min() >= -1e-12


def test_update_metric_power_half():
    d = 9
    G = _random_psd(d, seed=1)  # full rank: sqrt of round-off eigenvalues would be ~1e-8
    M = update_metric(G, power=0.5)
    evals, evecs = torch.linalg.eigh(G)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    expected = root * d / torch.trace(root)
    assert torch.trace(M).item() == pytest.approx(d, rel=1e-12)
    assert (M - expected).abs().max().item() <= 1e-10 * expected.abs().max().item()
    # M² ∝ G (same eigenvectors, squared spectrum)
    M2 = M @ M
    assert torch.allclose(M2 / torch.trace(M2), G / torch.trace(G), atol=1e-10)


@pytest.mark.parametrize("w", [0.0, 0.2, 1.0, 3.0])
def test_update_metric_dc_weight(w):
    d = 9
    G = _random_psd(d, seed=2)
    M = update_metric(G, dc_weight=w)
    e = dc_direction(d)
    assert torch.allclose(e, torch.ones(d, dtype=torch.float64) / 3.0)
    # DC is an eigenvector with eigenvalue w
    assert torch.allclose(M @ e, w * e, atol=1e-12)
    assert (e @ M @ e).item() / (e @ e).item() == pytest.approx(w, abs=1e-12)
    assert torch.trace(M).item() == pytest.approx(d - 1 + w, rel=1e-12)
    # the rest is the trace-normalised projected G
    proj = torch.eye(d, dtype=torch.float64) - torch.outer(e, e)
    Gp = proj @ G @ proj
    expected = Gp * (d - 1) / torch.trace(Gp) + w * torch.outer(e, e)
    assert torch.allclose(M, expected, atol=1e-12)
    # the fixed metric with the same DC weight has the same trace and DC eigenvalue
    F = fixed_metric(d, w)
    assert torch.allclose(F @ e, w * e, atol=1e-15)
    assert torch.trace(F).item() == pytest.approx(d - 1 + w)


@pytest.mark.parametrize("w", [None, 0.2])
def test_update_metric_full_shrinkage_is_fixed_metric(w):
    d = 9
    G = _random_psd(d, seed=3, rank=3)
    M = update_metric(G, power=1.0, dc_weight=w, shrinkage=1.0)
    assert torch.allclose(M, fixed_metric(d, w), atol=1e-15)
    half = update_metric(G, dc_weight=w, shrinkage=0.5)
    assert torch.allclose(half, 0.5 * update_metric(G, dc_weight=w) + 0.5 * fixed_metric(d, w), atol=1e-14)


def test_fixed_metric_identity():
    assert torch.equal(fixed_metric(4), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dc_weight", [None, 0.2])
def test_update_metric_any_dtype(dtype, dc_weight):
    """G of any floating dtype (and device): the update runs in float64 on the CPU."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(9, 9, generator=g, dtype=torch.float64)
    G = (A @ A.T).to(dtype)
    M = update_metric(G, 0.5, dc_weight, 0.1)
    assert M.dtype == torch.float64 and M.device.type == "cpu"
    reference = update_metric(G.double(), 0.5, dc_weight, 0.1)
    assert torch.equal(M, reference)


def test_update_metric_under_another_default_dtype():
    previous = torch.get_default_dtype()
    G = torch.eye(4, dtype=torch.float32) + 0.5
    try:
        torch.set_default_dtype(torch.float64)
        M64 = update_metric(G, dc_weight=0.2)
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(M64, update_metric(G, dc_weight=0.2))
