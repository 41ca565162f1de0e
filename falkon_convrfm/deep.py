r"""Deep ConvRFM: layers whose learned patch metrics become random convolutional feature maps.

Layer ℓ fits ConvRFM on feature maps x^ℓ (c_ℓ × H_ℓ × W_ℓ) and learns M_ℓ; the next maps are

.. math::  x^{ℓ+1} = \mathrm{pool}(φ(\mathrm{conv2d}(x^ℓ, W_ℓ))), \qquad W_ℓ = Z M_ℓ^{1/2},\;
           Z_{ij} \sim \mathcal N(0, 1/k)\ \text{iid} \;(k × d_ℓ)

so E[W_ℓᵀW_ℓ] = M_ℓ: the feature ansatz holds by construction. A ConvRFM on the last maps is
the classifier. With q = 1 on 1×1 "images" this is the fully connected Deep RFM
(:class:`DeepRFM`).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .estimator import SHARED_PARAMS, LearnedMetric, RFMEstimator
from .memory import chunk_rows, memory_budget, peak_rss
from .metric import psd_power
from .params import AnyOf, Integer, OneOf, Param, check_params, param_default, table
from .patches import PatchGeometry
from .persistence import data_fingerprint, plain_dataclass
from .progress import scoped, steps
from .rfm import ConvRFM
from .validation import DataWarning, as_tensor, positive_int

NONLINEARITIES = ("relu", "none")
# The fields of a LayerSpec that shape the feature map (the others are ConvRFM's parameters).
LAYER_PARAMS = table(
    Param("nonlinearity", OneOf(NONLINEARITIES), "φ of the feature map"),
    Param("pool", AnyOf((OneOf((None,)), Integer(1))), "average pooling of the feature map"),
    Param("width", Integer(1), "deep: filters per layer", "--width"),
)
_CONVRFM_PARAMS = tuple(p for p in inspect.signature(ConvRFM.__init__).parameters if p != "self")


def _conv(name: str):
    """ConvRFM's default of ``name``: the one source of the defaults shared with ConvRFM."""
    return param_default(ConvRFM, name)


