r"""Base patch kernels κ(u, v): one object per kernel, holding every form the package evaluates it in.

u, v are patches already transformed by the metric factor (u = Lᵀx_p), so every formula is the
Euclidean one. Each object gives

- ``pairs(U, V, sigma)``: κ of paired vectors by the direct formula (diagonals, references);
- ``gemm_form(sigma)`` and ``gemm_map(E, row_aux, col_aux)``: what one batched GEMM computes,
  E = A Bᵀ on operands built from the patches, and the element-wise map E ↦ κ after it (the CPU
  backend); σ becomes the GEMM's scale γ in ``gemm_form`` only;
- ``gradient_weights(U, V, sigma)``: (Ũ, Ṽ, Q, S) of the closed-form gradient
  ∇_u Σ_j α_j κ(u, v_j) = Σ_j α_j (Q_j ṽ_j + S_j ũ) (the AGOP, :mod:`falkon_convrfm.agop`);
- ``keops_kernel(T1, T2, sigma)``: the KeOps LazyTensor of κ;
- ``triton_map`` / ``triton_param(sigma)``: the fused GPU kernel's map from ⟨u, v⟩, ‖u‖², ‖v‖²
  to κ, and its scalar parameter.

Adding a base kernel is one new object registered in :data:`BASE_KERNELS`.
"""
from __future__ import annotations

import math

import torch

from ._compile import compiled_fn, use_compiled

try:  # Triton ships with CUDA builds of torch; on CPU it is optional (its interpreter runs tests).
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False

# Squared distances below ROUNDING_FLOOR·eps·(‖u‖² + ‖v‖²) are GEMM rounding (laplace): counted as 0,
# so identical patches give κ = 1 exactly instead of an O(√eps) error through the square root.
ROUNDING_FLOOR = 16
# The same floor in the float32 Triton kernel (a constexpr there): ROUNDING_FLOOR·eps(float32) = 16·2⁻²³.
ROUNDING_FLOOR_FLOAT32 = ROUNDING_FLOOR * torch.finfo(torch.float32).eps
# Distances (laplace) or sines (ntk) below this, relative to the patch scale, count as zero in the
# gradient: the subgradient 0 there, and 1/distance stays finite.
ZERO_RTOL = {torch.float64: 1e-7, torch.float32: 1e-3}


def _triton_jit(fn):
    return triton.jit(fn) if HAS_TRITON else None


_TRITON_ROUNDING_FLOOR = tl.constexpr(ROUNDING_FLOOR_FLOAT32) if HAS_TRITON else None


def unit_rows(T: torch.Tensor):
    """Norms ‖T[..., :]‖ and the rows divided by them (zero rows stay zero)."""
    norms = torch.linalg.vector_norm(T, dim=-1)
    unit = T / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
    return norms, unit


def ntk_profile(c):
    """g(c) = (2c(π − arccos c) + √(1 − c²))/π, so that κ_ntk(u, v) = ‖u‖‖v‖·g(cos θ).

    Written with tensor methods only, so the same expression serves torch tensors and KeOps
    LazyTensors."""
    c = c.clamp(-1.0, 1.0)
    return (2 * c * (math.pi - c.acos()) + (1 - c * c).relu().sqrt()) / math.pi


@_triton_jit
def triton_acos(c):
    """arccos on [−1, 1] (Abramowitz & Stegun 4.4.46, |error| ≤ 2e-8): acos|c| = √(1 − |c|)·poly(|c|),
    acos c = π − acos|c| for c < 0. Triton has no portable acos (libdevice does not run in the
    interpreter)."""
    x = tl.abs(c)
    p = -0.0012624911 * x + 0.0066700901
    p = p * x - 0.0170881256
    p = p * x + 0.0308918810
    p = p * x - 0.0501743046
    p = p * x + 0.0889789874
    p = p * x - 0.2145988016
    p = p * x + 1.5707963050
    r = tl.sqrt(tl.maximum(1.0 - x, 0.0)) * p
    return tl.where(c < 0, 3.141592653589793 - r, r)


