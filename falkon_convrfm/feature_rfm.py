r"""PatchFeatureRFM: the recursive feature machine on explicit pooled patch features.

One iteration: encode every image as pooled patch codes Φ_M, triangle codes or Nyström features
(:class:`~falkon_convrfm.features.PatchFeatureMap`, metric M = L Lᵀ), fit a linear ridge head
on them (the penalty chosen on the validation split), take the patch AGOP G̃ of the fitted
predictor in the metric's coordinates and refine the metric, M ← L·[(1 − s)·G̃^p/… + s·I]·Lᵀ
(:func:`~falkon_convrfm.metric.refine_metric`). The starting metric is the patch-whitening
metric M₀ = (Σ + ε·λ̄·I)⁻¹ by default; the iterate with the best validation score is kept.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .base_kernels import BASE_KERNELS
from .estimator import COMMON_PARAMS, RFMEstimator, median_bandwidth, warn_few_locations, warn_tied_iterates
from .features import (ENCODINGS, PatchFeatureMap, RidgeStatistics, kmeans_atoms, median_atom_distance, pooling_matrix,
                       ridge_resident_bytes)
from .memory import machine_memory, memory_budget
from .metric import fixed_metric, metric_factor, patch_covariance, refine_metric, spectrum_summary, whitening_metric
from .params import FACTORS, IMAGE_SHAPE, POOLING, Bandwidth, Integer, Interval, OneOf, Param, Positive, table
from .patches import PatchGeometry
from .persistence import data_fingerprint
from .presets import preset_params
from .progress import scoped, steps
from .scoring import evaluate

CHECKPOINT_NAME = "patch_feature_rfm_checkpoint.pt"
# Training images whose patches give the covariance, the atoms and the median distance.
DATA_IMAGES = 2000
# Patches measured for the median patch-to-atom distance.
MEDIAN_PATCHES = 4000
METRICS = ("whiten", "identity", "dc")
DICTIONARIES = ("random", "kmeans")
# Patches k-means clusters, and its Lloyd iterations (dictionary="kmeans").
KMEANS_PATCHES = 200_000
KMEANS_ITERATIONS = 10
AUGMENTS = (None, "flip")
# Bytes of encoding and AGOP temporaries when max_memory is None (with max_memory: what the
# resident features and Gram leave of it).
DEFAULT_MEMORY = 2**30


def check_encoding(encoding: str, kernel: str, sigma) -> None:
    """A ValueError when kernel or sigma is set (not the default) for the triangle code, which has neither."""
    nystrom_only = [f"{name}={value!r}" for name, value, default in
                    (("kernel", kernel, "laplace"), ("sigma", sigma, "median")) if value != default]
    if encoding == "triangle" and nystrom_only:
        raise ValueError(f"{', '.join(nystrom_only)} sets the Nyström encoding; encoding='triangle' has no "
                         "kernel or bandwidth: drop it or use encoding='nystrom'")


def code_bandwidth(encoding: str, sigma, factor: torch.Tensor, atoms: torch.Tensor, patches: torch.Tensor):
    """σ of the Nyström code: the given value, or (``"median"``) the median patch-to-atom distance in
    the metric's coordinates Lᵀx; None for the triangle code."""
    if encoding == "triangle":
        return None
    if sigma != "median":
        return float(sigma)
    L = factor.to(atoms.device, atoms.dtype)
    return median_bandwidth(median_atom_distance(patches[:MEDIAN_PATCHES] @ L, atoms @ L), "patch-to-atom")


def flip_rows(rows: torch.Tensor, image_shape) -> torch.Tensor:
    """Images (rows) mirrored left–right."""
    return rows.reshape(-1, *image_shape).flip(-1).reshape(rows.shape[0], -1)


