r"""Cache-tiled torch evaluation of aligned-patch convolutional kernels (the CPU backend).

All functions take patches already transformed by the metric factor, T = Lᵀx_p, laid out as
(P, n, r), location weights ω (P,) summing to 1 and a base kernel object
(:mod:`falkon_convrfm.base_kernels`):

.. math::  K(x, z) = \sum_p ω_p κ(T_{p,x}, T_{p,z})

The base kernel's GEMM form says what one batched GEMM over locations computes (e.g. γ‖u − v‖² on
augmented operands, or cos θ on unit vectors) and its map turns that into κ; this module only
tiles: operands laid out tile-major, a GEMM, the in-place map and a GEMV over locations into
~128×128 output tiles that stay in cache.
"""
from __future__ import annotations

import functools

import torch

from .._compile import compiled_fn, use_compiled
from .interface import Backend

# Output tile (rows × cols) and elements per location chunk; tuned on a 2-core AVX2 CPU.
TILE_ROWS = 128
TILE_COLS = 128
TILE_ELEMENTS = 2**19
MAX_EXTRA_COLUMNS = 2  # columns a GEMM form appends to the patches, at most (the distance form's)


def dense_memory(num_locations: int, rank: int, outputs: int = 0) -> dict:
    """Elements that one :func:`conv_kernel_matrix` call allocates, in Falkon's ``extra_mem``
    form: per row of either block the transformed patches (P, r) and the padded GEMM operand
    (P, r + extra columns rounded up to 8), plus the tile buffers. Kernel-vector products are
    blocks of the matrix (``outputs`` does not change the temporaries)."""
    per_row = num_locations * (rank + _operand_width(rank, MAX_EXTRA_COLUMNS))
    return {"n": per_row, "m": per_row, "0": 3 * TILE_ELEMENTS}


def _operand_width(rank: int, extra_columns: int) -> int:
    return -(-(rank + extra_columns) // 8) * 8


def conv_kernel_diag(T1: torch.Tensor, T2: torch.Tensor, base, sigma: float, weights: torch.Tensor):
    """diag K(X1, X2): Σ_p ω_p κ(T1[p, i], T2[p, i]), shape (n,)."""
    return weights @ base.pairs(T1, T2, sigma)


def _tiled_operand(T, form, context, tile: int, chunk: int, right: bool):
    """The GEMM operand of every output tile, zero-padded: (n_tiles, P_pad, tile, k) holding the
    form's operand rows (laid out (P_pad, k, tile) per tile for the ``right`` operand), and the
    form's auxiliary values (n_tiles, P_pad, tile) or None.

    Every tile's slice is contiguous with the same strides (one compiled shape), and the operand
    is written in one pass per tile, straight from T.
    """
    P, n, r = T.shape
    k = _operand_width(r, form.extra_columns)
    P_pad, n_tiles = -(-P // chunk) * chunk, -(-n // tile)
    out = T.new_zeros((n_tiles, P_pad, k, tile) if right else (n_tiles, P_pad, tile, k))
    aux = None
    for t in range(n_tiles):
        src = T[:, t * tile : (t + 1) * tile]
        dst = out[t, :P].transpose(1, 2) if right else out[t, :P]
        values = form.write(src, context, dst[:, : src.shape[1]], right)
        if values is not None:
            aux = T.new_zeros(n_tiles, P_pad, tile) if aux is None else aux
            aux[t, :P, : src.shape[1]] = values
    return out, aux


def _balanced(n: int, tile: int) -> int:
    """The smallest tile size ≤ ``tile`` that covers n in as few tiles as ``tile`` does."""
    return -(-n // -(-n // tile))


@functools.lru_cache(maxsize=None)
def tile_function(base):
    """One output tile for ``base``: Σ_p w_p κ((left_p right_p)_ij), a GEMM, the base kernel's map
    and a reduction, written as one pure expression so that ``torch.compile`` fuses map and
    reduction into a single pass over the GEMM output while it is still in cache."""

    def tile_kernel_sum(left, right, row_aux, col_aux, weights):
        K = base.gemm_map(torch.bmm(left, right), row_aux, col_aux)
        return torch.einsum("p,pij->ij", weights, K)

    tile_kernel_sum.__qualname__ = f"tile_kernel_sum[{base.name}]"
    return tile_kernel_sum


def conv_kernel_matrix(
    T1: torch.Tensor,
    T2: torch.Tensor,
    base,
    sigma: float,
    weights: torch.Tensor,
    options=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """K (n, m) with K_ij = Σ_p ω_p κ(T1[p, i], T2[p, j]), computed tile by tile into ``out``
    (``options``: :class:`~falkon_convrfm.ops.interface.BackendOptions`, none applies here).

    Operands are laid out tile-major and zero-padded (padded locations carry weight 0, padded
    rows and columns are cut off), so large blocks run the compiled tile function on one fixed
    shape and compile once per kernel and dtype.
    """
    P, n, _ = T1.shape
    m = T2.shape[1]
    if out is None:
        out = T1.new_empty(n, m)
    compiled = use_compiled(n * m * P)
    rows, cols = (TILE_ROWS, TILE_COLS) if compiled else (_balanced(n, TILE_ROWS), _balanced(m, TILE_COLS))
    chunk = max(1, TILE_ELEMENTS // (rows * cols))
    chunk = chunk if compiled else min(chunk, P)
    tile_fn = compiled_fn(tile_function(base)) if compiled else tile_function(base)
    form = base.gemm_form(sigma)
    context = form.context(T2)
    left, row_aux = _tiled_operand(T1, form, context, rows, chunk, right=False)
    right, col_aux = _tiled_operand(T2, form, context, cols, chunk, right=True)
    red_w = torch.cat([weights, weights.new_zeros(-P % chunk)])
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
                )
                acc = part if acc is None else acc.add_(part)
            out[i0:i1, j0:j1] = acc[: i1 - i0, : j1 - j0]
    return out


# Kernel-vector products: Falkon's (or the stand-in's) blocked products over ``matrix``.
TORCH = Backend("torch", matrix=conv_kernel_matrix, mmv=None, memory=dense_memory)