# ---------------------------------------------------------------------------------------------- GEMM forms
class DistanceForm:
    r"""E = γ‖u − v‖² from one GEMM on augmented operands, patches centred per location first
    (distances are translation invariant; centring limits cancellation):

    .. math:: [−2γ(u − c),\ γ‖u − c‖²,\ 1] · [v − c,\ 1,\ γ‖v − c‖²] = γ‖u − v‖²

    ``floor``: the auxiliary per-row values are ROUNDING_FLOOR·eps·γ‖· − c‖² (see ``gemm_map``)."""

    extra_columns = 2

    def __init__(self, gamma: float, floor: bool):
        self.gamma, self.floor = gamma, floor

    def context(self, T2: torch.Tensor):
        return T2.mean(dim=1, keepdim=True)

    def write(self, src: torch.Tensor, centre, dst: torch.Tensor, right: bool):
        """Fill ``dst`` (p, t, ≥ r + 2) with the operand rows of ``src`` (p, t, r); returns the
        auxiliary values (p, t) or None."""
        r = src.shape[-1]
        body = dst[..., :r]
        torch.sub(src, centre, out=body)
        sq = body.pow(2).sum(-1).mul_(self.gamma)
        dst[..., r + int(right)] = sq
        dst[..., r + 1 - int(right)] = 1
        if not right:
            body.mul_(-2 * self.gamma)
        return sq.mul_(ROUNDING_FLOOR * torch.finfo(src.dtype).eps) if self.floor else None


class AngleForm:
    """E = cos θ = ⟨û, v̂⟩ from one GEMM on unit vectors; auxiliary values are the norms ‖u‖, ‖v‖."""

    extra_columns = 0

    def context(self, T2: torch.Tensor):
        return None

    def write(self, src: torch.Tensor, centre, dst: torch.Tensor, right: bool):
        norms, unit = unit_rows(src)
        dst[..., : src.shape[-1]] = unit
        return norms


# ---------------------------------------------------------------------------------------------- kernels
class DistanceKernel:
    """Shared parts of the translation-invariant kernels κ = φ(‖u − v‖): centred patches,
    Q from inner products and squared norms, S = −Q."""

    uses_sigma = True
    translation_invariant = True

    def gradient_weights(self, U: torch.Tensor, V: torch.Tensor, sigma: float):
        """(U − c, V − c, Q, None) with Q (p, n, m) = −φ'(‖u − v‖)/‖u − v‖ (S = −Q)."""
        centre = V.mean(dim=1, keepdim=True)
        U, V = U - centre, V - centre
        inner = torch.bmm(U, V.transpose(1, 2))
        weights = compiled_fn(self.gradient_q) if use_compiled(inner.numel()) else self.gradient_q
        tol = ZERO_RTOL.get(U.dtype, 1e-3)
        return U, V, weights(inner, U.pow(2).sum(-1), V.pow(2).sum(-1), sigma, tol), None


class Laplace(DistanceKernel):
    r"""κ = exp(−‖u − v‖/σ);  ∇_u κ = −κ/(σ‖u − v‖)·(u − v), so Q = κ/(σ‖u − v‖) (0 at distance 0)."""

    name = "laplace"

    @staticmethod
    def pairs(U, V, sigma):
        return torch.exp(-(U - V).pow(2).sum(-1).sqrt() / sigma)

    @staticmethod
    def gemm_form(sigma):
        return DistanceForm(1.0 / sigma**2, floor=True)

    @staticmethod
    def gemm_map(E, row_aux, col_aux):
        E = torch.where(E <= row_aux.unsqueeze(2) + col_aux.unsqueeze(1), 0.0, E)
        return torch.exp(-torch.sqrt(torch.clamp_min(E, 0)))

    @staticmethod
    def gradient_q(inner, un, vn, sigma: float, tol: float):
        sqdist = torch.clamp_min(un.unsqueeze(2) + vn.unsqueeze(1) - 2 * inner, 0)
        dist = torch.sqrt(sqdist)
        nonzero = dist > tol * torch.sqrt(un.unsqueeze(2) + vn.unsqueeze(1))
        return torch.where(nonzero, torch.exp(-dist / sigma) / (sigma * torch.clamp_min(dist, 1e-30)), 0.0)

    @staticmethod
    def keops_kernel(T1, T2, sigma):
        from pykeops.torch import LazyTensor

        x, z = LazyTensor((T1 / sigma)[:, :, None, :]), LazyTensor((T2 / sigma)[:, None, :, :])
        return (-x.sqdist(z).sqrt()).exp()

    @staticmethod
    def triton_param(sigma):
        return 1.0 / sigma

    @_triton_jit
    def triton_map(dot, nu, nv, param):
        sq = nu + nv - 2.0 * dot
        sq = tl.where(sq <= _TRITON_ROUNDING_FLOOR * (nu + nv), 0.0, sq)
        return tl.exp(-tl.sqrt(sq) * param)


