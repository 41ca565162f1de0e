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
import hashlib
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from tqdm.auto import tqdm

from ._compat import resolve_device
from ._inputs import (
    encode_labels,
    image_rows,
    make_preprocessor,
    preprocess_rows,
    resolve_dtype,
    resolve_task,
    split_indices,
)
from .memory import peak_rss
from .metric import psd_power
from .patches import PatchGeometry
from .rfm import ConvRFM

NONLINEARITIES = ("relu", "none")


@dataclasses.dataclass
class LayerSpec:
    """One Deep ConvRFM layer: the ConvRFM that learns M_ℓ and the feature map built from it."""

    patch_size: int = 3
    stride: int = 1
    padding: int = 0
    width: int = 64
    nonlinearity: str = "relu"
    pool: int | None = 2
    kernel: str = "laplace"
    sigma: float | str = "median"
    iterations: int = 1
    agop_samples: int = 2000
    agop_power: float = 1.0
    dc_weight: float | None = None

    def __post_init__(self):
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {self.nonlinearity!r}")
        if self.pool is not None and (int(self.pool) != self.pool or self.pool < 1):
            raise ValueError(f"pool must be None or a positive integer, got {self.pool!r}")
        if int(self.width) != self.width or self.width < 1:
            raise ValueError(f"width must be a positive integer, got {self.width!r}")


def random_conv_filters(M: torch.Tensor, channels: int, patch_size: int, width: int, generator) -> torch.Tensor:
    """W = Z M^{1/2} as ``width`` conv2d filters (k, c, q, q), Z (k × d) iid N(0, 1/k)."""
    d = M.shape[0]
    Z = torch.randn(width, d, generator=generator, dtype=torch.float64) / width**0.5
    return (Z @ psd_power(M.to(torch.float64), 0.5)).reshape(width, channels, patch_size, patch_size)


