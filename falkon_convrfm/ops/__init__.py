"""Backends that evaluate kernel blocks and kernel-vector products over pre-transformed patches
T (P, n, r): tiled torch (:mod:`.dense`), fused Triton (:mod:`.triton`), KeOps (:mod:`.keops`),
each a :class:`~.interface.Backend` registered in :data:`BACKENDS`. They only tile, chunk and
reduce; the formulas come from :mod:`falkon_convrfm.base_kernels`."""
from .backends import (BACKEND_CHOICES, BACKENDS, backend_report, choose_backend, keops_health, keops_importable,
                       triton_status)
from .dense import conv_kernel_diag
from .interface import PRECISIONS, Backend, BackendOptions

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "Backend",
    "BackendOptions",
    "PRECISIONS",
    "backend_report",
    "choose_backend",
    "conv_kernel_diag",
    "keops_health",
    "keops_importable",
    "triton_status",
]