# PatchFeatureRFM's own parameters (defaults: its signature); it also has COMMON_PARAMS.
PATCH_FEATURE_PARAMS = table(
    Param("image_shape", IMAGE_SHAPE, "(c, H, W) of flat-row input"),
    Param("patch_size", Integer(1), "patch side q"),
    Param("stride", Integer(1), "patch stride"),
    Param("padding", Integer(0), "zero padding"),
    Param("n_atoms", Integer(1), "dictionary size k", "--atoms", "K"),
    Param("dictionary", OneOf(DICTIONARIES), "atoms: random training patches, or k-means centroids of them in the "
                                             "starting metric", "--dictionary"),
    Param("pooling", POOLING, "pooled regions: g (a g×g grid) or window,stride", "--pooling", "G"),
    Param("encoding", OneOf(ENCODINGS), "patch codes: nystrom (the kernel's Nyström features) or triangle "
                                         "(Coates & Ng, no kernel)", "--encoding"),
    Param("kernel", OneOf(BASE_KERNELS), "base patch kernel (nystrom)"),
    Param("sigma", Bandwidth(), "bandwidth, or 'median' (nystrom)"),
    Param("metric", OneOf(METRICS), "starting patch metric", "--metric"),
    Param("whiten_eps", Interval(0), "ε of the whitening metric, relative to the mean eigenvalue", "--whiten-eps", "EPS"),
    Param("iterations", Integer(0), "metric updates"),
    Param("agop_power", Positive(), "p of the update"),
    Param("shrinkage", Interval(0, 1), "s of the update"),
    Param("agop_samples", Integer(1), "training images the AGOP is estimated on"),
    Param("penalty", Positive(), "ridge λ"),
    Param("penalty_grid", FACTORS, "factors of penalty tried"),
    Param("augment", OneOf(AUGMENTS), "training-set augmentation (flip: add left-right mirrors)", "--augment"),
)


