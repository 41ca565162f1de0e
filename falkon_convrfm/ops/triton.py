r"""Fused Triton backend for aligned-patch convolutional kernels (the FlashAttention pattern).

Over transformed patches T1 (P, n, r), T2 (P, m, r) and location weights ω (P,),

.. math::  K_{ij} = \sum_p ω_p\, κ(T1_{p,i},\ T2_{p,j}),

evaluated by one kernel launch: each program owns a BM × BN output tile, loops over the P
locations, loads the two r-dim patch tiles (zero-padded to R, a power of two ≥ 16, or a
multiple of 64 above 64), forms the inner products with ``tl.dot`` (fp32 accumulation), applies
the base kernel's map κ = MAP(⟨u, v⟩, ‖u‖², ‖v‖², param) and accumulates ω_p κ in registers.
``triton_conv_matrix`` stores the tile; ``triton_conv_mmv`` multiplies each finished tile by
the matching rows of v (``tl.dot`` again) and accumulates K v in a BM × BT register tile, so K
is never written to memory. For translation-invariant base kernels the patches are centred per
location (the mean of T2[p] subtracted from both) before the norms, which limits the
cancellation in ‖u‖² + ‖v‖² − 2⟨u, v⟩.

Tile shapes, warps and pipeline stages come from a small ``triton.autotune`` keyed on the
problem's size class (n, m, P rounded up to powers of two and capped at the tuning problem),
R, the map and the precision; problems larger than the tuning problem are tuned once on a slice
of it (``TUNE_ROWS`` × ``TUNE_COLS`` × ``TUNE_LOCATIONS``), so tuning costs milliseconds, not
several full-size runs per config.

Runs compiled on CUDA tensors; on CPU tensors only in Triton's interpreter
(``TRITON_INTERPRET=1``, or ``triton.knobs.runtime.interpret = True``), which this module reads
at call time, not at import, so import order does not matter (the map is converted to the
running mode, see :func:`_in_mode`). float32 only: float64 belongs to the torch backend.
"""
from __future__ import annotations

import functools
import types

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
except ImportError as exc:  # pragma: no cover - depends on the install
    triton = tl = InterpretedFunction = JITFunction = None
    _IMPORT_ERROR = f"triton is not importable ({exc})"
else:
    _IMPORT_ERROR = None

PRECISIONS = ("ieee", "tf32x3", "tf32")
MIN_WIDTH = 16  # tl.dot needs every dimension ≥ 16
CHUNK = 64  # inner-product chunk: ranks above it are padded to a multiple of it
MAX_VALUES = 64  # columns of v per mmv program; more go to the third grid axis
TUNE_ROWS, TUNE_COLS, TUNE_LOCATIONS = 4096, 2048, 128  # the autotune problem (upper bounds)
INTERPRETER_TILE = {"BM": 32, "BN": 16}  # one small tile: autotuning in the interpreter is pointless

# (BM, BN, warps, stages): the fp32 FMA inner product wants large square tiles, the TF32 ones
# narrower; a tile/stage choice that spills registers runs 30× slower, hence measured, not guessed.
_MATRIX_TILES = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3)]
_MMV_TILES = [(128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2)]
_TUNING_KEY = ["key_n", "key_m", "key_p", "R", "BT", "MAP", "PRECISION"]


