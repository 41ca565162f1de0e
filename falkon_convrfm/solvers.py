"""Kernel ridge solvers: exact (all rows as centres), Nyström by a direct solve, and Falkon.

``choose_solver`` resolves ``solver='auto'`` per device; ``fit_kernel_machine`` runs the chosen one.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from . import _compat
from ._compat import make_options
from ._standalone import plan_blocks
from .memory import memory_budget
from .progress import phase
from .validation import positive_number, warn

SOLVERS = ("auto", "falkon", "exact", "nystrom")
DEFAULT_BLOCK_MEMORY = 2**30  # bytes for one row block of K_nm in the Nyström solver
NYSTROM_JITTERS = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6)  # relative to tr(A)/m, tried in order
PRECONDITIONER_JITTER_STEPS = (1.0, 1e2, 1e4)  # × Falkon's pc_epsilon, tried in order
# validation.warn, once per process for each message (the solver's fallbacks repeat every fit)
warn_once = functools.lru_cache(maxsize=None)(warn)

# ---------------------------------------------------------------------- linear algebra
def _numerically_pd_cholesky(A: torch.Tensor):
    """Lower Cholesky factor L of A, or None when A is not numerically positive definite:
    the factorisation fails, or its smallest pivot is at rounding level, min L_ii² ≤ m·ε·max A_ii
    (a singular A, e.g. duplicated centres, can pass LAPACK's check with such a pivot)."""
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        return None
    threshold = A.shape[0] * torch.finfo(A.dtype).eps * A.diagonal().max()
    return L if bool(L.diagonal().min() ** 2 > threshold) else None


def solve_psd(A: torch.Tensor, B: torch.Tensor, name: str, hint: str, jitters=()) -> torch.Tensor:
    """X = A⁻¹B for a symmetric positive-definite A (m×m), by Cholesky in float64.

    When A is not numerically positive definite, retry with A + ε·(tr A / m)·I for each ε of
    ``jitters`` in order (one warning names the ε that worked); when none works (or ``jitters``
    is empty) raise a ValueError that names the matrix (``name``) and what to do (``hint``).
    Only the lower triangle of A is read. A's diagonal is modified in place when jitter is added.
    Returns X as float64 (m, k) on A's device (B is reshaped to (m, -1)).
    """
    A = A.to(torch.float64)
    m = A.shape[0]
    scale = A.diagonal().mean().item()
    added = 0.0
    for eps in (0.0, *jitters):
        if eps:
            A.diagonal().add_(eps * scale - added)
            added = eps * scale
        L = _numerically_pd_cholesky(A)
        if L is not None:
            if eps:
                warn(f"{name} is not numerically positive definite; solved with jitter {eps:g}·tr/m = "
                     f"{added:.3g} added to its diagonal")
            return torch.cholesky_solve(B.reshape(m, -1).to(A.device, torch.float64), L)
    tried = f" (also with jitter up to {jitters[-1]:g}·tr/m)" if jitters else ""
    raise ValueError(f"{name} is not positive definite{tried}: {hint}")


# ---------------------------------------------------------------------- exact
def exact_ridge_fit(kernel, X: torch.Tensor, Y: torch.Tensor, penalty: float) -> torch.Tensor:
    """α = (K + nλI)⁻¹ Y with K = kernel(X, X), by Cholesky in float64.

    The penalty follows Falkon's convention (λ is multiplied by n), so Falkon with every
    training point as a centre solves the same problem. Returns α (n, C) in X's dtype.
    """
    penalty = positive_number("penalty", penalty)
    n = X.shape[0]
    K = kernel(X, X).to(torch.float64)
    K.diagonal().add_(n * penalty)
    alpha = solve_psd(K, Y, f"K + nλI (penalty={penalty:g})", "the penalty is too small for this kernel")
    return alpha.to(X.dtype)


# ---------------------------------------------------------------------- Nyström (direct)
def nystrom_block_rows(kernel, X: torch.Tensor, num_centres: int, block_memory: float) -> int:
    """Rows per block of K_nm so that one block stays within ``block_memory`` bytes: per row the
    block in X's dtype, its float64 copy and the float64 centre rows taken from it (m each, 1 + 2·8/s
    elements of X's size s) plus the kernel's declared temporaries (``extra_mem``). A ValueError
    when not even one row fits."""
    s = X.element_size()
    extra = dict(kernel.extra_mem(False, False, X.dtype))
    extra["n"] = extra.get("n", 0) + num_centres * 2 * 8 / s
    rows, _ = plan_blocks(X.shape[0], num_centres, extra, block_memory / s, full_m=True)
    return rows


def nystrom_normal_equations(kernel, X: torch.Tensor, Y: torch.Tensor, centre_idx: torch.Tensor,
                             ridge: float, block_rows: int):
    """A = K_nmᵀK_nm + ridge·K_mm (m×m) and B = K_nmᵀY (m×C), both float64 on X's device.

    K_nm = kernel(X, X[centre_idx]) is evaluated in row blocks of ``block_rows`` rows,
    A = Σ_b K_bᵀK_b and B = Σ_b K_bᵀY_b are accumulated in float64, and the rows of K_mm are taken
    from the blocks (row j of K_mm is row ``centre_idx[j]`` of K_nm), so K_mm costs no kernel
    evaluation. Only the lower triangle of A is meant to be read (it is symmetric up to rounding).
    """
    n, m = X.shape[0], centre_idx.shape[0]
    centre_idx = centre_idx.to(X.device)
    centres = X[centre_idx]
    Y2 = Y.reshape(n, -1).to(X.device)
    A = torch.zeros(m, m, dtype=torch.float64, device=X.device)
    B = torch.zeros(m, Y2.shape[1], dtype=torch.float64, device=X.device)
    sorted_idx, order = torch.sort(centre_idx)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        Kb = kernel(X[start:stop], centres).to(torch.float64)
        A.addmm_(Kb.T, Kb)
        B.addmm_(Kb.T, Y2[start:stop].to(torch.float64))
        lo, hi = torch.searchsorted(sorted_idx, torch.tensor([start, stop], device=X.device)).tolist()
        if hi > lo:  # centres among these rows: A[j] += ridge · K_nm[centre_idx[j]]
            A.index_add_(0, order[lo:hi], Kb[sorted_idx[lo:hi] - start], alpha=ridge)
    return A, B


def _check_centre_idx(centre_idx, n: int) -> torch.Tensor:
    """``centre_idx`` as a 1-D int64 tensor of row indices in [0, n), or a ValueError."""
    idx = torch.as_tensor(centre_idx)
    if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(
            f"centre_idx must be a non-empty 1-D integer tensor, got shape {tuple(idx.shape)} {idx.dtype}"
        )
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= n:
        raise ValueError(f"centre_idx must hold row indices in [0, {n}), got range [{low}, {high}]")
    return idx.long()


def nystrom_ridge_fit(kernel, X: torch.Tensor, Y: torch.Tensor, centre_idx, penalty: float,
                      block_memory: float = DEFAULT_BLOCK_MEMORY) -> torch.Tensor:
    """Nyström kernel ridge regression by a direct solve: α = (K_nmᵀK_nm + nλK_mm)⁻¹ K_nmᵀY.

    This minimises (1/n)‖K_nm α − Y‖² + λ αᵀK_mm α (Falkon's objective and convention: λ is
    multiplied by n), with centres X[centre_idx]. With every row as a centre and K invertible it
    is the exact solution α = (K + nλI)⁻¹Y. A is accumulated and factorised in float64 (cost
    n·m² + m³/3, memory 2·m² float64 on X's device); a rank-deficient K_mm (e.g. duplicated
    centres) is handled by jitter, see :func:`solve_psd`. ``block_memory``: bytes for one row
    block of K_nm (:func:`nystrom_block_rows`). Returns α (m, C) in X's dtype on X's device.
    """
    penalty = positive_number("penalty", penalty)
    block_memory = positive_number("block_memory", block_memory)
    n = X.shape[0]
    idx = _check_centre_idx(centre_idx, n)
    rows = nystrom_block_rows(kernel, X, idx.shape[0], block_memory)
    A, B = nystrom_normal_equations(kernel, X, Y, idx, n * penalty, rows)
    alpha = solve_psd(A, B, f"K_nmᵀK_nm + nλK_mm (penalty={penalty:g})",
                      "raise the penalty or use fewer centres", jitters=NYSTROM_JITTERS)
    return alpha.to(X.dtype)


def kernel_predict(kernel, X: torch.Tensor, centres: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """f(X) = K(X, centres) α."""
    return kernel.mmv(X, centres, alpha)


# ---------------------------------------------------------------------- choice and dispatch
def choose_solver(requested: str, device) -> str:
    """The solver to run on ``device`` for the ``requested`` one (one of :data:`SOLVERS`).

    ``'auto'``: on CPU ``'falkon'`` when Falkon imports, else ``'exact'``; on CUDA ``'falkon'``
    when Falkon's CUDA extension works (:func:`~falkon_convrfm._compat.falkon_cuda_status`),
    else ``'nystrom'``, with a one-time warning saying why. An explicit ``'falkon'`` needs Falkon
    (ImportError otherwise) and, on CUDA, its CUDA extension (RuntimeError otherwise).
    ``'exact'`` and ``'nystrom'`` run anywhere.
    """
    if requested not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {requested!r}")
    on_cuda = torch.device(device).type == "cuda"
    if requested in ("exact", "nystrom"):
        return requested
    if requested == "falkon":
        _compat.require_falkon()
        if on_cuda:
            ok, reason = _compat.falkon_cuda_status()
            if not ok:
                raise RuntimeError(f"solver='falkon' cannot run on CUDA: {reason}; use solver='nystrom'")
        return "falkon"
    if not on_cuda:
        return "falkon" if _compat.HAS_FALKON else "exact"
    ok, reason = _compat.falkon_cuda_status()
    if ok:
        return "falkon"
    warn_once(f"solver='auto' on CUDA: Falkon cannot run there ({reason}); using solver='nystrom' instead")
    return "nystrom"


def solver_options(max_memory=None, device: str = "cpu", **overrides):
    """Options for the kernel and the solver: ``falkon.FalkonOptions`` (or
    :class:`~falkon_convrfm.KernelOptions` without Falkon) with the memory budget on both
    devices and K_nm stored whenever it fits (``store_kernel_d_threshold=0``): a convolutional
    kernel costs P·r per entry whatever the row length, so re-evaluating it at every CG
    iteration never pays."""
    opts = {}
    if max_memory is not None:
        opts.update(max_cpu_mem=float(max_memory), max_gpu_mem=float(max_memory))
    if _compat.HAS_FALKON:  # no_single_kernel=False: float32 data keeps float32 kernel blocks (2× faster)
        opts.update(store_kernel_d_threshold=0, no_single_kernel=False, use_cpu=(device == "cpu"))
    opts.update(overrides)
    return make_options(**opts)


def _is_cholesky_failure(exc: Exception) -> bool:
    """Whether ``exc`` is a failed Cholesky factorisation (LAPACK/cuSOLVER potrf, torch's cholesky)."""
    text = str(exc).lower()
    return "potrf" in text or "cholesky" in text or "positive-definite" in text


def _falkon_fit(kernel, X, Y, centre_idx, penalty, loss, maxiter, options):
    """(centres, α) from Falkon, see :func:`_falkon_model_fit`. When the Cholesky factorisation of
    Falkon's preconditioner fails (K_mm numerically singular in the data's precision, e.g. smooth
    pooled kernels in float32), the fit is repeated with the preconditioner's jitter ``pc_epsilon``
    × :data:`PRECONDITIONER_JITTER_STEPS`, with a warning. The jitter only changes the
    preconditioner, hence how fast CG converges, not the problem it solves."""
    options = options if options is not None else make_options()
    base = options.pc_epsilon_32, options.pc_epsilon_64
    for step in PRECONDITIONER_JITTER_STEPS:
        jittered = dataclasses.replace(options, pc_epsilon_32=base[0] * step, pc_epsilon_64=base[1] * step)
        try:
            result = _falkon_model_fit(kernel, X, Y, centre_idx, penalty, loss, maxiter, jittered)
        except RuntimeError as exc:
            if not _is_cholesky_failure(exc):
                raise
            failure = exc
            continue
        if step != 1.0:
            warn_once(f"Falkon's preconditioner needed {step:g}× its default jitter (pc_epsilon) to factorise "
                       f"K_mm ({len(centre_idx)} centres, {X.dtype}); CG may need more iterations (maxiter={maxiter})")
        return result
    raise RuntimeError(
        f"Falkon's preconditioner could not factorise K_mm ({len(centre_idx)} centres, {X.dtype}) even with "
        f"{PRECONDITIONER_JITTER_STEPS[-1]:g}× its default jitter ({failure}); use dtype='float64', fewer "
        "centres or solver='nystrom'"
    )


def _falkon_model_fit(kernel, X, Y, centre_idx, penalty, loss, maxiter, options):
    """(centres, α) from ``falkon.Falkon``/``InCoreFalkon`` (squared loss) or ``LogisticFalkon``."""
    falkon = _compat.require_falkon()
    centres = X[centre_idx]
    selector = falkon.center_selection.FixedSelector(centres, y_centers=Y[centre_idx])
    if loss == "logistic":
        penalties = [max(penalty, p) for p in (penalty * 1e4, penalty * 1e2, penalty)]
        model = falkon.LogisticFalkon(
            kernel, penalties, [3, 3, maxiter], falkon.gsc_losses.LogisticLoss(kernel),
            M=len(centre_idx), center_selection=selector, options=options,
        )
    else:
        model_cls = falkon.InCoreFalkon if X.is_cuda else falkon.Falkon  # data on the GPU: in-core
        model = model_cls(
            kernel, penalty, M=len(centre_idx), center_selection=selector, maxiter=maxiter, options=options
        )
    model.fit(X, Y)
    return model.ny_points_, model.alpha_


def solve_entries(solver: str, loss: str, n: int, m: int) -> int | None:
    """Kernel entries the ``solver`` (resolved) evaluates on n rows and m centres: K (n²) for
    ``'exact'``, K_nm for ``'nystrom'``, K_mm and the stored K_nm for Falkon's squared loss;
    None (unknown) for the logistic loss, whose Newton steps re-evaluate the kernel."""
    if solver == "exact":
        return n * n
    if solver == "nystrom":
        return n * m
    return m * m + n * m if loss == "squared" else None


def fit_kernel_machine(
    kernel,
    X: torch.Tensor,
    Y: torch.Tensor,
    centre_idx: torch.Tensor,
    penalty: float,
    solver: str,
    loss: str = "squared",
    maxiter: int = 20,
    options=None,
    *,
    block_memory: float | None = None,
):
    """Fit f(x) = K(x, centres) α; returns (centres, α), α in X's dtype on X's device.

    ``solver`` (resolved by :func:`choose_solver` for X's device):

    - ``'exact'``: every row is a centre, α = (K + nλI)⁻¹Y (:func:`exact_ridge_fit`).
    - ``'nystrom'``: centres X[centre_idx], α = (K_nmᵀK_nm + nλK_mm)⁻¹K_nmᵀY by a direct float64
      solve (:func:`nystrom_ridge_fit`); ``block_memory`` bytes per row block of K_nm (None: the
      ``options`` budget for X's device when finite, else 1 GiB).
    - ``'falkon'``: the same Nyström problem by Falkon's preconditioned CG (``maxiter`` iterations,
      ``options``), squared loss with ``falkon.Falkon`` (``InCoreFalkon`` for CUDA data) or logistic
      loss (binary, Y in {−1, +1}) with ``falkon.LogisticFalkon``. When Falkon's compiled
      extension fails to load at its first use (an OSError, e.g. a CUDA build that does not match
      torch), a one-time warning says so and the squared loss falls back to ``'nystrom'``.

    ``'exact'`` and ``'nystrom'`` support the squared loss only. Progress: a bar in kernel
    entries (:func:`solve_entries`).
    """
    solver = choose_solver(solver, X.device)
    if loss not in ("squared", "logistic"):
        raise ValueError(f"loss must be 'squared' or 'logistic', got {loss!r}")
    m = X.shape[0] if solver == "exact" else len(centre_idx)
    with phase(f"{solver} solve", solve_entries(solver, loss, X.shape[0], m)):
        return _run_solver(kernel, X, Y, centre_idx, penalty, solver, loss, maxiter, options, block_memory)


def _run_solver(kernel, X, Y, centre_idx, penalty, solver, loss, maxiter, options, block_memory):
    """:func:`fit_kernel_machine` for a resolved ``solver`` and a checked ``loss``."""
    if solver == "falkon":
        try:
            return _falkon_fit(kernel, X, Y, centre_idx, penalty, loss, maxiter, options)
        except OSError as exc:  # Falkon loads its compiled extension at first use
            reason = f"Falkon's compiled extension failed to load ({type(exc).__name__}: {exc})"
            if loss != "squared":
                raise RuntimeError(f"{reason}; loss='logistic' needs a working Falkon") from exc
            warn_once(f"{reason}; using solver='nystrom' instead")
            solver = "nystrom"
    if loss != "squared":
        raise ValueError(f"the {solver} solver supports the squared loss only; use solver='falkon'")
    if solver == "exact":
        return X, exact_ridge_fit(kernel, X, Y, penalty)
    if block_memory is None:
        block_memory = memory_budget(options, X.device, default=DEFAULT_BLOCK_MEMORY)
    idx = _check_centre_idx(centre_idx, X.shape[0])
    return X[idx.to(X.device)], nystrom_ridge_fit(kernel, X, Y, idx, penalty, block_memory)
