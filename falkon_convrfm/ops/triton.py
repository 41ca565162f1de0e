r"""Fused Triton backend for aligned-patch convolutional kernels (the FlashAttention pattern).

Over transformed patches T1 (P, n, r), T2 (P, m, r) and location weights ω (P,),

.. math::  K_{ij} = \sum_p ω_p\, κ(T1_{p,i},\ T2_{p,j}),

evaluated by one kernel launch: each program owns a BM × BN output tile, loops over the P
locations, loads the two r-dim patch tiles (zero-padded to R, a power of two ≥ 16, or a
multiple of 32 above 32), forms the inner products with ``tl.dot`` (fp32 accumulation), applies
the base kernel's map κ = MAP(⟨u, v⟩, ‖u‖², ‖v‖², param) and accumulates ω_p κ in registers, in
blocks of ``LOCATION_BLOCK`` locations (a plain running sum over P = 900 locations drifts by up
to ~1e-5 relative in float32; blocked, ~3e-7). ``triton_conv_matrix`` stores the tile;
``triton_conv_mmv`` multiplies the finished tile by the matching rows of v (``tl.dot`` again) and
adds the (BM, t) product to K v with ``tl.atomic_add``, so K is never written to memory. (A
program that looped over the centre tiles itself, keeping K v in registers, needed far more
registers and spilled.) For translation-invariant base kernels the patches are centred per
location (the mean of T2[p] subtracted from both) before the norms, which limits the
cancellation in ‖u‖² + ‖v‖² − 2⟨u, v⟩.

Tile shapes, warps and pipeline stages come from a small ``triton.autotune`` keyed on the
problem's size class (n, m, P rounded up to powers of two and capped at the tuning problem),
R, the map and the precision; problems larger than the tuning problem are tuned once on a slice
of it (``TUNE_ROWS`` × ``TUNE_COLS`` × ``TUNE_LOCATIONS``), so tuning costs milliseconds, not
several full-size runs per config.

Runs compiled on CUDA tensors, or in Triton's CPU interpreter when ``TRITON_INTERPRET=1`` was set
before triton's first import (Triton fixes the mode of every ``@triton.jit`` function, its own
``tl.zeros`` included, at decoration time; tests set it in a subprocess). float32 only: float64
belongs to the torch backend.
"""
from __future__ import annotations

import functools

import torch

from .interface import Backend, BackendOptions

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError as exc:  # pragma: no cover - depends on the install
    triton = tl = InterpretedFunction = None
    _IMPORT_ERROR = f"triton is not importable ({exc})"
else:
    _IMPORT_ERROR = None

DEFAULT_OPTIONS = BackendOptions()
MIN_WIDTH = 16  # tl.dot needs every dimension ≥ 16
CHUNK = 32  # inner-product chunk: ranks above it are padded to a multiple of it (64 spills registers)
VALUES = 16  # columns of v per tl.dot in mmv, more in turn (wider ones spill registers)
LOCATION_BLOCK = 32  # locations summed apart before joining the tile's total (float32 accuracy)
TUNE_ROWS, TUNE_COLS, TUNE_LOCATIONS = 4096, 2048, 128  # the autotune problem (upper bounds)
INTERPRETER_TILE = {"BM": 32, "BN": 16}  # one small tile: autotuning in the interpreter is pointless

# (BM, BN, warps, stages) per kind of inner product. A choice that spills registers runs up to 30×
# slower, so these were screened by compiling for sm_90 without a GPU (ptxas register counts,
# R = 32, laplace, both modes): none of them spills. With exact fp32 (FMA) inner products 32
# outputs per thread fit only without software pipelining (1 stage); the tensor-core kinds
# (tf32x3, tf32) pipeline. Autotuning picks among the four of the requested precision.
_TILES = {
    "ieee": [(64, 64, 4, 1), (128, 64, 8, 1), (64, 128, 8, 1), (64, 64, 8, 2)],
    "tensor cores": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3)],
}
_TUNING_KEY = ["key_n", "key_m", "key_p", "R", "MAP", "PRECISION"]


