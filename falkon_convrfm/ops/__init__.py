"""Backends that evaluate kernel blocks and kernel-vector products over pre-transformed patches
T (P, n, r): tiled torch (:mod:`.dense`), fused Triton (:mod:`.triton`), KeOps (:mod:`.keops`).
They only tile, chunk and reduce; the formulas come from :mod:`falkon_convrfm.base_kernels`."""
from .backends import BACKENDS, backend_report, choose_backend, keops_health, keops_importable, triton_status
from .dense import conv_kernel_diag, conv_kernel_matrix, dense_memory
from .keops import keops_conv_mmv, keops_memory

__all__ = [
    "BACKENDS",
    "backend_report",
    "choose_backend",
    "conv_kernel_diag",
    "conv_kernel_matrix",
    "dense_memory",
    "keops_conv_mmv",
    "keops_health",
    "keops_importable",
    "keops_memory",
    "triton_status",
]
