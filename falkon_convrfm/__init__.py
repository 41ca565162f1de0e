"""falkon-convrfm: learned-metric convolutional kernels (ConvRFM) for Falkon.

Every public name is importable from here; Falkon is optional (``HAS_FALKON`` says whether it
imported), so importing the package never fails for lack of it.
"""
from ._compat import HAS_FALKON, KernelOptions
from .ops import keops_importable as keops_available
from .agop import patch_agop, patch_gradients
from .cnfa import cnfa_correlation, conv_patch_agop
from .collapse import nc1, nc2
from .datasets import (
    ImageDataset,
    load_cifar,
    load_dataset,
    load_image_folder,
    load_mnist,
    load_npz,
    load_svhn,
    make_local_signal,
)
from .deep import DeepConvRFM, DeepRFM, LayerSpec
from .deep_features import DeepPatchFeatureRFM, FeatureLayer
from .kernel import ConvMahalanobisKernel, median_patch_distance
from .inputs import channels_last_layout, image_rows, resolve_task, train_val_split
from .metric import (as_metric, fixed_metric, metric_factor, normalise_trace, psd_power, update_metric,
                     whitening_factor)
from .patches import PatchGeometry
from .planning import format_plan, plan_memory
from .feature_rfm import PatchFeatureRFM
from .models import load_model
from .preprocessing import Preprocessor, zca_whitening
from .rfm import ConvRFM
from .solvers import choose_solver, exact_ridge_fit, fit_kernel_machine, kernel_predict, nystrom_ridge_fit
from .viz import plot_filters, plot_history, plot_location_map

__version__ = "0.1.0"

__all__ = [
    "HAS_FALKON",
    "ConvMahalanobisKernel",
    "ConvRFM",
    "DeepConvRFM",
    "DeepPatchFeatureRFM",
    "DeepRFM",
    "ImageDataset",
    "FeatureLayer",
    "KernelOptions",
    "LayerSpec",
    "PatchFeatureRFM",
    "PatchGeometry",
    "Preprocessor",
    "as_metric",
    "channels_last_layout",
    "choose_solver",
    "cnfa_correlation",
    "conv_patch_agop",
    "exact_ridge_fit",
    "fit_kernel_machine",
    "fixed_metric",
    "format_plan",
    "image_rows",
    "kernel_predict",
    "keops_available",
    "load_cifar",
    "load_dataset",
    "load_image_folder",
    "load_mnist",
    "load_model",
    "load_npz",
    "load_svhn",
    "make_local_signal",
    "median_patch_distance",
    "metric_factor",
    "nc1",
    "nc2",
    "normalise_trace",
    "nystrom_ridge_fit",
    "patch_agop",
    "patch_gradients",
    "plan_memory",
    "plot_filters",
    "plot_history",
    "plot_location_map",
    "psd_power",
    "resolve_task",
    "train_val_split",
    "update_metric",
    "whitening_factor",
    "zca_whitening",
]
