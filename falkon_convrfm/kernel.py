r"""ConvMahalanobisKernel: the learned-metric convolutional kernel, a ``falkon.kernels.Kernel``.

.. math::  K_M(x, z) = \sum_p ω_p\, κ(x_p, z_p), \qquad \sum_p ω_p = 1 \;(\text{default } ω_p = 1/P)

with κ a base patch kernel evaluated in the metric M = L Lᵀ: every patch is transformed once,
x_p ↦ Lᵀx_p (a conv2d of the image with Lᵀ), and κ is the Euclidean formula on the result.
"""
from __future__ import annotations

import functools

import torch

from ._compat import HAS_FALKON, FalkonKernelBase, make_options
from ._standalone import StandaloneKernel
from .base_kernels import base_kernel
from .metric import as_metric, metric_factor
from .memory import chunk_rows, memory_budget
from .ops import BACKEND_CHOICES, BACKENDS, BackendOptions, choose_backend, conv_kernel_diag
from .ops.dense import TORCH
from .ops.pooling import location_pairs, window_memory, window_sum
from .patches import PatchGeometry
from .progress import advance, progress_rows
from .validation import as_tensor, check_finite, check_pool_window, check_sigma

_KernelBase = FalkonKernelBase if HAS_FALKON else StandaloneKernel


