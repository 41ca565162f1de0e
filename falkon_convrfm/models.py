"""Every estimator of the package, and :func:`load_model`, which loads a saved model of any of them.

The one module that imports all estimator classes: loading dispatches on the class name a file
holds (:func:`~falkon_convrfm.persistence.estimator_class`), among the classes registered by
importing them here.
"""
from __future__ import annotations

from .deep import DeepConvRFM, DeepRFM
from .deep_features import DeepPatchFeatureRFM
from .feature_rfm import PatchFeatureRFM
from .persistence import estimator_class, file_name, read_file
from .rfm import ConvRFM

ESTIMATORS = (ConvRFM, DeepConvRFM, DeepPatchFeatureRFM, DeepRFM, PatchFeatureRFM)


def load_model(path, map_location="cpu"):
    """Load any model written by ``save`` (ConvRFM, DeepConvRFM, DeepPatchFeatureRFM, DeepRFM,
    PatchFeatureRFM), whatever its class; tensors on ``map_location`` (default the CPU)."""
    state = read_file(path, map_location, "model file")
    return estimator_class(state, file_name(path))._from_state(state, file_name(path))