class PatchFeatureRFM(RFMEstimator):
    """Recursive feature machine on explicit whitened, pooled patch features (linear ridge head).

    Parameters
    ----------
    image_shape : tuple or None, default None
        (c, H, W); needed only when ``fit`` gets flat rows.
    patch_size : int, default 6
    stride, padding : int, default 1, 0
        Patch geometry.
    n_atoms : int, default 1024
        Dictionary size k.
    dictionary : {'random', 'kmeans'}, default 'random'
        The atoms: k random training patches, or the centroids of 10 Lloyd iterations of k-means on
        200 000 training patches in the starting metric's coordinates (Coates & Ng).
    pooling : int or (int, int), default 3
        g×g grid of average-pooled regions (2 = quadrants), or (window, stride) average pooling.
    encoding : {'triangle', 'nystrom'}, default 'triangle'
        Patch codes: ``"nystrom"``, the Nyström features κ(Lᵀx_p, LᵀA) K_AA^{-1/2} of the base
        kernel (with a complete dictionary, the implicit pooled kernel), or ``"triangle"``,
        max(0, z̄ − z_j) of the distances z_j = ‖Lᵀ(x_p − a_j)‖ (Coates & Ng; no kernel, no bandwidth).
    kernel : str, default "laplace"
        Base patch kernel κ (``"laplace"``, ``"gaussian"``, ``"ntk"``) of the Nyström encoding.
    sigma : float or "median", default "median"
        Bandwidth of the Nyström encoding; ``"median"``: the median patch-to-atom distance in the
        current metric, re-measured at every iteration.
    metric : str, default "whiten"
        Starting metric: ``"whiten"`` (M₀ = (Σ + ε·λ̄·I)⁻¹, Σ the training patches' covariance,
        λ̄ its mean eigenvalue), ``"identity"`` or ``"dc"`` (the DC-0.2 fixed metric).
    whiten_eps : float, default 0.1
        ε of the whitening metric, relative to λ̄.
    iterations : int, default 1
        Metric updates T (T + 1 fits).
    agop_power : float, default 0.5
        p of the update.
    shrinkage : float, default 0.0
        s of the update: the weight kept on the current metric.
    agop_samples : int, default 1000
        Training images the AGOP is estimated on.
    penalty : float, default 0.1
        Ridge λ relative to the mean feature variance (× n).
    penalty_grid : tuple of float, default (0.1, 0.3, 1.0, 3.0, 10.0)
        Factors of ``penalty`` tried; the best on the validation split is kept.
    augment : None or "flip", default None
        "flip" adds the left–right mirror of every training image (validation stays as given).
    max_memory : float or None, default None
        Bytes for the whole fit: the resident training and validation features and the ridge
        head's Gram matrix and factor (n·D·itemsize + 2·D²·8) must fit, the rest bounds the encoding
        and AGOP chunks. None: 1 GiB of chunks, and the fit refuses to start (a ValueError) when the
        resident part exceeds the available memory.
    task, validation_fraction, preprocess, dtype, device, random_state,
    checkpoint_dir, channels_last, progress
        As in :class:`~falkon_convrfm.ConvRFM`.

    Attributes
    ----------
    M_ : the kept metric.  feature_map_ : its :class:`PatchFeatureMap`.  coef_, intercept_ : the head.
    atoms_, sigma_, penalty_, best_iteration_, history_, metrics_, classes_, image_shape_, task_, seed_.
    """

    def __init__(
        self,
        image_shape=None,
        patch_size=6,
        stride=1,
        padding=0,
        n_atoms=1024,
        dictionary="random",
        pooling=3,
        encoding="triangle",
        kernel="laplace",
        sigma="median",
        metric="whiten",
        whiten_eps=0.1,
        iterations=1,
        agop_power=0.5,
        shrinkage=0.0,
        agop_samples=1000,
        penalty=0.1,
        penalty_grid=(0.1, 0.3, 1.0, 3.0, 10.0),
        augment=None,
        task="auto",
        validation_fraction=0.1,
        preprocess="standardize",
        dtype="float32",
        device="cpu",
        max_memory=None,
        random_state=None,
        checkpoint_dir=None,
        channels_last="auto",
        progress=True,
    ):
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.stride = stride
        self.padding = padding
        self.n_atoms = n_atoms
        self.dictionary = dictionary
        self.pooling = pooling
        self.encoding = encoding
        self.kernel = kernel
        self.sigma = sigma
        self.metric = metric
        self.whiten_eps = whiten_eps
        self.iterations = iterations
        self.agop_power = agop_power
        self.shrinkage = shrinkage
        self.agop_samples = agop_samples
        self.penalty = penalty
        self.penalty_grid = penalty_grid
        self.augment = augment
        self.task = task
        self.validation_fraction = validation_fraction
        self.preprocess = preprocess
        self.dtype = dtype
        self.device = device
        self.max_memory = max_memory
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.channels_last = channels_last
        self.progress = progress

    _PARAMS = {**PATCH_FEATURE_PARAMS, **COMMON_PARAMS}
    _FITTED = ("M_", "atoms_", "coef_", "intercept_", "sigma_", "penalty_", "history_", "metrics_", "preprocessor_",
               "best_iteration_", "classes_", "image_shape_", "task_", "seed_")
    _CHECKPOINT = CHECKPOINT_NAME

    @classmethod
    def preset(cls, name: str, device: str = "cpu", **overrides) -> "PatchFeatureRFM":
        """The estimator with preset ``name``'s parameters for ``device``
        (:data:`~falkon_convrfm.presets.PRESETS`), ``overrides`` replacing any of them."""
        return cls(**{**preset_params(name, device, "features"), **overrides})

    # ------------------------------------------------------------------ building blocks
    def _check_params(self):
        super()._check_params()
        check_encoding(self.encoding, self.kernel, self.sigma)

    def _geometry(self, image_shape) -> PatchGeometry:
        return PatchGeometry(image_shape, self.patch_size, self.stride, self.padding)

    def _check_image_shape(self, image_shape):
        geometry = self._geometry(image_shape)
        pooling_matrix(geometry.out_shape, self.pooling)
        warn_few_locations(geometry)

    def _start_metric(self, patches: torch.Tensor) -> torch.Tensor:
        d = patches.shape[-1]
        if self.metric == "whiten":
            return whitening_metric(patch_covariance(patches), self.whiten_eps)
        return fixed_metric(d, 0.2 if self.metric == "dc" else None)

    def _feature_map(self, M, atoms, sigma, image_shape) -> PatchFeatureMap:
        geometry = self._geometry(image_shape)
        dtype = atoms.dtype
        pool = pooling_matrix(geometry.out_shape, self.pooling).to(atoms.device, dtype)
        return PatchFeatureMap(geometry, metric_factor(M).to(atoms.device, dtype), atoms, BASE_KERNELS[self.kernel],
                               sigma, pool, encoding=self.encoding)

    def _bandwidth(self, M, atoms, patches) -> float | None:
        return code_bandwidth(self.encoding, self.sigma, metric_factor(M), atoms, patches)

    def _memory(self) -> float:
        return memory_budget(self.max_memory, self.device, default=DEFAULT_MEMORY)

    def _fit_budget(self, n_rows: int, n_features: int, itemsize: int) -> float:
        """Bytes left for encoding and AGOP temporaries once the features, Gram and factor are
        resident (:func:`~falkon_convrfm.features.ridge_resident_bytes`); a ValueError before any
        work when they alone exceed ``max_memory``, or the available memory when it is None."""
        resident = ridge_resident_bytes(n_rows, n_features, itemsize)
        limit = memory_budget(self.max_memory, self.device)
        limit, source = (limit, "max_memory") if np.isfinite(limit) else machine_memory(torch.device(self.device))
        if resident > limit:
            raise ValueError(f"the ridge head needs {resident / 2**30:.1f} GiB ({n_rows} × {n_features} features and two "
                             f"{n_features}² float64 matrices) but the {source} is {limit / 2**30:.1f} GiB: lower "
                             f"n_atoms or pooling, or train on fewer images")
        return self._memory() if self.max_memory is None else limit - resident

    # ------------------------------------------------------------------ fit
    @scoped
    def fit(self, X, y, X_val=None, y_val=None):
        """Fit on images X and labels or targets y; validation data as in :class:`ConvRFM`. Returns self."""
        self._check_params()
        store = self._store()
        seed = self._fit_seed(store)
        data = self._prepare(X, y, X_val, y_val, seed)
        Xtr, Ytr, Xval, Yval, image_shape, gen = (data.Xtr, data.Ytr, data.Xval, data.Yval, data.image_shape,
                                                 data.generator)
        n = Xtr.shape[0]
        geometry = self._geometry(image_shape)
        regions = pooling_matrix(geometry.out_shape, self.pooling).shape[0]
        budget = self._fit_budget(n * (2 if self.augment == "flip" else 1) + Xval.shape[0], regions * self.n_atoms,
                                  Xtr.element_size())
        sample = Xtr[torch.randperm(n, generator=gen)[:DATA_IMAGES].to(Xtr.device)]
        patches = geometry.patches(sample).reshape(-1, geometry.patch_dim)
        patches = patches[torch.randperm(patches.shape[0], generator=gen).to(Xtr.device)]
        if self.n_atoms > patches.shape[0]:
            raise ValueError(f"n_atoms={self.n_atoms} is more than the {patches.shape[0]} training patches sampled")
        start_metric = self._start_metric(patches)
        self.atoms_ = (patches[: self.n_atoms].clone() if self.dictionary == "random" else
                       kmeans_atoms(patches[:KMEANS_PATCHES], metric_factor(start_metric).to(patches.dtype),
                                    self.n_atoms, KMEANS_ITERATIONS))
        agop_idx = torch.randperm(n, generator=gen)[: min(self.agop_samples, n)].sort().values.to(Xtr.device)
        if self.augment == "flip":
            Xtr, Ytr = torch.cat([Xtr, flip_rows(Xtr, image_shape)]), torch.cat([Ytr, Ytr])
        fingerprint = data_fingerprint(Xtr, Ytr, Xval)
        state = store.load(fingerprint)
        if state is not None:
            start, M, best = state["next"], state["M"], state["best"]
            self.history_, self.metrics_ = state["history"], state["metrics"]
        else:
            start, M, best, self.history_, self.metrics_ = 0, start_metric, None, [], []
        key = "accuracy" if self.task_ == "classification" else "r2"
        bar = steps(range(start, self.iterations + 1), "PatchFeatureRFM", self.iterations + 1, "iteration", start,
                    leave=True)
        for t in bar:
            record = {"iteration": t, "train_rows": Xtr.shape[0]}
            tic = time.perf_counter()
            sigma = self._bandwidth(M, self.atoms_, patches)
            fmap = self._feature_map(M, self.atoms_, sigma, image_shape)
            F, Fval = fmap.transform(Xtr, budget), fmap.transform(Xval, budget)
            record.update(sigma=sigma, features=fmap.num_features, time_encode=time.perf_counter() - tic)
            tic = time.perf_counter()
            stats = RidgeStatistics.of(F, Ytr)
            fits = []
            for penalty in steps([self.penalty * f for f in self.penalty_grid], "ridge penalties", unit="fit"):
                W, b = stats.solve(penalty)
                scores = Fval.double() @ W + b
                fits.append((evaluate(self.task_, scores, Yval)[key] if Xval.shape[0] else -np.inf, penalty, W, b))
            val_score, penalty, W, b = max(fits, key=lambda f: f[0])
            record["penalty"] = penalty
            record.update({"train_" + k: v for k, v in evaluate(self.task_, F[agop_idx].double() @ W + b, Ytr[agop_idx]).items()})
            if Xval.shape[0]:
                record["val_" + key] = val_score
            record["time_solve"] = time.perf_counter() - tic
            record["spectrum"] = spectrum_summary(M)
            self.metrics_.append(M)
            score = val_score if Xval.shape[0] else t
            if best is None or score > best["score"]:
                best = {"score": score, "iteration": t, "M": M, "sigma": sigma, "penalty": penalty,
                        "coef": W.to(F.dtype), "intercept": b.to(F.dtype)}
            if t < self.iterations:
                tic = time.perf_counter()
                G = fmap.transformed_agop(Xtr[agop_idx], W.to(F.dtype), budget)
                M = refine_metric(fmap.factor, G, self.agop_power, self.shrinkage)
                record["time_agop"] = time.perf_counter() - tic
            self.history_.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k.startswith("val_")})
            store.save(fingerprint, seed, {"next": t + 1, "M": M, "best": best, "history": self.history_,
                                            "metrics": self.metrics_})
            del F, Fval, stats  # the next iteration's features take their place, not a second copy
        self.best_iteration_, self.M_, self.sigma_, self.penalty_ = best["iteration"], best["M"], best["sigma"], best["penalty"]
        self.coef_, self.intercept_ = best["coef"], best["intercept"]
        self._restore()
        warn_tied_iterates(self.history_, self.best_iteration_, key)
        return self

    # ------------------------------------------------------------------ fitted model
    def _device(self) -> torch.device:
        return self.coef_.device

    def _scores(self, rows: torch.Tensor) -> torch.Tensor:
        """f(rows) = Φ(rows) W + b (n, C)."""
        F = self.feature_map_.transform(rows.to(self.atoms_.dtype), self._memory())
        return F @ self.coef_ + self.intercept_

    def _to_device(self, device: torch.device) -> None:
        self.atoms_, self.coef_, self.intercept_ = (t.to(device) for t in (self.atoms_, self.coef_, self.intercept_))
        self._restore()

    def _restore(self) -> None:
        self.feature_map_ = self._feature_map(self.M_, self.atoms_, self.sigma_, self.image_shape_)
