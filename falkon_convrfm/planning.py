"""Memory model of a ConvRFM fit: bytes per phase, peak, and the largest centre count that fits.

All terms follow the code: the kernel's declared temporaries (``extra_mem``), the solver's
matrices (Falkon: stored K_nm and preconditioner; ``nystrom``: the float64 normal equations and
one K_nm row block; ``exact``: K in float64 and its Cholesky factor), the AGOP chunk rule of :func:`~falkon_convrfm.agop.patch_agop` and the deep
feature maps. Sizes are for one device holding everything (CPU RAM, or one GPU with the
data in-core).
"""
from __future__ import annotations

from .agop import agop_memory, agop_memory_budget
from .kernel import kernel_memory
from .memory import memory_budget
from .solvers import DEFAULT_BLOCK_MEMORY
from .patches import PatchGeometry
from .validation import warn

BYTES = {"float32": 4, "float64": 8}


def kernel_temporaries(geometry: PatchGeometry, rows: int, cols: int, rank: int, itemsize: int,
                       pool_window: int = 1) -> int:
    """Bytes of one ``compute`` call on a rows × cols block (the kernel's ``extra_mem``)."""
    extra = kernel_memory(geometry.num_locations, rank, pool_window)
    return int((extra["n"] * rows + extra["m"] * cols + extra.get("nm", 0) * rows * cols + extra["0"]) * itemsize)


def plan_memory(n: int, image_shape, patch_size: int = 3, stride: int = 1, padding: int = 0,
                centres: int = 10_000, dtype: str = "float32", device_memory: float = 80 * 2**30,
                n_outputs: int = 10, agop_samples: int = 10_000, n_val: int = 0, rank: int | None = None,
                block_budget: float | None = None, feature_channels: int | None = None, pool: int = 1,
                solver: str = "falkon", pool_window: int = 1) -> dict:
    """Memory of each phase of a ConvRFM fit (bytes), the peak, and the largest centre count
    whose peak fits in ``device_memory``.

    ``rank`` defaults to d (a full-rank metric). ``block_budget``: Falkon's ``max_*_mem``
    (None: unbounded, blocks as large as the data). ``feature_channels``/``pool``: also size the
    feature maps of a Deep ConvRFM layer with that width. ``solver`` (resolved, as by
    :func:`~falkon_convrfm.solvers.choose_solver`): ``"falkon"``, ``"nystrom"`` (the direct solve,
    whose row blocks get ``block_budget`` or 1 GiB) or ``"exact"`` (every training row a centre:
    ``centres`` is n). ``pool_window``: the kernel's local pooling window.
    """
    s = BYTES[dtype]
    geo = PatchGeometry(tuple(image_shape), patch_size, stride, padding)
    r = geo.patch_dim if rank is None else rank
    if solver != "exact" and centres > n:
        warn(f"n_centres={centres} is more than the {n} training rows: all {n} are centres")
    centres = n if solver == "exact" else min(centres, n)

    def solver_phases(m: int) -> dict:
        blocks = kernel_temporaries(geo, n, m, r, s, pool_window)
        if solver == "exact":  # K (n × n) in the data's dtype, its float64 copy and Cholesky factor
            return {"K + float64 copy": n * n * (s + 8), "Cholesky factor": n * n * 8,
                    "kernel blocks": blocks if block_budget is None else min(blocks, int(block_budget))}
        if solver == "nystrom":  # A = K_nmᵀK_nm + nλK_mm and its Cholesky factor, one K_nm row block
            budget = memory_budget(block_budget, default=DEFAULT_BLOCK_MEMORY)
            return {"normal equations": 2 * m * m * 8, "K_nm block": int(min(n * m * (s + 16) + blocks, budget))}
        return {"K_nm (stored)": n * m * s, "preconditioner": 2 * m * m * s,
                "kernel blocks": blocks if block_budget is None else min(blocks, int(block_budget))}

    def phases(m: int) -> dict:
        out = {"data": (n + n_val) * geo.row_length * s, "centres": m * geo.row_length * s, **solver_phases(m),
               "AGOP": agop_memory(min(agop_samples, n), geo.num_locations, m, r, n_outputs, s,
                                   **agop_memory_budget(block_budget))}
        if feature_channels:
            ho, wo = geo.out_shape
            out["feature maps"] = (n + n_val) * feature_channels * (ho // pool) * (wo // pool) * s
        return out

    def peak(m: int) -> int:
        """Resident data, centres and feature maps, plus the larger of the solver phase and the
        AGOP phase (the solver's matrices are released after each fit)."""
        ph = phases(m)
        resident = ph["data"] + ph["centres"] + ph.get("feature maps", 0)
        return resident + max(sum(solver_phases(m).values()), ph["AGOP"])

    lo, hi = 0, max(centres, 1)
    while peak(hi) <= device_memory and hi < n:
        hi = min(n, hi * 2)
    while lo < hi:  # largest m with peak ≤ device_memory
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if peak(mid) <= device_memory else (lo, mid - 1)
    return {"n": n, "centres": centres, "dtype": dtype, "solver": solver, "phases": phases(centres),
            "peak": peak(centres), "device_memory": device_memory, "fits": peak(centres) <= device_memory,
            "max_centres": lo}


def format_plan(plan: dict, memory_source: str = "") -> str:
    """A printable table of :func:`plan_memory`'s result (``memory_source``: where its memory
    figure comes from)."""
    gib = 2**30
    lines = [f"memory plan: n = {plan['n']}, centres = {plan['centres']}, {plan['dtype']}, solver {plan['solver']}"]
    lines += [f"  {name:16s} {b / gib:9.2f} GiB" for name, b in plan["phases"].items()]
    source = f" {memory_source}" if memory_source else ""
    lines.append(f"  {'peak':16s} {plan['peak'] / gib:9.2f} GiB of {plan['device_memory'] / gib:.1f} GiB{source} "
                 f"({'fits' if plan['fits'] else 'does NOT fit'})")
    if plan["solver"] == "exact":
        lines.append("  exact solver: every training image is a centre")
    else:
        lines.append(f"  largest centre count that fits: {plan['max_centres']}")
    return "\n".join(lines)