class Gaussian(DistanceKernel):
    r"""κ = exp(−‖u − v‖²/(2σ²));  ∇_u κ = −κ/σ²·(u − v), so Q = κ/σ²."""

    name = "gaussian"

    @staticmethod
    def pairs(U, V, sigma):
        return torch.exp(-(U - V).pow(2).sum(-1) / (2 * sigma**2))

    @staticmethod
    def gemm_form(sigma):
        return DistanceForm(-0.5 / sigma**2, floor=False)

    @staticmethod
    def gemm_map(E, row_aux, col_aux):
        return torch.exp(torch.clamp_max(E, 0))

    @staticmethod
    def gradient_q(inner, un, vn, sigma: float, tol: float):
        sqdist = torch.clamp_min(un.unsqueeze(2) + vn.unsqueeze(1) - 2 * inner, 0)
        return torch.exp(sqdist / (-2 * sigma**2)) / sigma**2

    @staticmethod
    def keops_kernel(T1, T2, sigma):
        from pykeops.torch import LazyTensor

        scale = sigma * math.sqrt(2.0)
        x, z = LazyTensor((T1 / scale)[:, :, None, :]), LazyTensor((T2 / scale)[:, None, :, :])
        return (-x.sqdist(z)).exp()

    @staticmethod
    def triton_param(sigma):
        return 0.5 / sigma**2

    @_triton_jit
    def triton_map(dot, nu, nv, param):
        return tl.exp(-tl.maximum(nu + nv - 2.0 * dot, 0.0) * param)


class NTK:
    r"""One-hidden-layer ReLU NTK: with a = ‖u‖, b = ‖v‖, c = cos θ, s = sin θ,

    κ = ⟨u,v⟩(π − θ)/π + ab(s + (π − θ)c)/π = ab·g(c) (0 if a or b is 0), no bandwidth.

    ∇_u κ = (κ/a) û + (b/π)(2(π − θ) + c/s)(v̂ − c û): Q = (b/π)(2(π − θ) + c/s), S = κ/a − Q c,
    ũ = û, Ṽ = V̂; the c/s term is 0 where s = 0 (the symmetric subgradient of the kink) and the
    gradient is 0 for a zero patch."""

    name = "ntk"
    uses_sigma = False
    translation_invariant = False

    @staticmethod
    def pairs(U, V, sigma):
        a, Uh = unit_rows(U)
        b, Vh = unit_rows(V)
        return a * b * ntk_profile((Uh * Vh).sum(-1))

    @staticmethod
    def gemm_form(sigma):
        return AngleForm()

    @staticmethod
    def gemm_map(E, row_aux, col_aux):
        return ntk_profile(E) * row_aux.unsqueeze(2) * col_aux.unsqueeze(1)

    @staticmethod
    def gradient_weights(U, V, sigma):
        tol = ZERO_RTOL.get(U.dtype, 1e-3)
        a, Uh = unit_rows(U)
        b, Vh = unit_rows(V)
        c = torch.bmm(Uh, Vh.transpose(1, 2)).clamp_(-1.0, 1.0)
        s = (1 - c * c).clamp_min_(0).sqrt_()
        theta = torch.acos(c)
        kappa = a.unsqueeze(2) * b.unsqueeze(1) * ntk_profile(c)
        ratio = torch.where(s > tol, c / s.clamp_min(tol), torch.zeros_like(c))
        Q = b.unsqueeze(1) / math.pi * (2 * (math.pi - theta) + ratio)
        inv_a = torch.where(a > 0, 1 / a.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))
        S = kappa * inv_a.unsqueeze(2) - Q * c
        return Uh, Vh, Q * (a > 0).unsqueeze(2), S

    @staticmethod
    def keops_kernel(T1, T2, sigma):
        from pykeops.torch import LazyTensor

        a, U = unit_rows(T1)
        b, V = unit_rows(T2)
        c = LazyTensor(U[:, :, None, :]) | LazyTensor(V[:, None, :, :])
        return LazyTensor(a[:, :, None, None]) * LazyTensor(b[:, None, :, None]) * ntk_profile(c)

    @staticmethod
    def triton_param(sigma):
        return 0.0

    @_triton_jit
    def triton_map(dot, nu, nv, param):
        ab = tl.sqrt(nu) * tl.sqrt(nv)
        c = tl.where(ab > 0, dot / tl.where(ab > 0, ab, 1.0), 0.0)
        c = tl.minimum(tl.maximum(c, -1.0), 1.0)
        s = tl.sqrt(tl.maximum(1.0 - c * c, 0.0))
        theta = triton_acos(c)
        return ab * (2.0 * c * (3.141592653589793 - theta) + s) / 3.141592653589793


BASE_KERNELS = {k.name: k() for k in (Laplace, Gaussian, NTK)}


def check_base_kernel(name) -> str:
    """The base kernel's name, or ValueError listing the registered ones."""
    if not isinstance(name, str) or name not in BASE_KERNELS:
        raise ValueError(f"Unknown base kernel {name!r}; choose one of {tuple(BASE_KERNELS)}")
    return name


def base_kernel(name: str):
    """The base kernel object registered under ``name`` (ValueError naming the choices)."""
    return BASE_KERNELS[check_base_kernel(name)]