def _conv_kernel(
    A, B, NA, NB, W, V, OUT,
    n, m, P, t,
    s_ap, s_bp, s_nap, s_nbp,
    s_vm, s_vt, s_on, s_om,
    param,
    key_n, key_m, key_p,
    MAP: tl.constexpr, MMV: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """Program (i, s, c): rows i·BM.., centre tiles s, s + S, ... (S = grid size on axis 1).

    A (P, n, R), B (P, m, R): padded patches, location stride s_ap / s_bp, row stride R; NA, NB:
    their squared norms (P, n), (P, m). Matrix mode (MMV false): one centre tile per program
    (S = number of centre tiles), K tile stored to OUT with strides (s_on, s_om). MMV mode: the
    K tiles times v[:, c·BT..] (strides s_vm, s_vt) are summed and added atomically to OUT (n, t),
    contiguous and zeroed (programs with different s share rows). key_*: autotune keys only.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < n
    kk = tl.arange(0, BK)
    a_offs = rows[:, None] * R + kk[None, :]
    if MMV:
        vcols = tl.program_id(2) * BT + tl.arange(0, BT)
        vmask = vcols < t
        result = tl.zeros((BM, BT), dtype=tl.float32)
    for ct in range(tl.program_id(1), (m + BN - 1) // BN, tl.num_programs(1)):
        cols = ct * BN + tl.arange(0, BN)
        cmask = cols < m
        b_offs = cols[None, :] * R + kk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        a_loc, b_loc, na_loc, nb_loc = A, B, NA, NB  # location p's slices: scalar 64-bit pointers
        for p in range(P):  # a pooling window would loop over (p, p + δ, ω) table entries here
            dot = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in tl.static_range(0, R, BK):
                a = tl.load(a_loc + k0 + a_offs, mask=rmask[:, None], other=0.0)
                b = tl.load(b_loc + k0 + b_offs, mask=cmask[None, :], other=0.0)
                dot = tl.dot(a, b, dot, input_precision=PRECISION)
            nu = tl.load(na_loc + rows, mask=rmask, other=0.0)
            nv = tl.load(nb_loc + cols, mask=cmask, other=0.0)
            acc += tl.load(W + p) * MAP(dot, nu[:, None], nv[None, :], param)
            a_loc += s_ap
            b_loc += s_bp
            na_loc += s_nap
            nb_loc += s_nbp
        if MMV:  # centres beyond m meet zero rows of v
            v = tl.load(V + cols[:, None] * s_vm + vcols[None, :] * s_vt, mask=cmask[:, None] & vmask[None, :], other=0.0)
            result = tl.dot(acc, v, result, input_precision=PRECISION)
        else:
            out_offs = rows.to(tl.int64)[:, None] * s_on + cols.to(tl.int64)[None, :] * s_om
            tl.store(OUT + out_offs, acc, mask=rmask[:, None] & cmask[None, :])
    if MMV:
        out_offs = rows.to(tl.int64)[:, None] * t + vcols[None, :]
        tl.atomic_add(OUT + out_offs, result, mask=rmask[:, None] & vmask[None, :])


# ---------------------------------------------------------------------------------------------- modes
def _interpreting() -> bool:
    """Triton's interpreter flag, read now (``TRITON_INTERPRET`` or the runtime knob)."""
    return bool(triton.knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def _in_mode(fn, interpret: bool):
    """A Triton device function as the kind that runs in this mode: an ``InterpretedFunction``
    in the interpreter, a ``JITFunction`` when compiling.

    ``@triton.jit`` fixes the kind at decoration time from the interpreter flag, so maps defined
    at import (before a test switched the interpreter on, or after) can be of the wrong kind.
    Such a function is rebuilt from its Python source with a copy of its globals in which the
    Triton functions it calls are converted too (nothing shared is modified).
    """
    kind = InterpretedFunction if interpret else JITFunction
    if isinstance(fn, kind):
        return fn
    if not isinstance(fn, (InterpretedFunction, JITFunction)):
        raise TypeError(f"expected a @triton.jit function, got {type(fn).__name__}")
    py = fn.fn
    helpers = {
        name: _in_mode(value, interpret)
        for name, value in py.__globals__.items()
        if isinstance(value, (InterpretedFunction, JITFunction)) and name in py.__code__.co_names
    }
    if helpers:
        py = types.FunctionType(py.__code__, {**py.__globals__, **helpers}, py.__name__, py.__defaults__, py.__closure__)
    return kind(py)


def _configs(tiles):
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


def _bench(kernel_call, quantiles):
    """Autotune timing: one warm-up call (it compiles), then the median of three timed calls."""
    kernel_call()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(3)]
    for start, end in events:
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return [times[1], times[0], times[2]]


@functools.lru_cache(maxsize=None)
def _launcher(mmv: bool, interpret: bool):
    """The kernel for this mode: one interpreted tile size, or the autotuned compiled kernel."""
    if interpret:
        return InterpretedFunction(_conv_kernel)
    return triton.autotune(
        configs=_configs(_MMV_TILES if mmv else _MATRIX_TILES),
        key=_TUNING_KEY,
        reset_to_zero=["OUT"] if mmv else None,
        do_bench=_bench,
    )(JITFunction(_conv_kernel))


_TUNED = set()


# ---------------------------------------------------------------------------------------------- helpers
def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def padded_rank(r: int) -> int:
    """R: the rank padded for ``tl.dot``, a power of two ≥ 16 up to CHUNK, then multiples of CHUNK."""
    return max(MIN_WIDTH, _next_pow2(r)) if r <= CHUNK else -(-r // CHUNK) * CHUNK


def _value_width(t: int) -> int:
    """BT: columns of v per program, a power of two in [16, MAX_VALUES]."""
    return min(MAX_VALUES, max(MIN_WIDTH, _next_pow2(t)))


def _check_inputs(T1, T2, base, weights, precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, T in (("T1", T1), ("T2", T2), ("weights", weights)):
        if not isinstance(T, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(T).__name__}")
        if T.dtype != torch.float32:
            raise TypeError(f"the Triton backend is float32 only; {name} is {T.dtype}")
        if T.device != T1.device:
            raise ValueError(f"device mismatch: T1 is on {T1.device} but {name} is on {T.device}")
    if T1.dim() != 3 or T2.dim() != 3 or T1.shape[0] != T2.shape[0] or T1.shape[2] != T2.shape[2]:
        raise ValueError(f"T1 and T2 must be (P, n, r) and (P, m, r), got {tuple(T1.shape)} and {tuple(T2.shape)}")
    if T1.shape[0] == 0 or T1.shape[2] == 0:
        raise ValueError(f"T1 and T2 need P ≥ 1 locations and rank r ≥ 1, got {tuple(T1.shape)}")
    if weights.shape != (T1.shape[0],):
        raise ValueError(f"weights must have shape ({T1.shape[0]},), got {tuple(weights.shape)}")
    if not hasattr(base, "triton_map"):
        raise TypeError(f"base kernel {base!r} has no triton_map")
    interpret = _interpreting()
    if not interpret and T1.device.type != "cuda":
        raise ValueError("the Triton backend needs CUDA tensors (TRITON_INTERPRET=1 runs its CPU interpreter)")
    return interpret


def _padded(T: torch.Tensor, centre, R: int) -> torch.Tensor:
    """(P, n, R) contiguous: T − centre (or T) in the first r columns, zeros after."""
    out = T.new_zeros(T.shape[0], T.shape[1], R)
    body = out[..., : T.shape[2]]
    torch.sub(T, centre, out=body) if centre is not None else body.copy_(T)
    return out


def _operands(T1, T2, base, R: int):
    """Padded (centred for translation-invariant kernels) patches and their squared norms;
    shared when T1 is T2 (a symmetric block)."""
    centre = T2.mean(dim=1, keepdim=True) if base.translation_invariant else None
    A = _padded(T1, centre, R)
    NA = torch.linalg.vector_norm(A, dim=-1).square_()
    if T2 is T1:
        return A, A, NA, NA
    B = _padded(T2, centre, R)
    return A, B, NA, torch.linalg.vector_norm(B, dim=-1).square_()


def _mmv_splits(row_tiles: int, col_tiles: int, device: torch.device, interpret: bool) -> int:
    """Programs per row tile in mmv (grid axis 1): enough to give every multiprocessor two
    programs when there are few row tiles (their partial sums meet in ``tl.atomic_add``),
    one when there are many (then the sum is deterministic). The interpreter uses 2 (when
    there are two centre tiles) so that tests cover the atomic path."""
    if interpret:
        return min(2, col_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(col_tiles, -(-2 * sms // row_tiles)))


def _launch(mmv, A, B, NA, NB, W, V, OUT, sizes, out_strides, param, MAP, R, BT, precision, interpret):
    """One launch over (n, m, P, t) = ``sizes`` (compiled: tuned first on a slice when the
    problem is larger than the tuning problem)."""
    n, m, P, t = sizes
    kernel = _launcher(mmv, interpret)
    MAP = _in_mode(MAP, interpret)
    fixed = dict(MAP=MAP, MMV=mmv, R=R, BK=min(R, CHUNK), BT=BT, PRECISION=precision)
    keys = (min(_next_pow2(n), TUNE_ROWS), min(_next_pow2(m), TUNE_COLS), min(_next_pow2(P), TUNE_LOCATIONS))

    def run(n, m, P, out, out_strides, tile):
        def grid(meta):
            row_tiles, col_tiles = triton.cdiv(n, meta["BM"]), triton.cdiv(m, meta["BN"])
            if mmv:
                return row_tiles, _mmv_splits(row_tiles, col_tiles, A.device, interpret), triton.cdiv(t, BT)
            return row_tiles, col_tiles, 1

        kernel[grid](
            A, B, NA, NB, W, V, out, n, m, P, t,
            A.stride(0), B.stride(0), NA.stride(0), NB.stride(0),
            V.stride(0), V.stride(1), *out_strides, param, *keys, **fixed, **tile,
        )

    if interpret:
        return run(n, m, P, OUT, out_strides, INTERPRETER_TILE)
    sub = (min(n, TUNE_ROWS), min(m, TUNE_COLS), min(P, TUNE_LOCATIONS))
    tuning_key = (mmv, keys, R, BT, MAP, precision)
    if sub != (n, m, P) and tuning_key not in _TUNED:
        scratch = OUT.new_zeros(sub[0], t if mmv else sub[1])
        run(*sub, scratch, (scratch.stride(0), scratch.stride(1)), {})
    _TUNED.add(tuning_key)
    run(n, m, P, OUT, out_strides, {})


# ---------------------------------------------------------------------------------------------- API
def triton_available() -> tuple:
    """(usable, reason): Triton imports and there is a CUDA device, or its interpreter is on."""
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if _interpreting():
        return True, f"triton {triton.__version__} (CPU interpreter, TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, f"triton {triton.__version__}, but no CUDA device"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def triton_memory(n: int, m: int, P: int, r: int, t: int = 0) -> dict:
    """Elements the Triton functions allocate, in Falkon's ``extra_mem`` form: per row the padded
    patches (P, R) and their norms (P,) (+ the t-column K v result for mmv), the same per centre,
    and a constant for the location means and the autotune scratch block (first call per size
    class only). T1/T2 themselves are the caller's."""
    R = padded_rank(r)
    return {"n": P * (R + 1) + t, "m": P * (R + 1), "0": P * (R + 1) + TUNE_ROWS * max(TUNE_COLS, t)}


def triton_conv_matrix(T1, T2, base, sigma, weights, out=None, precision="ieee"):
    r"""K (n, m), :math:`K_{ij} = \sum_p ω_p κ(T1_{p,i}, T2_{p,j})`, by the fused kernel.

    Parameters
    ----------
    T1, T2 : (P, n, r), (P, m, r) float32 tensors (any strides) of transformed patches.
    base : base-kernel object with ``triton_map``, ``triton_param(sigma)``, ``translation_invariant``.
    sigma : bandwidth, passed to ``base.triton_param``.
    weights : (P,) float32 location weights ω (used as given).
    out : optional (n, m) float32 tensor to fill (any strides).
    precision : ``"ieee"`` (exact fp32 inner products), ``"tf32x3"`` (split TF32, near fp32) or
        ``"tf32"`` (fast, ~1e-4 relative).

    Returns
    -------
    out : the filled (n, m) tensor.
    """
    interpret = _check_inputs(T1, T2, base, weights, precision)
    P, n, r = T1.shape
    m = T2.shape[1]
    if out is None:
        out = T1.new_empty(n, m)
    elif out.shape != (n, m) or out.dtype != torch.float32 or out.device != T1.device:
        raise ValueError(f"out must be a float32 ({n}, {m}) tensor on {T1.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if n == 0 or m == 0:
        return out
    R = padded_rank(r)
    A, B, NA, NB = _operands(T1, T2, base, R)
    _launch(False, A, B, NA, NB, weights.contiguous(), out, out, (n, m, P, 0), (out.stride(0), out.stride(1)),
            float(base.triton_param(sigma)), base.triton_map, R, MIN_WIDTH, precision, interpret)
    return out


def triton_conv_mmv(T1, T2, v, base, sigma, weights, out=None, precision="ieee"):
    r"""K v (n, t) for K as in :func:`triton_conv_matrix`, without materialising K.

    Each program accumulates ``K_tile @ v_tile`` over centre tiles in registers; with few row
    tiles the centre tiles of a row tile are split over several programs whose partial sums
    are added atomically (then the float32 summation order varies from run to run).

    Parameters
    ----------
    T1, T2, base, sigma, weights, precision : as in :func:`triton_conv_matrix`.
    v : (m, t) float32 tensor (any strides).
    out : optional (n, t) float32 tensor to fill.
    """
    interpret = _check_inputs(T1, T2, base, weights, precision)
    P, n, r = T1.shape
    m = T2.shape[1]
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.device != T1.device:
        raise TypeError(f"v must be a float32 tensor on {T1.device}")
    if v.dim() != 2 or v.shape[0] != m:
        raise ValueError(f"v must be ({m}, t), got {tuple(v.shape)}")
    t = v.shape[1]
    if out is not None and (out.shape != (n, t) or out.dtype != torch.float32 or out.device != T1.device):
        raise ValueError(f"out must be a float32 ({n}, {t}) tensor on {T1.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    result = T1.new_zeros(n, t)
    if n and m and t:
        R = padded_rank(r)
        A, B, NA, NB = _operands(T1, T2, base, R)
        _launch(True, A, B, NA, NB, weights.contiguous(), v, result, (n, m, P, t), (t, 1),
                float(base.triton_param(sigma)), base.triton_map, R, _value_width(t), precision, interpret)
    return result if out is None else out.copy_(result)