@plain_dataclass
@dataclasses.dataclass
class LayerSpec:
    """One Deep ConvRFM layer: the ConvRFM that learns M_ℓ and the feature map built from it.

    The fields shared with :class:`ConvRFM` (patch geometry, the kernel's local pooling window
    ``pool_window``, kernel, sigma, iterations, agop_samples, agop_power, dc_weight) take
    ConvRFM's defaults and set the layer's ConvRFM; ``width`` (k filters), ``nonlinearity``
    (φ: ``"relu"`` or ``"none"``) and ``pool`` (average pooling of the feature map, None for none)
    shape the feature map.
    """

    patch_size: int = _conv("patch_size")
    stride: int = _conv("stride")
    padding: int = _conv("padding")
    pool_window: int = _conv("pool_window")
    width: int = 64
    nonlinearity: str = "relu"
    pool: int | None = 2
    kernel: str = _conv("kernel")
    sigma: float | str = _conv("sigma")
    iterations: int = _conv("iterations")
    agop_samples: int = _conv("agop_samples")
    agop_power: float = _conv("agop_power")
    dc_weight: float | str | None = _conv("dc_weight")

    def __post_init__(self):
        check_params(LAYER_PARAMS, self)

    def convrfm_params(self) -> dict:
        """The ConvRFM parameters this layer sets."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _CONVRFM_PARAMS}


def random_conv_filters(M: torch.Tensor, channels: int, patch_size: int, width: int, generator) -> torch.Tensor:
    """W = Z M^{1/2} as ``width`` conv2d filters (k, c, q, q), Z (k × d) iid N(0, 1/k)."""
    d = M.shape[0]
    Z = torch.randn(width, d, generator=generator, dtype=torch.float64) / width**0.5
    return (Z @ psd_power(M.to(torch.float64), 0.5)).reshape(width, channels, patch_size, patch_size)


def conv_feature_map(images: torch.Tensor, filters: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """pool(φ(conv2d(images, filters))) for a batch of images (n, c, H, W)."""
    out = F.conv2d(images, filters.to(images), stride=spec.stride, padding=spec.padding)
    if spec.nonlinearity == "relu":
        out = F.relu(out)
    if spec.pool and spec.pool > 1:
        out = F.avg_pool2d(out, spec.pool)
    return out


def map_rows(rows, image_shape, filters, spec: LayerSpec, max_memory=None):
    """Apply :func:`conv_feature_map` to image rows in chunks; returns (rows', image_shape')."""
    c, H, W = image_shape
    geo = PatchGeometry(image_shape, spec.patch_size, spec.stride, spec.padding)
    ho, wo = geo.out_shape
    out_shape = (filters.shape[0], ho // (spec.pool or 1), wo // (spec.pool or 1))
    if min(out_shape[1:]) < 1:
        raise ValueError(f"pooling {spec.pool} leaves no pixels of the {ho}×{wo} maps")
    per_image = c * H * W + 2 * filters.shape[0] * ho * wo  # elements: the input and two maps
    chunk = chunk_rows(memory_budget(max_memory), {"n": per_image}, rows.shape[0], 0, rows.element_size())
    out = rows.new_empty(rows.shape[0], int(np.prod(out_shape)))
    for i in range(0, rows.shape[0], chunk):
        out[i : i + chunk] = conv_feature_map(rows[i : i + chunk].reshape(-1, c, H, W), filters, spec).flatten(1)
    return out, out_shape


class DeepConvRFM(RFMEstimator):
    """Deep ConvRFM: ConvRFM layers turned into random convolutional feature maps, and a final
    ConvRFM classifier on the last maps.

    Parameters
    ----------
    layers : sequence of LayerSpec or dict, default (LayerSpec(),)
        One :class:`LayerSpec` (or a dict of its fields) per feature map.
    final : dict or None, default None
        :class:`ConvRFM` parameters for the classifier on the last maps (patch geometry,
        pool_window, kernel, sigma, iterations, ...; ConvRFM's defaults otherwise). Shared
        settings below fill in the rest.
    penalty, n_centres, solver, task, maxiter, validation_fraction, preprocess, dtype, device, max_memory, random_state, channels_last, progress
        As in :class:`ConvRFM` (same types and defaults, the rules of ``SHARED_PARAMS``), for
        every layer (preprocessing is applied once, to the input images; ``random_state=None``
        draws one seed for the whole model).
    checkpoint_dir : str, path or None, default None
        State is saved after every layer (and inside each layer's ConvRFM), so an interrupted fit
        resumes at the layer and iteration where it stopped.

    Attributes
    ----------
    filters_ : list of (k, c, q, q) filters, one per layer.  metrics_ : the M_ℓ they come from.
    final_ : the fitted final :class:`ConvRFM`.  history_ : per-layer dicts (ConvRFM history,
    time, peak memory, shapes).  image_shape_, feature_shapes_, classes_, task_, seed_.
    """

    _PARAMS = SHARED_PARAMS
    _FITTED = ("final_", "filters_", "metrics_", "history_", "image_shape_", "feature_shapes_", "preprocessor_",
               "task_", "classes_", "seed_")
    _CHECKPOINT = "deep_state.pt"

    def __init__(
        self,
        layers=(LayerSpec(),),
        final=None,
        penalty=_conv("penalty"),
        n_centres=_conv("n_centres"),
        solver=_conv("solver"),
        task=_conv("task"),
        maxiter=_conv("maxiter"),
        validation_fraction=_conv("validation_fraction"),
        preprocess=_conv("preprocess"),
        dtype=_conv("dtype"),
        device=_conv("device"),
        max_memory=_conv("max_memory"),
        random_state=_conv("random_state"),
        checkpoint_dir=_conv("checkpoint_dir"),
        channels_last=_conv("channels_last"),
        progress=_conv("progress"),
    ):
        self.layers = layers
        self.final = final
        self.penalty = penalty
        self.n_centres = n_centres
        self.solver = solver
        self.task = task
        self.maxiter = maxiter
        self.validation_fraction = validation_fraction
        self.preprocess = preprocess
        self.dtype = dtype
        self.device = device
        self.max_memory = max_memory
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.channels_last = channels_last
        self.progress = progress

    # ------------------------------------------------------------------ parameters
    def _specs(self):
        if isinstance(self.layers, (LayerSpec, dict, str)) or not hasattr(self.layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of LayerSpec (or dicts of its fields), got {self.layers!r}")
        return [s if isinstance(s, LayerSpec) else LayerSpec(**s) for s in self.layers]

    def _shared(self, name: str, task, seed) -> dict:
        """ConvRFM parameters every layer and the final model share; ``name``: its checkpoint folder.
        Their input is already preprocessed (once, by this model): ``preprocess=None``."""
        params = dict(penalty=self.penalty, n_centres=self.n_centres, solver=self.solver, task=task, maxiter=self.maxiter,
                      validation_fraction=self.validation_fraction, preprocess=None, dtype=self.dtype,
                      device=self.device, max_memory=self.max_memory, random_state=seed, progress=self.progress)
        if self.checkpoint_dir is not None:
            params["checkpoint_dir"] = os.path.join(self.checkpoint_dir, name)
        return params

    def _layer_params(self, spec: LayerSpec, index: int, shape, task, seed) -> dict:
        return dict(image_shape=shape, **spec.convrfm_params(), **self._shared(f"layer{index}", task, seed))

    def _final_params(self, shape, task, seed) -> dict:
        final = {} if self.final is None else self.final
        if not isinstance(final, dict):
            raise TypeError(f"final must be None or a dict of ConvRFM parameters, got {type(final).__name__}")
        unknown = [k for k in final if k not in _CONVRFM_PARAMS or k == "image_shape"]
        if unknown:
            raise ValueError(f"final has keys that are not ConvRFM parameters it may set: {unknown}")
        return {**self._shared("final", task, seed), **final, "image_shape": shape}

    def _layer_rfm(self, spec: LayerSpec, index: int, shape) -> ConvRFM:
        return ConvRFM(**self._layer_params(spec, index, shape, self.task_, self.seed_))

    def _final_rfm(self, shape) -> ConvRFM:
        return ConvRFM(**self._final_params(shape, self.task_, self.seed_))

    @staticmethod
    def _fit_inner(rfm: ConvRFM, X, Y, X_val, Y_val) -> ConvRFM:
        """Fit a layer's or the final ConvRFM; this model has given the warnings about the data
        (:class:`~falkon_convrfm.validation.DataWarning`), so the ConvRFM does not repeat them."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            return rfm.fit(X, Y, X_val, Y_val)

    def _check_params(self):
        """Every parameter, the layers' and the final model's, checked before any work; returns
        the layer specs."""
        super()._check_params()
        specs = self._specs()
        for index, spec in enumerate(specs):
            ConvRFM(**self._layer_params(spec, index, None, self.task, self.random_state))._check_params()
        ConvRFM(**self._final_params(None, self.task, self.random_state))._check_params()
        return specs

    # ------------------------------------------------------------------ fit
    @scoped
    def fit(self, X, y, X_val=None, y_val=None):
        """Learn every layer's metric, build its feature map, fit the final ConvRFM. Returns self."""
        specs = self._check_params()
        store = self._store()
        data = self._prepare(X, y, X_val, y_val, self._fit_seed(store))
        Xtr, Ytr, shape = data.Xtr, data.Ytr, data.image_shape
        Xval, Yval = (data.Xval, data.Yval) if data.Xval.shape[0] else (None, None)  # none: each ConvRFM keeps its last iterate
        gen = torch.Generator().manual_seed(self.seed_)
        self.filters_, self.metrics_, self.history_, self.feature_shapes_ = [], [], [], [shape]
        fingerprint = data_fingerprint(Xtr, Ytr, data.Xval)
        saved = store.load(fingerprint)
        for index, spec in enumerate(steps(specs, "Deep ConvRFM layers", unit="layer", leave=True)):
            if saved is not None and index < len(saved["filters"]):
                filters, M, record = saved["filters"][index].to(Xtr.device), saved["metrics"][index], saved["history"][index]
                torch.randn(spec.width, M.shape[0], generator=gen, dtype=torch.float64)  # keep the generator in step
            else:
                tic = time.perf_counter()
                with peak_rss() as mem:
                    rfm = self._fit_inner(self._layer_rfm(spec, index, shape), Xtr, Ytr, Xval, Yval)
                    M = rfm.M_
                    filters = random_conv_filters(M, shape[0], spec.patch_size, spec.width, gen).to(Xtr.device)
                record = {"layer": index, "input_shape": shape, "convrfm_history": rfm.history_,
                          "best_iteration": rfm.best_iteration_, "sigma": rfm.sigma_, "dc_weight": rfm.dc_weight_,
                          "time_layer": time.perf_counter() - tic, "peak_rss_gb": mem["peak"] / 2**30}
            Xtr, new_shape = map_rows(Xtr, shape, filters, spec, self.max_memory)
            Xval = None if Xval is None else map_rows(Xval, shape, filters, spec, self.max_memory)[0]
            shape = new_shape
            record["output_shape"] = shape
            self.filters_.append(filters)
            self.metrics_.append(M)
            self.history_.append(record)
            self.feature_shapes_.append(shape)
            store.save(fingerprint, self.seed_, {"filters": self.filters_, "metrics": self.metrics_, "history": self.history_})
        tic = time.perf_counter()
        with peak_rss() as mem:
            self.final_ = self._fit_inner(self._final_rfm(shape), Xtr, Ytr, Xval, Yval)
        self.history_.append({"layer": "final", "input_shape": shape, "convrfm_history": self.final_.history_,
                              "best_iteration": self.final_.best_iteration_, "sigma": self.final_.sigma_,
                              "dc_weight": self.final_.dc_weight_, "time_layer": time.perf_counter() - tic, "peak_rss_gb": mem["peak"] / 2**30})
        return self

    # ------------------------------------------------------------------ fitted model
    def learned_metric(self, layer: int | None = None) -> LearnedMetric:
        """The metric of feature layer ``layer`` (0 .. len(filters_) − 1; only the kept M of its
        ConvRFM is stored) or of the final ConvRFM (``layer`` = len(filters_), the default)."""
        self._check_fitted()
        last = len(self.filters_)
        layer = last if layer is None else positive_int("layer", layer, minimum=0)
        if layer > last:
            raise ValueError(f"layer {layer} is out of range: this {type(self).__name__} has layers 0..{last} "
                             f"({last} = the final ConvRFM)")
        if layer == last:
            return self.final_.learned_metric(f"layer {layer} (final ConvRFM)")
        record, spec = self.history_[layer], self._specs()[layer]
        best = record["best_iteration"]
        return LearnedMetric(f"layer {layer} (feature map)", {best: self.metrics_[layer]}, record["convrfm_history"],
                             best, tuple(record["input_shape"]), spec.patch_size, spec.stride, spec.padding)

    def _features(self, rows: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Feature maps of prepared rows after the first ``depth`` layers (all by default)."""
        shape = self.image_shape_
        for spec, filters in list(zip(self._specs(), self.filters_))[:depth]:
            rows, shape = map_rows(rows, shape, filters, spec, self.max_memory)
        return rows

    @scoped
    def transform(self, X, depth: int | None = None):
        """Feature maps of X after the first ``depth`` layers (all by default), as rows (numpy for
        numpy input, torch for torch input)."""
        if depth is not None:
            positive_int("depth", depth, minimum=0)
        return self._output(self._features(self._rows(X), depth), X)

    def _device(self) -> torch.device:
        return self.final_._device()

    def _scores(self, rows: torch.Tensor) -> torch.Tensor:
        return self.final_._scores(self._features(rows))

    def _to_device(self, device: torch.device) -> None:
        self.filters_ = [f.to(device) for f in self.filters_]
        self.final_.to(device)

    def _restore(self) -> None:
        """Nothing to rebuild: the final ConvRFM restores its own kernel."""


class DeepRFM(DeepConvRFM):
    """Fully connected Deep RFM: Deep ConvRFM with q = 1 on vectors seen as (D, 1, 1) images,
    x ↦ φ(W_ℓ x), W_ℓ = Z M_ℓ^{1/2}, layer after layer.

    ``widths`` gives k per layer; ``kernel``/``sigma``/``iterations``/``agop_samples`` apply to
    every layer and to the final RFM. Inputs are (n, D) arrays or tensors; the other parameters
    are those of :class:`DeepConvRFM`. A vector has no patch brightness: no DC handling
    (``dc_weight=None`` in every layer).
    """

    def __init__(self, widths=(256,), kernel=_conv("kernel"), sigma="median", iterations=1, agop_samples=2000,
                 nonlinearity="relu", penalty=_conv("penalty"), n_centres=_conv("n_centres"), solver=_conv("solver"),
                 task=_conv("task"), maxiter=_conv("maxiter"), validation_fraction=_conv("validation_fraction"),
                 preprocess=_conv("preprocess"), dtype=_conv("dtype"), device=_conv("device"),
                 max_memory=_conv("max_memory"), random_state=_conv("random_state"),
                 checkpoint_dir=_conv("checkpoint_dir"), progress=_conv("progress")):
        self.widths = widths
        self.kernel = kernel
        self.sigma = sigma
        self.iterations = iterations
        self.agop_samples = agop_samples
        self.nonlinearity = nonlinearity
        super().__init__(
            layers=None, final=None, penalty=penalty, n_centres=n_centres, solver=solver, task=task, maxiter=maxiter,
            validation_fraction=validation_fraction, preprocess=preprocess, dtype=dtype, device=device,
            max_memory=max_memory, random_state=random_state, checkpoint_dir=checkpoint_dir, progress=progress,
        )

    def _specs(self):
        if isinstance(self.widths, (str, bytes)) or not hasattr(self.widths, "__iter__"):
            raise TypeError(f"widths must be a sequence of layer widths, got {self.widths!r}")
        return [LayerSpec(patch_size=1, width=w, nonlinearity=self.nonlinearity, pool=None, kernel=self.kernel,
                          sigma=self.sigma, iterations=self.iterations, agop_samples=self.agop_samples, dc_weight=None)
                for w in self.widths]

    def _final_params(self, shape, task, seed) -> dict:
        return dict(image_shape=shape, patch_size=1, kernel=self.kernel, sigma=self.sigma, iterations=self.iterations,
                    agop_samples=self.agop_samples, dc_weight=None, **self._shared("final", task, seed))

    def _input_shape(self, X, name: str, fitted_shape=None):
        """Vectors (n, D) are (D, 1, 1) images."""
        shape = tuple(as_tensor(X, name).shape)
        if len(shape) != 2:
            raise ValueError(f"DeepRFM takes vectors (n, D), got {name} of shape {shape}")
        return fitted_shape if fitted_shape is not None else (shape[1], 1, 1)
