r"""ConvMahalanobisKernel: the learned-metric convolutional kernel, a ``falkon.kernels.Kernel``.

.. math::  K_M(x, z) = \sum_p ω_p\, κ(x_p, z_p), \qquad \sum_p ω_p = 1 \;(\text{default } ω_p = 1/P)

with κ a base patch kernel evaluated in the metric M = L Lᵀ: every patch is transformed once,
x_p ↦ Lᵀx_p (a conv2d of the image with Lᵀ), and κ is the Euclidean formula on the result.
"""
from __future__ import annotations

import numpy as np
import torch

from ._compat import HAS_FALKON, FalkonKernelBase, make_options, keops_available
from ._standalone import StandaloneKernel
from .metric import as_metric, metric_factor
from .ops import BASE_KERNELS, conv_kernel_diag, conv_kernel_matrix, keops_conv_mmv
from .ops.dense import TILE_ELEMENTS
from .patches import PatchGeometry

_KernelBase = FalkonKernelBase if HAS_FALKON else StandaloneKernel


def as_tensor(X, name: str) -> torch.Tensor:
    """torch tensors pass through, numpy arrays are wrapped; anything else is a TypeError."""
    if isinstance(X, torch.Tensor):
        return X
    if isinstance(X, np.ndarray):
        return torch.from_numpy(X)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(X).__name__}")


def check_finite(X: torch.Tensor, name: str, rows_per_chunk: int = 4096) -> None:
    """ValueError if X holds NaN or Inf (checked in row chunks, no full-size temporary)."""
    for i in range(0, X.shape[0], rows_per_chunk):
        if not torch.isfinite(X[i : i + rows_per_chunk]).all():
            raise ValueError(f"{name} contains NaN or Inf")


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


def compute_temporaries(num_locations: int, rank: int) -> dict:
    """Elements that one ``compute`` call allocates, in Falkon's ``extra_mem`` form: per row of
    either block the conv output (P, r) and the padded GEMM operand (P, r + 2 rounded up to 8),
    plus the tile buffers."""
    per_row = num_locations * (rank + (rank + 2 + 7) // 8 * 8)
    return {"n": per_row, "m": per_row, "0": 3 * TILE_ELEMENTS}


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
    kernel : ``"laplace"``, ``"gaussian"`` or ``"ntk"``.
    sigma : bandwidth (Falkon's conventions), ignored by ``ntk``.
    weights : optional per-location weights ω (P,), non-negative; normalised to sum to 1.
    opt : ``falkon.FalkonOptions`` (or :class:`~falkon_convrfm.KernelOptions` without Falkon).
        ``keops_active``: ``"auto"`` uses KeOps for CUDA data when pykeops imports,
        ``"force"`` also on CPU, ``"no"`` never.
    """

    def __init__(
        self,
        M=None,
        image_shape=(3, 32, 32),
        patch_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        kernel: str = "laplace",
        sigma: float = 1.0,
        weights=None,
        opt=None,
    ):
        super().__init__("ConvMahalanobis", opt if opt is not None else make_options())
        if kernel not in BASE_KERNELS:
            raise ValueError(f"Unknown base kernel {kernel!r}; choose one of {BASE_KERNELS}")
        if kernel != "ntk" and not (isinstance(sigma, (int, float)) and np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        self.geometry = PatchGeometry(tuple(image_shape), patch_size, stride, padding)
        d = self.geometry.patch_dim
        self.base_kernel = kernel
        self.sigma = float(sigma)
        self.metric = torch.eye(d, dtype=torch.float64) if M is None else as_metric(M, d)
        self.factor = metric_factor(self.metric)
        self.weights = location_weights(weights, self.geometry.num_locations)
        self._cast_cache = {}

    # ------------------------------------------------------------------ helpers
    def _cast(self, like: torch.Tensor):
        """(L, ω) on ``like``'s device and dtype, cached."""
        key = (like.dtype, like.device)
        if key not in self._cast_cache:
            self._cast_cache[key] = (self.factor.to(like.device, like.dtype), self.weights.to(like.device, like.dtype))
        return self._cast_cache[key]

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """Lᵀx_p for every row and patch location, as (P, n, r)."""
        factor, _ = self._cast(X)
        return self.geometry.transform(X, factor)

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

    def _use_keops(self, X: torch.Tensor, opt) -> bool:
        mode = getattr(opt, "keops_active", "auto")
        if mode == "force":
            if not keops_available():
                raise ImportError("keops_active='force' but pykeops is not importable: `pip install pykeops`")
            return True
        return mode == "auto" and X.device.type == "cuda" and keops_available()

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
    def compute(self, X1: torch.Tensor, X2: torch.Tensor, out: torch.Tensor, diag: bool, **kwargs):
        """Fill ``out`` with K(X1, X2) (or its diagonal) for one block of rows, in place."""
        _, weights = self._cast(X1)
        T1, T2 = self.transform(X1), self.transform(X2)
        if diag:
            out.copy_(conv_kernel_diag(T1, T2, self.base_kernel, self.sigma, weights).reshape(out.shape))
            return out
        if out.is_contiguous():
            return conv_kernel_matrix(T1, T2, self.base_kernel, self.sigma, weights, out=out)
        out.copy_(conv_kernel_matrix(T1, T2, self.base_kernel, self.sigma, weights))
        return out

    def compute_sparse(self, X1, X2, out, diag, **kwargs):
        raise TypeError("ConvMahalanobisKernel needs dense image rows; sparse inputs are not supported")

    def extra_mem(self, is_differentiable, is_sparse, dtype, density1=None, density2=None):
        """Temporaries of :meth:`compute` in elements, see :func:`compute_temporaries`."""
        return compute_temporaries(self.geometry.num_locations, self.factor.shape[1])

    def _decide_mmv_impl(self, X1, X2, v, opt):
        if self._use_keops(X1, opt):
            return self._keops_mmv
        return super()._decide_mmv_impl(X1, X2, v, opt)

    def _decide_dmmv_impl(self, X1, X2, v, w, opt):
        if self._use_keops(X1, opt):
            return self._keops_dmmv
        return super()._decide_dmmv_impl(X1, X2, v, w, opt)

    def _keops_mmv(self, X1, X2, v, kernel=None, out=None, opt=None, **_):
        """K(X1, X2) v through KeOps, patch location as the batch dimension."""
        _, weights = self._cast(X1)
        budget = opt.max_gpu_mem if X1.device.type == "cuda" else opt.max_cpu_mem
        res = keops_conv_mmv(
            self.transform(X1), self.transform(X2), v, self.base_kernel, self.sigma, weights, budget
        )
        return res if out is None else out.copy_(res)

    def _keops_dmmv(self, X1, X2, v, w, kernel=None, out=None, opt=None, **_):
        """K(X1, X2)ᵀ (K(X1, X2) v + w) as two KeOps products."""
        inner = self._keops_mmv(X1, X2, v, opt=opt) if v is not None else 0
        inner = inner + w if w is not None else inner
        return self._keops_mmv(X2, X1, inner, out=out, opt=opt)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"kernel={self.base_kernel!r}, sigma={self.sigma:g}, image_shape={g.image_shape}, "
            f"patch_size={g.patch_size}, stride={g.stride}, padding={g.padding}, rank={self.factor.shape[1]}"
        )

    def __str__(self):
        return f"ConvMahalanobisKernel({self.extra_repr()})"
