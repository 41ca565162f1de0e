"""falkon-convrfm: learned-metric convolutional kernels (ConvRFM) for Falkon."""
from ._compat import HAS_FALKON, KernelOptions, keops_available
from .kernel import ConvMahalanobisKernel
from .metric import as_metric, metric_factor, normalise_trace, psd_power
from .patches import PatchGeometry
from .agop import patch_agop, patch_gradients
from .rfm import ConvRFM
from .viz import plot_filters, plot_history, plot_location_map
from .solvers import exact_ridge_fit, kernel_predict

__version__ = "0.1.0"

__all__ = [
    "HAS_FALKON",
    "ConvMahalanobisKernel",
    "ConvRFM",
    "KernelOptions",
    "PatchGeometry",
    "as_metric",
    "exact_ridge_fit",
    "kernel_predict",
    "keops_available",
    "metric_factor",
    "normalise_trace",
    "patch_agop",
    "patch_gradients",
    "plot_filters",
    "plot_history",
    "plot_location_map",
    "psd_power",
]