def location_weights(weights, num_locations: int) -> torch.Tensor:
    """ω (P,) as float64, non-negative and normalised to sum to 1 (None: uniform 1/P)."""
    if weights is None:
        return torch.full((num_locations,), 1.0 / num_locations, dtype=torch.float64)
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64).reshape(-1)
    if w.numel() != num_locations:
        raise ValueError(f"weights must have one entry per patch location (P = {num_locations}), got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def median_patch_distance(T: torch.Tensor) -> float:
    """Median distance between aligned patches of different rows, ‖T[p, i] − T[p, j]‖ for
    consecutive rows i, j = i + 1 at every location (the bandwidth heuristic)."""
    if T.shape[1] < 2:
        raise ValueError("the median heuristic needs at least two rows")
    return torch.linalg.vector_norm(T[:, 1:] - T[:, :-1], dim=-1).median().item()


def kernel_memory(num_locations: int, rank: int, pool_window: int = 1) -> dict:
    """Elements one ``compute`` call allocates, in Falkon's ``extra_mem`` form: the torch backend's
    (:func:`~falkon_convrfm.ops.dense.dense_memory`), which bound the Triton backend's too, plus
    for a pooling window its gathered patches and output block
    (:func:`~falkon_convrfm.ops.pooling.window_memory`)."""
    memory = TORCH.memory(num_locations, rank)
    if pool_window > 1:
        for key, value in window_memory(num_locations, rank).items():
            memory[key] = memory.get(key, 0) + value
    return memory


class ConvMahalanobisKernel(_KernelBase):
    r"""Aligned-patch convolutional kernel with a learned patch metric M.

    ``K(x, z) = Σ_p ω_p κ(x_p, z_p)`` where x_p ∈ R^d (d = c·q²) is patch p of image x in
    ``unfold`` order and κ is evaluated in the metric M:

    - ``laplace``:  κ = exp(−‖u − v‖_M / σ)
    - ``gaussian``: κ = exp(−‖u − v‖²_M / (2σ²))
    - ``ntk``:      κ = ⟨u,v⟩_M (π − θ)/π + ‖u‖_M‖v‖_M (sin θ + (π − θ) cos θ)/π, no bandwidth

    Images travel as rows of length c·H·W (C-order of (c, H, W)). With Falkon installed this is
    a ``falkon.kernels.Kernel`` (so ``falkon.Falkon(kernel=...)`` works); without it it offers
    the same ``k(X1, X2)``, ``k.mmv`` and ``k.dmmv``.

    Parameters
    ----------
    M : (d, d) symmetric PSD tensor/array, or None for the identity (the fixed kernel).
    image_shape : (c, H, W).
    patch_size, stride, padding : patch geometry (zero padding).
    kernel : ``"laplace"``, ``"gaussian"`` or ``"ntk"`` (see :mod:`falkon_convrfm.base_kernels`).
    sigma : bandwidth (Falkon's conventions), ignored by ``ntk``.
    weights : optional per-location weights ω (P,), non-negative; normalised to sum to 1.
    opt : ``falkon.FalkonOptions`` (or :class:`~falkon_convrfm.KernelOptions` without Falkon).
        ``keops_active="force"`` makes KeOps evaluate kernel-vector products on any device;
        ``"auto"`` lets ``backend="auto"`` use KeOps on CUDA only after a health check.
    backend : ``"auto"`` (torch on CPU; the fused Triton kernel for float32 on CUDA), ``"torch"``,
        ``"triton"`` or ``"keops"``; see :func:`falkon_convrfm.ops.choose_backend`.
    precision : inner products in the Triton kernel: ``"ieee"`` (exact float32, default),
        ``"tf32x3"`` (split TF32, close to float32) or ``"tf32"`` (fast, ~1e-4 relative).
    pool_window : odd w ≥ 1. Local pooling: patch p of x is compared with the patches of z in the
        w×w window around p, K(x, z) = Σ_p ω_p Σ_δ κ(x_p, z_{p+δ}) over offsets δ ∈ {−w//2..w//2}²
        with p + δ on the grid (border locations pair only with partners inside it). w = 1 (the
        default) is the aligned kernel; the cost grows as w².
    """

    def __init__(self, M=None, image_shape=(3, 32, 32), patch_size: int = 3, stride: int = 1, padding: int = 0,
                 kernel: str = "laplace", sigma: float = 1.0, weights=None, opt=None, backend: str = "auto",
                 precision: str = "ieee", pool_window: int = 1):
        super().__init__("ConvMahalanobis", opt if opt is not None else make_options())
        self.base = base_kernel(kernel)
        if self.base.uses_sigma:
            check_sigma(sigma)
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
        self.options = BackendOptions(precision=precision)
        self.geometry = PatchGeometry(tuple(image_shape), patch_size, stride, padding)
        self.pool_window = check_pool_window(pool_window)
        self._partners = self.geometry.window_partners(self.pool_window) if self.pool_window > 1 else None
        d = self.geometry.patch_dim
        self.base_kernel = kernel
        self.sigma = float(sigma)
        self.backend = backend
        self.metric = torch.eye(d, dtype=torch.float64) if M is None else as_metric(M, d)
        self.factor = metric_factor(self.metric)
        self.weights = location_weights(weights, self.geometry.num_locations)
        self._cast_cache = {}

    # ------------------------------------------------------------------ the transformed patches
    def factor_and_weights(self, like: torch.Tensor):
        """(L (d, r), ω (P,)) on ``like``'s device and dtype, cached."""
        key = (like.dtype, like.device)
        if key not in self._cast_cache:
            self._cast_cache[key] = (self.factor.to(like.device, like.dtype), self.weights.to(like.device, like.dtype))
        return self._cast_cache[key]

    def location_pairs(self, like: torch.Tensor) -> list:
        """The (x location, z location, weight) pairs K sums over, one triple of (k,) tensors per
        window offset on ``like``'s device and dtype: [(p, p, ω_p)] for the aligned kernel, see
        :func:`~falkon_convrfm.ops.pooling.location_pairs` for pooling windows."""
        _, weights = self.factor_and_weights(like)
        if self._partners is None:
            locations = torch.arange(weights.shape[0], device=weights.device)
            return [(locations, locations, weights)]
        return location_pairs(self._partners, weights)

    def patch_features(self, X: torch.Tensor) -> torch.Tensor:
        """Lᵀx_p for every row of X and patch location, as a (P, n, r) view."""
        factor, _ = self.factor_and_weights(X)
        return self.geometry.transformed_patches(X, factor)

    def backend_for(self, X: torch.Tensor, opt=None):
        """The backend (:class:`~falkon_convrfm.ops.Backend`) that evaluates this kernel on data
        like ``X`` (see ``backend``)."""
        mode = getattr(opt if opt is not None else self.params, "keops_active", "auto")
        return BACKENDS[choose_backend(self.backend, X.device.type, X.dtype, mode)]

    def _check(self, **tensors) -> dict:
        """Convert and validate data arguments: image rows, dtypes, devices, finiteness."""
        out = {k: (None if t is None else as_tensor(t, k).contiguous()) for k, t in tensors.items()}
        present = {k: t for k, t in out.items() if t is not None}
        first_name, first = next(iter(present.items()))
        for name, t in present.items():
            if not t.is_floating_point():
                raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
            if t.dtype != first.dtype:
                raise TypeError(f"dtype mismatch: {first_name} is {first.dtype} but {name} is {t.dtype}")
            if t.device != first.device:
                raise ValueError(f"device mismatch: {first_name} is on {first.device} but {name} is on {t.device}")
            if name in ("X1", "X2"):
                self.geometry.check_rows(t, name)
                if t.shape[0] == 0:
                    raise ValueError(f"{name} is empty (0 rows)")
            check_finite(t, name)
        return out

    # ------------------------------------------------------------------ public API
    def __call__(self, X1, X2, diag=False, out=None, opt=None, **kwargs):
        c = self._check(X1=X1, X2=X2)
        return super().__call__(c["X1"], c["X2"], diag=diag, out=out, opt=opt, **kwargs)

    def mmv(self, X1, X2, v, out=None, opt=None, **kwargs):
        c = self._check(X1=X1, X2=X2, v=v)
        return super().mmv(c["X1"], c["X2"], c["v"], out=out, opt=opt, **kwargs)

    def dmmv(self, X1, X2, v, w, out=None, opt=None, **kwargs):
        c = self._check(X1=X1, X2=X2, v=v, w=w)
        if c["v"] is None and c["w"] is not None:  # K(X1, X2)ᵀ w = K(X2, X1) w: K is symmetric
            return self.mmv(c["X2"], c["X1"], c["w"], out=out, opt=opt, **kwargs)
        return super().dmmv(c["X1"], c["X2"], c["v"], c["w"], out=out, opt=opt, **kwargs)

    # ------------------------------------------------------------------ Falkon's kernel contract
    def _pooled(self, aligned, T1, T2, weights, out=None):
        """``aligned(T1, T2, ω, out)`` (an aligned-patch backend call) over the pooling window."""
        if self._partners is None:
            return aligned(T1, T2, weights, out)
        return window_sum(lambda A, B, w: aligned(A, B, w, None), T1, T2, self.location_pairs(T1), out)

    def compute(self, X1: torch.Tensor, X2: torch.Tensor, out: torch.Tensor, diag: bool, **kwargs):
        """Fill ``out`` with K(X1, X2) (or its diagonal) for one block of rows, in place (in row
        chunks that report progress while a bar in kernel entries is shown)."""
        _, weights = self.factor_and_weights(X1)
        T1, T2 = self.patch_features(X1), self.patch_features(X2)
        base, sigma, options = self.base, self.sigma, self.options
        if diag:
            def aligned(A, B, w, o):
                return conv_kernel_diag(A, B, base, sigma, w)
        else:
            matrix = self.backend_for(X1).matrix

            def aligned(A, B, w, o):
                return matrix(A, B, base, sigma, w, options, out=o)
        if diag:
            return out.copy_(self._pooled(aligned, T1, T2, weights).reshape(out.shape))
        n, step = X1.shape[0], progress_rows(X1.shape[0])
        for i0 in range(0, n, step):
            dest = out if step >= n else out[i0 : i0 + step]
            part = self._pooled(aligned, T1[:, i0 : i0 + step], T2, weights, dest if out.is_contiguous() else None)
            if part is not dest:
                dest.copy_(part.reshape(dest.shape))
            advance(dest.shape[0] * X2.shape[0])
        return out

    def compute_sparse(self, X1, X2, out, diag, **kwargs):
        raise TypeError("ConvMahalanobisKernel needs dense image rows; sparse inputs are not supported")

    def extra_mem(self, is_differentiable, is_sparse, dtype, density1=None, density2=None):
        """Temporaries of :meth:`compute` in elements, see :func:`kernel_memory`."""
        return kernel_memory(self.geometry.num_locations, self.factor.shape[1], self.pool_window)

    def _decide_mmv_impl(self, X1, X2, v, opt):
        backend = self.backend_for(X1, opt)
        if backend.mmv is None:
            return super()._decide_mmv_impl(X1, X2, v, opt)
        return functools.partial(self._direct_mmv, backend=backend)

    def _decide_dmmv_impl(self, X1, X2, v, w, opt):
        backend = self.backend_for(X1, opt)
        if backend.mmv is None:
            return super()._decide_dmmv_impl(X1, X2, v, w, opt)
        return functools.partial(self._direct_dmmv, backend=backend)

    def _direct_mmv(self, X1, X2, v, backend, out=None, opt=None, **_):
        """K(X1, X2) v by ``backend.mmv``, without materialising K, in row chunks of X1 whose
        temporaries (``backend.memory``) fit ``max_gpu_mem`` / ``max_cpu_mem``."""
        _, weights = self.factor_and_weights(X1)
        T2 = self.patch_features(X2)
        base, sigma, options = self.base, self.sigma, self.options

        def aligned(A, B, w, o):
            return backend.mmv(A, B, v, base, sigma, w, options)

        n, m = X1.shape[0], X2.shape[0]
        memory = backend.memory(T2.shape[0], T2.shape[2], v.shape[1])
        rows = chunk_rows(memory_budget(opt, X1.device), memory, n, m, X1.element_size())
        out = X1.new_empty(n, v.shape[1]) if out is None else out
        for i0 in range(0, n, rows):
            out[i0 : i0 + rows] = self._pooled(aligned, self.patch_features(X1[i0 : i0 + rows]), T2, weights)
            advance(min(rows, n - i0) * m)
        return out

    def _direct_dmmv(self, X1, X2, v, w, backend, out=None, opt=None, **_):
        """K(X1, X2)ᵀ (K(X1, X2) v + w) as two direct products (K(X1, X2)ᵀ = K(X2, X1))."""
        inner = self._direct_mmv(X1, X2, v, backend, opt=opt) if v is not None else 0
        inner = inner + w if w is not None else inner
        return self._direct_mmv(X2, X1, inner, backend, out=out, opt=opt)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"kernel={self.base_kernel!r}, sigma={self.sigma:g}, image_shape={g.image_shape}, "
            f"patch_size={g.patch_size}, stride={g.stride}, padding={g.padding}, rank={self.factor.shape[1]}, "
            f"pool_window={self.pool_window}, backend={self.backend!r}"
        )

    def __str__(self):
        return f"ConvMahalanobisKernel({self.extra_repr()})"
