"""Naive float64 reference for the aligned-patch convolutional kernel.

Deliberately independent of ``falkon_convrfm`` and of ``torch.nn.functional.unfold/conv2d``:
patches are cut out of zero-padded numpy images with explicit loops and every patch kernel
κ(x_p, z_p) is evaluated directly in the metric M,

    ‖u − v‖_M = sqrt((u − v)ᵀ M (u − v)),   ⟨u, v⟩_M = uᵀ M v,

then summed with location weights: K(x, z) = Σ_p ω_p κ(x_p, z_p).

Images travel as rows of length c·H·W (C-order flattening of (c, H, W)); a patch is a vector
of length c·q² in (channel, row, col) order, and locations are enumerated row-major over the
(Ho, Wo) output grid -- the conventions of ``torch.nn.functional.unfold``.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

BASE_KERNELS = ("laplace", "gaussian", "ntk")


def _as_float64(a) -> np.ndarray:
    """numpy float64 copy of a numpy array or a (CPU) torch tensor."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.array(a, dtype=np.float64)


def out_shape(image_shape, q: int, stride: int, padding: int) -> tuple:
    """(Ho, Wo): number of patch positions along each axis."""
    _, h, w = image_shape
    return (h + 2 * padding - q) // stride + 1, (w + 2 * padding - q) // stride + 1


def num_locations(image_shape, q: int, stride: int, padding: int) -> int:
    ho, wo = out_shape(image_shape, q, stride, padding)
    return ho * wo


def extract_patches(row, image_shape, q: int, stride: int, padding: int) -> np.ndarray:
    """All patches of one image row, shape (P, c·q²), with explicit loops.

    Pixel (ch, i, j) of the padded image is x[ch, i − padding, j − padding] inside the image
    and 0 outside; patch (a, b) covers padded rows a·s .. a·s+q−1 and cols b·s .. b·s+q−1.
    """
    c, h, w = image_shape
    row = _as_float64(row).reshape(-1)
    assert row.size == c * h * w, (row.size, image_shape)
    img = row.reshape(c, h, w)  # C-order
    ho, wo = out_shape(image_shape, q, stride, padding)
    patches = np.zeros((ho * wo, c * q * q))
    for a in range(ho):
        for b in range(wo):
            p = a * wo + b
            k = 0
            for ch in range(c):
                for di in range(q):
                    for dj in range(q):
                        i = a * stride + di - padding
                        j = b * stride + dj - padding
                        if 0 <= i < h and 0 <= j < w:
                            patches[p, k] = img[ch, i, j]
                        k += 1
    return patches


def patch_kernel(u: np.ndarray, v: np.ndarray, M: np.ndarray, kind: str, sigma: float) -> float:
    """κ(u, v) in the metric M by the textbook formulas (float64)."""
    if kind in ("laplace", "gaussian"):
        diff = u - v
        sq = max(float(diff @ M @ diff), 0.0)
        if kind == "laplace":
            return math.exp(-math.sqrt(sq) / sigma)
        return math.exp(-sq / (2.0 * sigma**2))
    if kind == "ntk":
        a = math.sqrt(max(float(u @ M @ u), 0.0))
        b = math.sqrt(max(float(v @ M @ v), 0.0))
        if a == 0.0 or b == 0.0:
            return 0.0
        dot = float(u @ M @ v)
        cos = min(1.0, max(-1.0, dot / (a * b)))
        theta = math.acos(cos)
        return dot * (math.pi - theta) / math.pi + a * b * (math.sin(theta) + (math.pi - theta) * cos) / math.pi
    raise ValueError(f"unknown kernel {kind!r}")


def conv_kernel(
    X1,
    X2,
    image_shape,
    q: int,
    stride: int = 1,
    padding: int = 0,
    kind: str = "laplace",
    sigma: float = 1.0,
    M=None,
    weights=None,
) -> np.ndarray:
    """K (n, m) with K_ij = Σ_p ω_p κ(X1_i,p, X2_j,p), all in float64.

    ``M=None`` is the identity; ``weights=None`` is uniform 1/P (weights are used as given,
    not renormalised).
    """
    X1, X2 = _as_float64(X1), _as_float64(X2)
    c = image_shape[0]
    d = c * q * q
    M = np.eye(d) if M is None else _as_float64(M)
    assert M.shape == (d, d)
    P = num_locations(image_shape, q, stride, padding)
    w = np.full(P, 1.0 / P) if weights is None else _as_float64(weights).reshape(-1)
    assert w.size == P
    patches1 = [extract_patches(x, image_shape, q, stride, padding) for x in X1]
    patches2 = [extract_patches(z, image_shape, q, stride, padding) for z in X2]
    K = np.zeros((len(patches1), len(patches2)))
    for i, p1 in enumerate(patches1):
        for j, p2 in enumerate(patches2):
            total = 0.0
            for p in range(P):
                total += w[p] * patch_kernel(p1[p], p2[p], M, kind, sigma)
            K[i, j] = total
    return K


def pooled_conv_kernel(X1, X2, image_shape, q: int, stride: int, padding: int, window: int, kind: str,
                       sigma: float, M, weights) -> np.ndarray:
    """K (n, m) with a w×w pooling window, by loops over rows, locations and window offsets:
    K_ij = Σ_p Σ_{δ, p+δ on the grid} ω_{p,p+δ} κ(X1_i,p, X2_j,p+δ), ω_{pq} = (ω_p + ω_q)/2 (float64;
    window 1 is :func:`conv_kernel`)."""
    ho, wo = out_shape(image_shape, q, stride, padding)
    h = window // 2
    M, weights = _as_float64(M), _as_float64(weights).reshape(-1)
    P1 = [extract_patches(x, image_shape, q, stride, padding) for x in _as_float64(X1)]
    P2 = [extract_patches(z, image_shape, q, stride, padding) for z in _as_float64(X2)]
    K = np.zeros((len(P1), len(P2)))
    for i, j in itertools.product(range(len(P1)), range(len(P2))):
        total = 0.0
        for a, b in itertools.product(range(ho), range(wo)):
            for di, dj in itertools.product(range(-h, h + 1), repeat=2):
                if 0 <= a + di < ho and 0 <= b + dj < wo:
                    p, qq = a * wo + b, (a + di) * wo + (b + dj)
                    total += 0.5 * (weights[p] + weights[qq]) * patch_kernel(P1[i][p], P2[j][qq], M, kind, sigma)
        K[i, j] = total
    return K


def random_psd(d: int, rank: int | None = None, rng=None, trace: float | None = None) -> np.ndarray:
    """A random symmetric PSD d×d matrix of the given rank (full rank by default), exactly
    symmetric, scaled to trace ``trace`` (default d, i.e. the scale of the identity)."""
    rng = np.random.default_rng(rng)
    rank = d if rank is None else rank
    A = rng.standard_normal((d, rank))
    M = A @ A.T
    M = 0.5 * (M + M.T)
    return M * ((d if trace is None else trace) / np.trace(M))


def random_weights(P: int, rng=None, normalise: bool = True) -> np.ndarray:
    """Random positive location weights ω (P,), summing to 1 unless ``normalise=False``."""
    rng = np.random.default_rng(rng)
    w = rng.uniform(0.1, 1.0, size=P)
    return w / w.sum() if normalise else w


def relative_error(result, reference) -> float:
    """max |result − reference| / max |reference| (in float64)."""
    result, reference = _as_float64(result), _as_float64(reference)
    assert result.shape == reference.shape, (result.shape, reference.shape)
    scale = np.abs(reference).max()
    return float(np.abs(result - reference).max() / (scale if scale > 0 else 1.0))
