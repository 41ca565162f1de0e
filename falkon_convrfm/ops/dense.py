r"""Cache-tiled torch evaluation of aligned-patch convolutional kernels.

All functions take patches already transformed by the metric factor, T = Lᵀx_p, laid out as
(P, n, r), and location weights ω (P,) summing to 1:

.. math::  K(x, z) = \sum_p ω_p κ(T_{p,x}, T_{p,z})

Distance kernels get their squared distances from one batched GEMM on augmented factors,
``[-2γu, γ‖u‖², 1]·[v, 1, γ‖v‖²] = γ‖u - v‖²`` (patches centred per location first, which
leaves distances unchanged and limits cancellation), followed by in-place element-wise maps
and a GEMV over locations into ~128×128 output tiles that stay in cache.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import warnings

import torch

BASE_KERNELS = ("laplace", "gaussian", "ntk")

# Output tile (rows × cols) and elements per location chunk; tuned on a 2-core AVX2 CPU.
TILE_ROWS = 128
TILE_COLS = 128
TILE_ELEMENTS = 2**19
# Blocks with at least this many patch evaluations use the torch.compile'd tile function
# (map and reduction fused); smaller ones run eagerly. FALKON_CONVRFM_COMPILE=0 disables it.
COMPILE_MIN_EVALS = 2**24
# Squared distances below ROUNDING_FLOOR·eps·(‖u‖² + ‖v‖²) are GEMM rounding (laplace only).
ROUNDING_FLOOR = 16
COMPILE_ENABLED = os.environ.get("FALKON_CONVRFM_COMPILE", "1") != "0"
TORCH_COMPILE_OK = hasattr(torch, "compile") and sys.platform.startswith("linux")


def ntk_profile(c: torch.Tensor) -> torch.Tensor:
    """g(c) = (2c(π − arccos c) + √(1 − c²))/π, so that κ_ntk(u, v) = ‖u‖‖v‖·g(cos θ)."""
    c = c.clamp(-1.0, 1.0)
    return (2 * c * (math.pi - torch.acos(c)) + (1 - c * c).clamp_min(0).sqrt()) / math.pi


def _unit_rows(T: torch.Tensor):
    """Norms ‖T[..., :]‖ and the rows divided by them (zero rows stay zero)."""
    norms = torch.linalg.vector_norm(T, dim=-1)
    unit = T / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
    return norms, unit


def patch_kernel_pairs(U: torch.Tensor, V: torch.Tensor, kind: str, sigma: float) -> torch.Tensor:
    """κ(U[..., :], V[..., :]) for paired patch vectors (same shape), by the direct formulas.

    laplace: exp(−‖u − v‖/σ); gaussian: exp(−‖u − v‖²/(2σ²));
    ntk: ⟨u,v⟩(π − θ)/π + ‖u‖‖v‖(sin θ + (π − θ)cos θ)/π, 0 when u or v is 0.
    """
    if kind == "ntk":
        a, Uh = _unit_rows(U)
        b, Vh = _unit_rows(V)
        return a * b * ntk_profile((Uh * Vh).sum(-1))
    sqdist = (U - V).pow(2).sum(-1)
    if kind == "laplace":
        return torch.exp(-sqdist.sqrt() / sigma)
    return torch.exp(-sqdist / (2 * sigma**2))


def median_patch_distance(T: torch.Tensor) -> float:
    """Median distance between aligned patches of different rows, ‖T[p, i] − T[p, j]‖ for
    consecutive rows i, j = i + 1 at every location (the bandwidth heuristic)."""
    if T.shape[1] < 2:
        raise ValueError("the median heuristic needs at least two rows")
    return torch.linalg.vector_norm(T[:, 1:] - T[:, :-1], dim=-1).median().item()


def conv_kernel_diag(T1: torch.Tensor, T2: torch.Tensor, kind: str, sigma: float, weights: torch.Tensor):
    """diag K(X1, X2): Σ_p ω_p κ(T1[p, i], T2[p, i]), shape (n,)."""
    return weights @ patch_kernel_pairs(T1, T2, kind, sigma)


def _tiled_factor(T, centre, scale, norm_coef, tile: int, chunk: int, transpose: bool):
    """GEMM operand for every output tile, zero-padded: (n_tiles, P_pad, tile, k) holding
    ``[scale·(u − c), norm_coef·‖u − c‖², 1]`` (the last two swapped when ``transpose``, which
    also lays each tile out as (P_pad, k, tile)). ``norm_coef=None``: just ``scale·u``.

    Every tile's slice is contiguous with the same strides (one compiled shape), and the factor
    is written in one pass per tile, straight from T.
    """
    P, n, r = T.shape
    extra = 0 if norm_coef is None else 2
    k = -(-(r + extra) // 8) * 8
    P_pad, n_tiles = -(-P // chunk) * chunk, -(-n // tile)
    shape = (n_tiles, P_pad, k, tile) if transpose else (n_tiles, P_pad, tile, k)
    out = T.new_zeros(shape)
    for t in range(n_tiles):
        src = T[:, t * tile : (t + 1) * tile]
        dst = out[t, :P].transpose(1, 2) if transpose else out[t, :P]
        dst = dst[:, : src.shape[1]]
        body = dst[..., :r]
        torch.sub(src, centre, out=body) if centre is not None else body.copy_(src)
        if norm_coef is not None:
            sq = body.pow(2).sum(-1)
            dst[..., r + int(transpose)] = sq.mul_(norm_coef)
            dst[..., r + 1 - int(transpose)] = 1
        if scale != 1:
            body.mul_(scale)
    return out


def _tiled_scale(S: torch.Tensor, tile: int, chunk: int) -> torch.Tensor:
    """(P, n) per-patch scales → zero-padded (n_tiles, P_pad, tile), matching ``_tiled_factor``."""
    P, n = S.shape
    P_pad, n_tiles = -(-P // chunk) * chunk, -(-n // tile)
    out = S.new_zeros(P_pad, n_tiles * tile)
    out[:P, :n] = S
    return out.view(P_pad, n_tiles, tile).transpose(0, 1).contiguous()


def _balanced(n: int, tile: int) -> int:
    """The smallest tile size ≤ ``tile`` that covers n in as few tiles as ``tile`` does."""
    return -(-n // -(-n // tile))


def _pad_locations(w: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(-w.shape[0] % chunk, *w.shape[1:])])


def _kernel_map(E: torch.Tensor, kind: str) -> torch.Tensor:
    """GEMM output → κ: E is γ‖u−v‖² for distance kernels, cos θ for ntk."""
    if kind == "laplace":
        return torch.exp(-torch.sqrt(torch.clamp_min(E, 0)))
    if kind == "gaussian":
        return torch.exp(torch.clamp_max(E, 0))
    return ntk_profile(E)


def tile_kernel_sum(left, right, row_aux, col_aux, weights, kind: str) -> torch.Tensor:
    """One output tile: Σ_p w_p κ((left_p right_p)_ij), a GEMM, a map and a reduction.

    ``row_aux``/``col_aux`` (per location and row/column): for ntk the norms ω_p‖u‖ and ‖v‖
    that scale κ; for laplace the floors ε·γ‖u‖², ε·γ‖v‖² below which a squared distance is
    GEMM rounding and counts as 0 (so identical patches give κ = 1 exactly instead of an
    O(√ε) error through the square root); unused (None) for gaussian.
    Written as one pure expression so that ``torch.compile`` fuses map and reduction into a
    single pass over the GEMM output while it is still in cache.
    """
    E = torch.bmm(left, right)
    if kind == "laplace":
        E = torch.where(E <= row_aux.unsqueeze(2) + col_aux.unsqueeze(1), 0.0, E)
    K = _kernel_map(E, kind)
    if kind == "ntk":
        K = K * row_aux.unsqueeze(2) * col_aux.unsqueeze(1)
    return torch.einsum("p,pij->ij", weights, K)


_COMPILE_FAILED = []


@functools.lru_cache(maxsize=None)
def compiled_fn(fn):
    """``fn`` through ``torch.compile`` (static shapes), falling back to eager ``fn`` for good,
    with one warning, if compilation does not work here (no C++ toolchain, ...)."""
    fast = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if _COMPILE_FAILED or not COMPILE_ENABLED or not TORCH_COMPILE_OK:
            return fn(*args, **kwargs)
        try:
            return fast(*args, **kwargs)
        except Exception as exc:
            _COMPILE_FAILED.append(exc)
            warnings.warn(f"torch.compile failed ({exc!r:.200}); using eager torch", stacklevel=2)
            return fn(*args, **kwargs)

    return run


def _use_compiled(n: int, m: int, P: int) -> bool:
    return COMPILE_ENABLED and n * m * P >= COMPILE_MIN_EVALS and TORCH_COMPILE_OK


def conv_kernel_matrix(
    T1: torch.Tensor,
    T2: torch.Tensor,
    kind: str,
    sigma: float,
    weights: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """K (n, m) with K_ij = Σ_p ω_p κ(T1[p, i], T2[p, j]), computed tile by tile into ``out``.

    Operands are laid out tile-major and zero-padded (padded locations carry weight 0, padded
    rows and columns are cut off), so large blocks run the compiled tile function on one fixed
    shape and compile once per kernel and dtype.
    """
    P, n, _ = T1.shape
    m = T2.shape[1]
    if out is None:
        out = T1.new_empty(n, m)
    use_compiled = _use_compiled(n, m, P)
    rows, cols = (TILE_ROWS, TILE_COLS) if use_compiled else (_balanced(n, TILE_ROWS), _balanced(m, TILE_COLS))
    chunk = max(1, TILE_ELEMENTS // (rows * cols))
    chunk = chunk if use_compiled else min(chunk, P)
    tile_fn = compiled_fn(tile_kernel_sum) if use_compiled else tile_kernel_sum
    row_aux = col_aux = None
    if kind == "ntk":
        a, U = _unit_rows(T1)
        b, V = _unit_rows(T2)
        left = _tiled_factor(U, None, 1, None, rows, chunk, False)
        right = _tiled_factor(V, None, 1, None, cols, chunk, True)
        row_aux = _tiled_scale(a * weights[:, None], rows, chunk)  # ω_p ‖u‖
        col_aux = _tiled_scale(b, cols, chunk)
        red_w = _pad_locations(torch.ones_like(weights), chunk)
    else:  # γ‖u − v‖² = [−2γu, γ‖u‖², 1]·[v, 1, γ‖v‖²], patches centred per location
        gamma = 1.0 / sigma**2 if kind == "laplace" else -0.5 / sigma**2
        centre = T2.mean(dim=1, keepdim=True)
        left = _tiled_factor(T1, centre, -2 * gamma, gamma, rows, chunk, False)
        right = _tiled_factor(T2, centre, 1, gamma, cols, chunk, True)
        red_w = _pad_locations(weights, chunk)
        if kind == "laplace":  # floors from the factors' norm entries γ‖u − c‖², γ‖v − c‖²
            floor = ROUNDING_FLOOR * torch.finfo(T1.dtype).eps
            r = T1.shape[2]
            row_aux = (left[..., r] * floor).contiguous()
            col_aux = (right[:, :, r + 1] * floor).contiguous()
    for ti in range(left.shape[0]):
        i0, i1 = ti * rows, min(n, (ti + 1) * rows)
        for tj in range(right.shape[0]):
            j0, j1 = tj * cols, min(m, (tj + 1) * cols)
            acc = None
            for p0 in range(0, red_w.shape[0], chunk):
                locs = slice(p0, p0 + chunk)
                part = tile_fn(
                    left[ti, locs],
                    right[tj, locs],
                    None if row_aux is None else row_aux[ti, locs],
                    None if col_aux is None else col_aux[tj, locs],
                    red_w[locs],
                    kind,
                )
                acc = part if acc is None else acc.add_(part)
            out[i0:i1, j0:j1] = acc[: i1 - i0, : j1 - j0]
    return out