def _conv_kernel(
    A, B, NA, NB, W, V, OUT,
    n, m, P, t,
    s_ap, s_bp, s_nap, s_nbp,
    s_vm, s_vt, s_on, s_om,
    param,
    key_n, key_m, key_p,
    MAP: tl.constexpr, MMV: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
    LB: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """Program (i, j): the K tile of rows i·BM.. and centres j·BN.. .

    A (P, n, R), B (P, m, R): padded patches, location strides s_ap / s_bp, row stride R; NA, NB:
    their squared norms (P, n), (P, m), location strides s_nap / s_nbp. Matrix mode (MMV false):
    the tile is stored to OUT with strides (s_on, s_om). MMV mode: tile @ v[j·BN.., :] (v with
    strides s_vm, s_vt; BT columns at a time) is added atomically to OUT (n, t), contiguous and
    zeroed. key_*: autotune keys only.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask, cmask = rows < n, cols < m
    kk = tl.arange(0, BK)
    a_offs = rows[:, None] * R + kk[None, :]
    b_offs = cols[None, :] * R + kk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    a_loc, b_loc, na_loc, nb_loc = A, B, NA, NB  # location p's slices: scalar 64-bit pointers
    for p0 in range(0, P, LB):  # blocks of LB locations: float32 sum error ~(LB + P/LB)·ulp, not P·ulp
        part = tl.zeros((BM, BN), dtype=tl.float32)
        for p in range(p0, tl.minimum(p0 + LB, P)):  # a pooling window: (p, p + δ, ω) table entries
            dot = tl.dot(tl.load(a_loc + a_offs, mask=rmask[:, None], other=0.0),
                         tl.load(b_loc + b_offs, mask=cmask[None, :], other=0.0), input_precision=PRECISION)
            for k0 in range(BK, R, BK):  # ranks above BK: further chunks (a loop, not unrolled)
                a = tl.load(a_loc + k0 + a_offs, mask=rmask[:, None], other=0.0)
                b = tl.load(b_loc + k0 + b_offs, mask=cmask[None, :], other=0.0)
                dot = tl.dot(a, b, dot, input_precision=PRECISION)
            nu = tl.load(na_loc + rows, mask=rmask, other=0.0)
            nv = tl.load(nb_loc + cols, mask=cmask, other=0.0)
            part += tl.load(W + p) * MAP(dot, nu[:, None], nv[None, :], param)
            a_loc += s_ap
            b_loc += s_bp
            na_loc += s_nap
            nb_loc += s_nbp
        acc += part
    if MMV:  # centres beyond m meet zero rows of v
        for c0 in range(0, t, BT):
            vcols = c0 + tl.arange(0, BT)
            vmask = vcols < t
            v = tl.load(V + cols[:, None] * s_vm + vcols[None, :] * s_vt, mask=cmask[:, None] & vmask[None, :],
                        other=0.0)
            prod = tl.dot(acc, v, input_precision=PRECISION)
            out_offs = rows.to(tl.int64)[:, None] * t + vcols[None, :]
            tl.atomic_add(OUT + out_offs, prod, mask=rmask[:, None] & vmask[None, :])
    else:
        out_offs = rows.to(tl.int64)[:, None] * s_on + cols.to(tl.int64)[None, :] * s_om
        tl.store(OUT + out_offs, acc, mask=rmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------------------------------------- launching
# Sizes are not specialised on (value 1, divisibility by 16): that would compile (and tune) the
# kernel again for every such variant; the strides are (alignment of the patch loads).
_SIZES = ["n", "m", "P", "t", "key_n", "key_m", "key_p"]
_kernel = triton.jit(_conv_kernel, do_not_specialize=_SIZES) if triton is not None else None
# Whether Triton runs its interpreter: decided when triton was first imported (TRITON_INTERPRET).
INTERPRETED = triton is not None and isinstance(_kernel, InterpretedFunction)


def _configs():
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
            for tiles in _TILES.values() for bm, bn, w, s in tiles]


def _configs_for(configs, named_args, PRECISION, **kwargs):
    """Autotune's ``early_config_prune``: the tiles screened for this precision."""
    tiles = _TILES["ieee" if PRECISION == "ieee" else "tensor cores"]
    return [c for c in configs if (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) in tiles]


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
def _launcher(mmv: bool):
    """The kernel to launch: as it is in the interpreter (one small tile), else autotuned."""
    if INTERPRETED:
        return _kernel
    return triton.autotune(
        configs=_configs(),
        key=_TUNING_KEY,
        prune_configs_by={"early_config_prune": _configs_for},
        reset_to_zero=["OUT"] if mmv else None,
        do_bench=_bench,
    )(_kernel)


_TUNED = set()  # (mode, size class, R, map, precision) already tuned on a slice


# ---------------------------------------------------------------------------------------------- helpers
def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def padded_rank(r: int) -> int:
    """R: the rank padded for ``tl.dot``, a power of two ≥ 16 up to CHUNK, then multiples of CHUNK."""
    return max(MIN_WIDTH, _next_pow2(r)) if r <= CHUNK else -(-r // CHUNK) * CHUNK


def _check_inputs(T1, T2, base, weights):
    if _IMPORT_ERROR is not None:
        raise ImportError(f"the Triton backend cannot run: {_IMPORT_ERROR}")
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
    kind = InterpretedFunction if INTERPRETED else triton.JITFunction
    if not isinstance(getattr(base, "triton_map", None), kind):
        raise TypeError(f"base.triton_map of {base!r} must be a @triton.jit function (a {kind.__name__} here), "
                        f"got {type(getattr(base, 'triton_map', None)).__name__}")


def _check_device(device: torch.device) -> None:
    if not INTERPRETED and device.type != "cuda":
        raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 before triton's import)")


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


def _launch(mmv, A, B, NA, NB, W, V, OUT, sizes, out_strides, param, MAP, R, precision):
    """One launch over (n, m, P, t) = ``sizes`` (compiled: tuned first on a slice when the
    problem is larger than the tuning problem)."""
    n, m, P, t = sizes
    kernel = _launcher(mmv)
    fixed = dict(MAP=MAP, MMV=mmv, R=R, BK=min(R, CHUNK), BT=VALUES, LB=LOCATION_BLOCK, PRECISION=precision)
    keys = (min(_next_pow2(n), TUNE_ROWS), min(_next_pow2(m), TUNE_COLS), min(_next_pow2(P), TUNE_LOCATIONS))

    def run(n, m, P, out, out_strides, tile):
        def grid(meta):
            return triton.cdiv(n, meta["BM"]), triton.cdiv(m, meta["BN"])

        kernel[grid](
            A, B, NA, NB, W, V, out, n, m, P, t,
            A.stride(0), B.stride(0), NA.stride(0), NB.stride(0),
            V.stride(0), V.stride(1), *out_strides, param, *keys, **fixed, **tile,
        )

    if INTERPRETED:
        return run(n, m, P, OUT, out_strides, INTERPRETER_TILE)
    fixed["enable_fp_fusion"] = True  # FMAs in the map and the sums (Triton 3.10 stops defaulting to it)
    sub = (min(n, TUNE_ROWS), min(m, TUNE_COLS), min(P, TUNE_LOCATIONS))
    tuning_key = (mmv, keys, R, MAP, precision)
    with torch.cuda.device(A.device):  # Triton launches on the current device
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
    if INTERPRETED:
        return True, f"triton {triton.__version__} (CPU interpreter, TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, f"triton {triton.__version__}, but no CUDA device"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def triton_memory(num_locations: int, rank: int, outputs: int = 0) -> dict:
    """Elements the Triton functions allocate, in Falkon's ``extra_mem`` form: per row the padded
    patches (P, R) and their norms (P,) (+ the ``outputs``-column K v result for mmv), the same
    per centre, and a constant for the location means and the autotune scratch block (first call
    per size class only). T1/T2 themselves are the caller's."""
    P, t = num_locations, outputs
    R = padded_rank(rank)
    return {"n": P * (R + 1) + t, "m": P * (R + 1), "0": P * (R + 1) + TUNE_ROWS * max(TUNE_COLS, t)}


def triton_conv_matrix(T1, T2, base, sigma, weights, options=None, out=None):
    r"""K (n, m), :math:`K_{ij} = \sum_p ω_p κ(T1_{p,i}, T2_{p,j})`, by the fused kernel.

    Parameters
    ----------
    T1, T2 : (P, n, r), (P, m, r) float32 tensors (any strides) of transformed patches.
    base : base-kernel object with ``triton_map``, ``triton_param(sigma)``, ``translation_invariant``.
    sigma : bandwidth, passed to ``base.triton_param``.
    weights : (P,) float32 location weights ω (used as given).
    options : :class:`~falkon_convrfm.ops.interface.BackendOptions` (None: the defaults); its
        ``precision``: ``"ieee"`` (exact fp32 inner products), ``"tf32x3"`` (split TF32, near
        fp32) or ``"tf32"`` (fast, ~1e-4 relative).
    out : optional (n, m) float32 tensor to fill (any strides).

    Returns
    -------
    out : the filled (n, m) tensor.
    """
    _check_inputs(T1, T2, base, weights)
    P, n, r = T1.shape
    m = T2.shape[1]
    if out is None:
        out = T1.new_empty(n, m)
    elif out.shape != (n, m) or out.dtype != torch.float32 or out.device != T1.device:
        raise ValueError(f"out must be a float32 ({n}, {m}) tensor on {T1.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    _check_device(T1.device)
    if n == 0 or m == 0:
        return out
    R = padded_rank(r)
    A, B, NA, NB = _operands(T1, T2, base, R)
    _launch(False, A, B, NA, NB, weights.contiguous(), out, out, (n, m, P, 0), (out.stride(0), out.stride(1)),
            float(base.triton_param(sigma)), base.triton_map, R, (options or DEFAULT_OPTIONS).precision)
    return out


def triton_conv_mmv(T1, T2, v, base, sigma, weights, options=None):
    r"""K v (n, t) for K as in :func:`triton_conv_matrix`, without materialising K.

    Each program adds ``K_tile @ v_tile`` to the result atomically, so the float32 summation
    order over centre tiles varies from run to run (results agree to rounding).

    Parameters
    ----------
    T1, T2, base, sigma, weights, options : as in :func:`triton_conv_matrix`.
    v : (m, t) float32 tensor (any strides).
    """
    _check_inputs(T1, T2, base, weights)
    P, n, r = T1.shape
    m = T2.shape[1]
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.device != T1.device:
        raise TypeError(f"v must be a float32 tensor on {T1.device}")
    if v.dim() != 2 or v.shape[0] != m:
        raise ValueError(f"v must be ({m}, t), got {tuple(v.shape)}")
    t = v.shape[1]
    _check_device(T1.device)
    result = T1.new_zeros(n, t)
    if n and m and t:
        R = padded_rank(r)
        A, B, NA, NB = _operands(T1, T2, base, R)
        _launch(True, A, B, NA, NB, weights.contiguous(), v, result, (n, m, P, t), (t, 1),
                float(base.triton_param(sigma)), base.triton_map, R, (options or DEFAULT_OPTIONS).precision)
    return result


TRITON = Backend("triton", matrix=triton_conv_matrix, mmv=triton_conv_mmv, memory=triton_memory)
