"""Kernel blocks and kernel-vector products over pre-transformed patches T (P, n, r)."""
from .dense import BASE_KERNELS, conv_kernel_diag, conv_kernel_matrix, ntk_profile, patch_kernel_pairs
from .keops import keops_conv_mmv

__all__ = [
    "BASE_KERNELS",
    "conv_kernel_diag",
    "conv_kernel_matrix",
    "keops_conv_mmv",
    "ntk_profile",
    "patch_kernel_pairs",
]
