"""falkon-convrfm: learned-metric convolutional kernels (ConvRFM) for Falkon."""
from ._compat import HAS_FALKON, KernelOptions, keops_available
from .kernel import ConvMahalanobisKernel
from .metric import as_metric, metric_factor, normalise_trace, psd_power
from .patches import PatchGeometry
from .solvers import exact_ridge_fit, kernel_predict

__version__ = "0.1.0"

__all__ = [
    "HAS_FALKON",
    "ConvMahalanobisKernel",
    "KernelOptions",
    "PatchGeometry",
    "as_metric",
    "exact_ridge_fit",
    "kernel_predict",
    "keops_available",
    "metric_factor",
    "normalise_trace",
    "psd_power",
]