def conv_feature_map(images: torch.Tensor, filters: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """pool(φ(conv2d(images, filters))) for a batch of images (n, c, H, W)."""
    out = F.conv2d(images, filters.to(images.dtype), stride=spec.stride, padding=spec.padding)
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
    per_image = (c * H * W + 2 * filters.shape[0] * ho * wo) * rows.element_size()
    chunk = rows.shape[0] if max_memory is None else max(1, int(max_memory // per_image))
    out = rows.new_empty(rows.shape[0], int(np.prod(out_shape)))
    for i in range(0, rows.shape[0], chunk):
        out[i : i + chunk] = conv_feature_map(rows[i : i + chunk].reshape(-1, c, H, W), filters, spec).flatten(1)
    return out, out_shape


class DeepConvRFM(BaseEstimator):
    """Deep ConvRFM: ConvRFM layers turned into random convolutional feature maps, and a final
    ConvRFM classifier on the last maps.

    Parameters
    ----------
    layers : sequence of :class:`LayerSpec` (or dicts of its fields), one per feature map.
    final : dict of :class:`ConvRFM` parameters for the classifier on the last maps (patch
        geometry, kernel, sigma, iterations, ...). Shared settings below fill in the rest.
    penalty, n_centres, solver, maxiter, validation_fraction, preprocess, dtype, device, max_memory, random_state, progress, channels_last
        As in :class:`ConvRFM`, for every layer (preprocessing is applied once, to the input
        images).
    checkpoint_dir : state is saved after every layer (and inside each layer's ConvRFM), so an
        interrupted fit resumes at the layer and iteration where it stopped.

    Attributes
    ----------
    filters_ : list of (k, c, q, q) filters, one per layer.  metrics_ : the M_ℓ they come from.
    final_ : the fitted final :class:`ConvRFM`.  history_ : per-layer dicts (ConvRFM history,
    time, peak memory, shapes).  image_shape_, feature_shapes_.
    """

    def __init__(
        self,
        layers=(LayerSpec(),),
        final=None,
        penalty=1e-6,
        n_centres=2000,
        solver="auto",
        maxiter=20,
        validation_fraction=0.1,
        preprocess=None,
        dtype="float32",
        device="cpu",
        max_memory=None,
        random_state=None,
        checkpoint_dir=None,
        channels_last=False,
        progress=True,
    ):
        self.layers = layers
        self.preprocess = preprocess
        self.final = final
        self.penalty = penalty
        self.n_centres = n_centres
        self.solver = solver
        self.maxiter = maxiter
        self.validation_fraction = validation_fraction
        self.dtype = dtype
        self.device = device
        self.max_memory = max_memory
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.channels_last = channels_last
        self.progress = progress

    def _specs(self):
        return [s if isinstance(s, LayerSpec) else LayerSpec(**s) for s in self.layers]

    def _shared(self, name: str):
        params = dict(penalty=self.penalty, n_centres=self.n_centres, solver=self.solver, maxiter=self.maxiter,
                      validation_fraction=self.validation_fraction,
                      dtype=self.dtype, device=self.device, max_memory=self.max_memory,
                      random_state=self.random_state, progress=self.progress)
        if self.checkpoint_dir is not None:
            params["checkpoint_dir"] = os.path.join(self.checkpoint_dir, name)
        return params

    def _layer_rfm(self, spec: LayerSpec, index: int, shape) -> ConvRFM:
        return ConvRFM(image_shape=shape, patch_size=spec.patch_size, stride=spec.stride, padding=spec.padding, kernel=spec.kernel,
                       sigma=spec.sigma, iterations=spec.iterations, agop_samples=spec.agop_samples,
                       agop_power=spec.agop_power, dc_weight=spec.dc_weight, **self._shared(f"layer{index}"))

    def _final_rfm(self, shape) -> ConvRFM:
        return ConvRFM(image_shape=shape, **{**self._shared("final"), **(self.final or {})})

    def _state_path(self):
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, "deep_state.pt")

    def _split(self, X, y, X_val, y_val):
        dtype = resolve_dtype(self.dtype)
        rows, shape = image_rows(X, None, self.channels_last, dtype)
        y = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
        task = resolve_task(y, "auto")
        _, classes, codes = encode_labels(y, rows.shape[0], task, dtype)
        if X_val is not None:
            Xv, _ = image_rows(X_val, shape, self.channels_last, dtype, name="X_val")
            yv = torch.as_tensor(np.asarray(y_val)) if not isinstance(y_val, torch.Tensor) else y_val
            encode_labels(yv, Xv.shape[0], task, dtype, classes)  # validates
            return rows, y, Xv, yv, shape
        gen = torch.Generator().manual_seed(int(self.random_state or 0))
        tr, val = split_indices(rows.shape[0], self.validation_fraction, gen, codes)
        return rows[tr], y[tr], rows[val], y[val], shape

    def fit(self, X, y, X_val=None, y_val=None):
        """Learn every layer's metric, build its feature map, fit the final ConvRFM. Returns self."""
        specs = self._specs()
        resolve_device(self.device)
        Xtr, ytr, Xval, yval, shape = self._split(X, y, X_val, y_val)
        self.image_shape_ = shape
        self.preprocessor_ = make_preprocessor(self.preprocess)
        if self.preprocessor_ is not None:
            self.preprocessor_.fit(Xtr.reshape(-1, *shape))
            Xtr, Xval = (preprocess_rows(self.preprocessor_, t, shape) for t in (Xtr, Xval))
        if Xval.shape[0] == 0:  # no validation data: each ConvRFM keeps its last iterate
            Xval, yval = None, None
        gen = torch.Generator().manual_seed(int(self.random_state or 0))
        self.filters_, self.metrics_, self.history_, self.feature_shapes_ = [], [], [], [shape]
        params = {k: v for k, v in self.get_params().items() if k not in ("progress", "checkpoint_dir")}
        fingerprint = hashlib.sha1(repr((Xtr.shape, float(Xtr[:100].sum()), specs, params)).encode()).hexdigest()
        saved = self._load_state(fingerprint)
        for index, spec in enumerate(tqdm(specs, desc="Deep ConvRFM layers", disable=not self.progress)):
            if saved is not None and index < len(saved["filters"]):
                filters, M, record = saved["filters"][index], saved["metrics"][index], saved["history"][index]
                torch.randn(spec.width, M.shape[0], generator=gen, dtype=torch.float64)  # keep the generator in step
            else:
                tic = time.perf_counter()
                with peak_rss() as mem:
                    rfm = self._layer_rfm(spec, index, shape).fit(Xtr, ytr, Xval, yval)
                    M = rfm.M_
                    filters = random_conv_filters(M, shape[0], spec.patch_size, spec.width, gen)
                record = {"layer": index, "input_shape": shape, "convrfm_history": rfm.history_,
                          "best_iteration": rfm.best_iteration_, "sigma": rfm.sigma_,
                          "time_layer": time.perf_counter() - tic, "peak_rss_gb": mem["peak"] / 2**30}
            Xtr, new_shape = map_rows(Xtr, shape, filters, spec, self.max_memory)
            Xval = None if Xval is None else map_rows(Xval, shape, filters, spec, self.max_memory)[0]
            shape = new_shape
            record["output_shape"] = shape
            self.filters_.append(filters)
            self.metrics_.append(M)
            self.history_.append(record)
            self.feature_shapes_.append(shape)
            self._save_state(fingerprint)
        tic = time.perf_counter()
        with peak_rss() as mem:
            self.final_ = self._final_rfm(shape).fit(Xtr, ytr, Xval, yval)
        self.history_.append({"layer": "final", "input_shape": shape, "convrfm_history": self.final_.history_,
                              "best_iteration": self.final_.best_iteration_, "sigma": self.final_.sigma_,
                              "time_layer": time.perf_counter() - tic, "peak_rss_gb": mem["peak"] / 2**30})
        return self

    def _save_state(self, fingerprint):
        path = self._state_path()
        if path is None:
            return
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        torch.save({"fingerprint": fingerprint, "filters": self.filters_, "metrics": self.metrics_,
                    "history": self.history_}, path + ".tmp")
        os.replace(path + ".tmp", path)

    def _load_state(self, fingerprint):
        path = self._state_path()
        if path is None or not os.path.exists(path):
            return None
        state = torch.load(path, weights_only=False)
        if state["fingerprint"] != fingerprint:
            warnings.warn(f"Ignoring {path}: it was made with other data or layers", stacklevel=3)
            return None
        return state

    # ------------------------------------------------------------------ predict
    def transform(self, X, depth: int | None = None) -> torch.Tensor:
        """Feature maps of X after the first ``depth`` layers (all by default), as rows."""
        if not hasattr(self, "final_"):
            raise RuntimeError("This DeepConvRFM is not fitted yet: call fit(X, y) first")
        rows, shape = image_rows(X, self.image_shape_, self.channels_last, resolve_dtype(self.dtype))
        rows = preprocess_rows(self.preprocessor_, rows, shape)
        for spec, filters in list(zip(self._specs(), self.filters_))[:depth]:
            rows, shape = map_rows(rows, shape, filters, spec, self.max_memory)
        return rows

    def decision_function(self, X) -> torch.Tensor:
        return self.final_.decision_function(self.transform(X))

    def predict(self, X) -> torch.Tensor:
        return self.final_.predict(self.transform(X))

    def score(self, X, y) -> float:
        return self.final_.score(self.transform(X), y)

    def save(self, path) -> None:
        """Save parameters, filters, metrics and the final ConvRFM's fitted state."""
        final = {k: getattr(self.final_, k) for k in ConvRFM._FITTED}
        torch.save({"class": type(self).__name__, "params": self.get_params(), "filters": self.filters_,
                    "metrics": self.metrics_, "history": self.history_, "image_shape": self.image_shape_,
                    "feature_shapes": self.feature_shapes_, "preprocessor": self.preprocessor_, "final_params": self.final_.get_params(),
                    "final": final}, path)

    @classmethod
    def load(cls, path):
        state = torch.load(path, weights_only=False)
        if state.get("class") != cls.__name__:
            raise ValueError(f"{path} holds a {state.get('class')!r}, not a {cls.__name__}")
        model = cls(**state["params"])
        model.filters_, model.metrics_, model.history_ = state["filters"], state["metrics"], state["history"]
        model.image_shape_, model.feature_shapes_ = state["image_shape"], state["feature_shapes"]
        model.preprocessor_ = state["preprocessor"]
        model.final_ = ConvRFM(**state["final_params"])
        for k, v in state["final"].items():
            setattr(model.final_, k, v)
        model.final_.kernel_ = model.final_._make_kernel(model.final_.M_, model.final_.weights_,
                                                         model.final_.sigma_, model.final_.image_shape_)
        return model


class DeepRFM(DeepConvRFM):
    """Fully connected Deep RFM: Deep ConvRFM with q = 1 on vectors seen as (D, 1, 1) images,
    x ↦ φ(W_ℓ x), W_ℓ = Z M_ℓ^{1/2}, layer after layer.

    ``widths`` gives k per layer; ``kernel``/``sigma``/``iterations``/``agop_samples`` apply to
    every layer and to the final RFM. Inputs are (n, D) arrays or tensors.
    """

    def __init__(self, widths=(256,), kernel="laplace", sigma="median", iterations=1, agop_samples=2000,
                 nonlinearity="relu", penalty=1e-6, n_centres=2000, solver="auto", maxiter=20,
                 validation_fraction=0.1, preprocess=None, dtype="float32", device="cpu", max_memory=None, random_state=None,
                 checkpoint_dir=None, progress=True):
        self.widths = widths
        self.kernel = kernel
        self.sigma = sigma
        self.iterations = iterations
        self.agop_samples = agop_samples
        self.nonlinearity = nonlinearity
        super().__init__(
            layers=None, final=None, penalty=penalty, n_centres=n_centres, solver=solver, maxiter=maxiter,
            validation_fraction=validation_fraction, preprocess=preprocess, dtype=dtype, device=device, max_memory=max_memory,
            random_state=random_state, checkpoint_dir=checkpoint_dir, progress=progress,
        )

    def _specs(self):
        return [LayerSpec(patch_size=1, width=w, nonlinearity=self.nonlinearity, pool=None, kernel=self.kernel,
                          sigma=self.sigma, iterations=self.iterations, agop_samples=self.agop_samples)
                for w in self.widths]

    def _final_rfm(self, shape):
        return ConvRFM(image_shape=shape, patch_size=1, kernel=self.kernel, sigma=self.sigma, iterations=self.iterations,
                       agop_samples=self.agop_samples, **self._shared("final"))

    @staticmethod
    def _as_images(X):
        X = torch.as_tensor(np.asarray(X)) if not isinstance(X, torch.Tensor) else X
        if X.dim() != 2:
            raise ValueError(f"DeepRFM takes vectors (n, D), got shape {tuple(X.shape)}")
        return X[:, :, None, None]

    def fit(self, X, y, X_val=None, y_val=None):
        return super().fit(self._as_images(X), y, None if X_val is None else self._as_images(X_val), y_val)

    def transform(self, X, depth=None):
        return super().transform(self._as_images(X), depth)
