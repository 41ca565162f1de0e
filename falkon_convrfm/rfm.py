r"""ConvRFM: learn the patch metric of a convolutional kernel machine from its patch AGOP.

Loop (iteration 0 is the fixed kernel):  fit f = K_M(·, centres) α  →  G = patch AGOP of f
→  M ← update(G)  →  refit. The iterate with the best validation score is kept.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ._compat import resolve_device
from .agop import agop_memory_budget, patch_agop
from .base_kernels import BASE_KERNELS
from .estimator import SHARED_PARAMS, RFMEstimator, median_bandwidth, warn_few_locations, warn_tied_iterates
from .kernel import ConvMahalanobisKernel, median_patch_distance
from .metric import dc_direction, fixed_metric, spectrum_summary, update_metric
from .params import FACTORS, FLAG, IMAGE_SHAPE, AnyOf, Bandwidth, Integer, Interval, OddInteger, OneOf, Param, Positive, param_default, table
from .patches import PatchGeometry
from .persistence import data_fingerprint
from .progress import KERNEL_ENTRIES, phase, scoped, steps
from .scoring import evaluate
from .solvers import choose_solver, fit_kernel_machine, solver_options
from .validation import warn

CHECKPOINT_NAME = "convrfm_checkpoint.pt"
DATA_ROWS = 512  # training rows that set the data-adaptive defaults (σ, DC weight)
AUTO_DC_SHARE = 0.5  # dc_weight="auto" handles DC when it carries at least this share of patch distances²
AUTO_DC_WEIGHT = 0.2  # ... and then gives it this weight (docs/results.md, "Defaults")
DEGENERATE_ROWS = 256  # training rows of the iteration-0 degeneracy check
DEGENERATE_RTOL = 1e-6  # off-diagonal / diagonal (numerically diagonal) or spread / scale (constant)


def dc_distance_share(T: torch.Tensor) -> float:
    r"""Share of the squared aligned-patch distances that lies along the DC direction e = 1/√d,

    .. math::  s = \frac{\sum (e^T (T_{p,i} − T_{p,i+1}))^2}{\sum \lVert T_{p,i} − T_{p,i+1} \rVert^2}

    over consecutive rows i and every location p of patches T (P, n, d) (the pairs of
    :func:`~falkon_convrfm.kernel.median_patch_distance`). White noise gives s ≈ 1/d; natural
    images, whose neighbouring pixels move together, give s ≫ 1/d (measured: docs/results.md).
    """
    D = (T[:, 1:] - T[:, :-1]).double()
    total = D.pow(2).sum().item()
    return (D @ dc_direction(D.shape[-1]).to(D.device)).pow(2).sum().item() / total if total > 0 else 0.0


def auto_dc_weight(share: float) -> float | None:
    """``dc_weight="auto"``: ``AUTO_DC_WEIGHT`` when DC carries at least ``AUTO_DC_SHARE`` of the
    patch distances² (:func:`dc_distance_share`; natural images), else None (DC left in the AGOP)."""
    return AUTO_DC_WEIGHT if share >= AUTO_DC_SHARE else None


def degeneracy(K: torch.Tensor, rtol: float = DEGENERATE_RTOL) -> str | None:
    """``"diagonal"`` when every off-diagonal entry of the square kernel matrix K is within
    ``rtol`` of 0 relative to its mean diagonal, ``"constant"`` when all its entries lie within
    ``rtol``·max|K| of each other, else None."""
    K = K.double()
    scale = K.abs().max().item()
    if scale == 0 or K.max().item() - K.min().item() <= rtol * scale:
        return "constant"
    off = K - torch.diag_embed(K.diagonal())
    if K.shape[0] > 1 and off.abs().max().item() <= rtol * K.diagonal().abs().mean().item():
        return "diagonal"
    return None


# ConvRFM's own parameters (defaults: ConvRFM's signature); it also has SHARED_PARAMS.
CONVRFM_PARAMS = table(
    Param("image_shape", IMAGE_SHAPE, "(c, H, W) of flat-row input"),
    Param("patch_size", Integer(1), "patch side q", "--patch-size", "Q"),
    Param("stride", Integer(1), "patch stride", "--stride"),
    Param("padding", Integer(0), "zero padding", "--padding"),
    Param("pool_window", OddInteger(), "local pooling: compare each patch with the w×w neighbouring patches of "
          "the other image", "--pool-window", "W"),
    Param("kernel", OneOf(BASE_KERNELS), "base patch kernel", "--kernel"),
    Param("sigma", Bandwidth(), "bandwidth, or 'median'", "--sigma"),
    Param("agop_power", Positive(), "M = normalise(AGOP^P)", "--agop-power", "P"),
    Param("agop_samples", Integer(1), "training images the AGOP is estimated on", "--agop-samples", "N"),
    Param("iterations", Integer(0), "metric updates", "--iterations"),
    Param("shrinkage", Interval(0, 1), "M ← (1 − λ) M + λ M_fixed"),
    Param("dc_weight", AnyOf((Interval(0), OneOf(("auto", None)))),
          "weight w >= 0 of the patch-brightness (DC) direction in M, 'auto' (decided from the data) or 'none' "
          "(DC stays in the AGOP)", "--dc-weight", "W"),
    Param("location_weights", FLAG, "weight locations by their AGOP share"),
    Param("tune", FLAG, "choose σ and λ on the validation split"),
    Param("sigma_grid", FACTORS, "factors of sigma tried by tune"),
    Param("penalty_grid", FACTORS, "factors of penalty tried by tune"),
    Param("loss", OneOf(("squared", "logistic")), "loss of the kernel machine"),
)


class ConvRFM(RFMEstimator):
    """Convolutional recursive feature machine with a Falkon (or exact) kernel solver.

    Parameters
    ----------
    image_shape : tuple of 3 int or None, default None
        (c, H, W); needed only when ``fit`` gets flat rows, inferred from 4-D / 3-D image input.
    patch_size : int, default 3
        Patch side q.
    stride : int, default 1
        Patch stride.
    padding : int, default 0
        Zero padding.
    pool_window : int, default 1
        Odd w ≥ 1. Local pooling: patch p of one image is compared with the patches in the w×w
        window around p in the other (see :class:`ConvMahalanobisKernel`); 1 is the aligned
        kernel; the cost grows as w². A window wider than the patch grid needs (2·max(Ho, Wo) − 1
        for an Ho×Wo grid: every pair of locations) is clipped to it, with a warning: the kernel
        is the same.
    kernel : {"laplace", "gaussian", "ntk"}, default "laplace"
        Base patch kernel.
    sigma : float or "median", default "median"
        Bandwidth. ``"median"``: the median aligned-patch distance in the iteration-0 metric,
        measured on ``DATA_ROWS`` random training rows after preprocessing (the grid of ``tune``
        multiplies it). A number is taken as given; the fit warns (once) when it makes the
        iteration-0 kernel numerically diagonal (σ far too small: every image looks unrelated to
        every other) or constant (σ far too large), naming the median value.
    penalty : float, default 1e-06
        Ridge λ (Falkon's convention, multiplied by n).
    n_centres : int, default 2000
        Nyström centres of ``solver='falkon'`` / ``'nystrom'`` (the same rows at every iteration).
        The exact solver uses every training row: a value other than the default then warns, as
        does one above the number of training rows.
    iterations : int, default 3
        Number of metric updates T (T + 1 fits).
    agop_power : float, default 1.0
        M ← normalise(G^power); 1 as in the original ConvRFM, 1/2 as in later RFMs.
    agop_samples : int, default 10000
        Training rows on which the AGOP is estimated.
    dc_weight : "auto", None or float, default "auto"
        None keeps the patch-brightness (DC) direction in G. A float w ≥ 0 projects DC out of G
        and gives it the fixed weight w in M (also in the iteration-0 metric), see
        :func:`falkon_convrfm.metric.update_metric`. ``"auto"`` measures the share of the squared
        patch distances that lies along DC (:func:`dc_distance_share`, after preprocessing) and
        uses w = ``AUTO_DC_WEIGHT`` (0.2) when it is ≥ ``AUTO_DC_SHARE`` (0.5, natural images),
        else None (noise-like or sparse images); why: docs/results.md ("Defaults").
        ``dc_weight_`` holds the choice.
    shrinkage : float, default 0.0
        λ ∈ [0, 1]; M ← (1 − λ) M + λ M_fixed.
    location_weights : bool, default False
        If True, set ω_p ∝ tr_p^agop_power (where the model looks) at each update.
    solver : {"auto", "falkon", "exact", "nystrom"}, default "auto"
        ``"nystrom"``: Nyström by a direct solve, on any device. ``"auto"``: on the CPU Falkon
        when installed, else exact; on CUDA Falkon when its CUDA extension works, else nystrom
        (:func:`~falkon_convrfm.solvers.choose_solver`).
    loss : {"squared", "logistic"}, default "squared"
        One-hot ridge regression, or binary LogisticFalkon.
    task : {"auto", "classification", "regression"}, default "auto"
        ``"auto"``: labels of any hashable kind (integers, strings) and one-hot rows →
        classification; non-integer floats → regression, with a warning; see
        :func:`~falkon_convrfm.inputs.resolve_task`.
    validation_fraction : float, default 0.1
        Share of the training data held out (stratified) to select the best iterate when
        ``fit`` is not given validation data, in [0, 1). Test data is never needed.
    preprocess : {"standardize", None, "zca"}, default "standardize"
        Per-channel mean 0 and variance 1; none; or standardise, then ZCA whitening of whole
        images. Fitted on the training split and applied again by ``predict``.
    tune : bool, default False
        Choose σ and λ on the validation split at iteration 0 from ``sigma_grid`` ×
        ``penalty_grid`` (factors applied to ``sigma`` / ``penalty``).
    sigma_grid : tuple of float, default (0.5, 1.0, 2.0)
        Factors of σ tried by ``tune``.
    penalty_grid : tuple of float, default (0.1, 1.0, 10.0)
        Factors of λ tried by ``tune``.
    maxiter : int, default 20
        Conjugate-gradient iterations of Falkon.
    dtype : {"float32", "float64"}, default "float32"
        Floating-point precision.
    device : str, default "cpu"
        ``"cpu"`` or ``"cuda"``: where the fit runs and the fitted model predicts
        (``to(device)`` moves a fitted model).
    max_memory : float or None, default None
        Bytes allowed for kernel blocks, K_nm storage and AGOP chunks (None: Falkon's default for
        the solver, 1 GiB of AGOP chunks); the AGOP's share is :func:`agop_memory_budget`.
    random_state : int or None, default None
        Seed of the split, centres and AGOP rows; None: a fresh seed (see
        :mod:`falkon_convrfm.estimator`).
    checkpoint_dir : str, path or None, default None
        If set, state is saved after every iteration and an interrupted ``fit`` with the same
        data and parameters resumes from it.
    channels_last : {"auto", True, False}, default "auto"
        ``"auto"``: detect (n, H, W, c) arrays (an ambiguous shape is an error); True: images are
        (n, H, W, c); False: (n, c, H, W); see :func:`~falkon_convrfm.inputs.channels_last_layout`.
    progress : bool, default True
        tqdm progress bars.

    The rules of these parameters (types, ranges, choices) are declared once, in
    ``SHARED_PARAMS`` (:mod:`falkon_convrfm.estimator`) and ``CONVRFM_PARAMS``. ``predict`` and
    ``decision_function`` return numpy arrays for numpy input and tensors for torch input;
    ``save``/``load`` write and read tensors and plain data only.

    Attributes
    ----------
    M_ : the best metric (by validation score).  weights_ : its location weights.
    kernel_ : the fitted :class:`ConvMahalanobisKernel`.  centres_, alpha_ : the predictor.
    history_ : list of per-iteration dicts (metrics, spectrum, timings).
    metrics_ : the metric M of every iteration (``metrics_[0]`` is the fixed one).
    best_iteration_, classes_ (numpy array of the labels), image_shape_, task_, sigma_, penalty_,
    dc_weight_ (the DC weight used: ``dc_weight`` resolved), seed_ (the seed of the fit's random
    choices).
    """

    def __init__(
        self,
        image_shape=None,
        patch_size=3,
        stride=1,
        padding=0,
        pool_window=1,
        kernel="laplace",
        sigma="median",
        penalty=1e-6,
        n_centres=2000,
        iterations=3,
        agop_power=1.0,
        agop_samples=10_000,
        dc_weight="auto",
        shrinkage=0.0,
        location_weights=False,
        solver="auto",
        loss="squared",
        task="auto",
        validation_fraction=0.1,
        preprocess="standardize",
        tune=False,
        sigma_grid=(0.5, 1.0, 2.0),
        penalty_grid=(0.1, 1.0, 10.0),
        maxiter=20,
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
        self.pool_window = pool_window
        self.kernel = kernel
        self.sigma = sigma
        self.penalty = penalty
        self.n_centres = n_centres
        self.iterations = iterations
        self.agop_power = agop_power
        self.agop_samples = agop_samples
        self.dc_weight = dc_weight
        self.shrinkage = shrinkage
        self.location_weights = location_weights
        self.solver = solver
        self.loss = loss
        self.task = task
        self.validation_fraction = validation_fraction
        self.preprocess = preprocess
        self.tune = tune
        self.sigma_grid = sigma_grid
        self.penalty_grid = penalty_grid
        self.maxiter = maxiter
        self.dtype = dtype
        self.device = device
        self.max_memory = max_memory
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.channels_last = channels_last
        self.progress = progress

    _FITTED = ("M_", "weights_", "centres_", "alpha_", "history_", "metrics_", "preprocessor_", "best_iteration_",
               "classes_", "image_shape_", "task_", "sigma_", "penalty_", "dc_weight_", "tuning_", "seed_")
    _CHECKPOINT = CHECKPOINT_NAME

    _PARAMS = {**SHARED_PARAMS, **CONVRFM_PARAMS}

    # ------------------------------------------------------------------ validation
    def _check_params(self):
        super()._check_params()
        if self.solver == "falkon":
            choose_solver("falkon", resolve_device(self.device))  # Falkon missing: ImportError before any work

    def _warn_ignored(self, solver: str, n: int, n_val: int) -> None:
        """Warn about parameters whose values this fit cannot use."""
        cls = type(self)
        if solver == "exact" and self.n_centres != param_default(cls, "n_centres"):
            warn(f"n_centres={self.n_centres} is ignored by the exact solver, which uses all {n} training rows as centres")
        elif solver != "exact" and self.n_centres > n and self.n_centres != param_default(cls, "n_centres"):
            warn(f"n_centres={self.n_centres} is more than the {n} training rows: all {n} are centres")
        if not BASE_KERNELS[self.kernel].uses_sigma and self.sigma != param_default(cls, "sigma"):
            warn(f"sigma={self.sigma!r} is ignored by the {self.kernel} base kernel, which has no bandwidth")
        if solver in ("exact", "nystrom") and self.maxiter != param_default(cls, "maxiter"):
            warn(f"maxiter={self.maxiter} is ignored by the {solver} solver (a direct solve, no iterations)")
        if n_val == 0:
            warn("No validation data: the last iterate is kept (best_iteration_ = iterations)"
                 + ("; tune=True has nothing to tune on" if self.tune else ""))

    # ------------------------------------------------------------------ building blocks
    def _make_kernel(self, M, weights, sigma, image_shape):
        opt = solver_options(self.max_memory, self.device)
        return ConvMahalanobisKernel(
            M, image_shape, self.patch_size, self.stride, self.padding, self.kernel, sigma, weights, opt,
            pool_window=self.pool_window,
        )

    def _solve(self, kernel, X, Y, centre_idx, penalty):
        solver = choose_solver(self.solver, X.device)
        options = None if solver == "exact" else solver_options(self.max_memory, self.device)
        return fit_kernel_machine(kernel, X, Y, centre_idx, penalty, solver, self.loss, self.maxiter, options)

    def _data_defaults(self, rows, image_shape):
        """(DC weight, iteration-0 metric, median aligned-patch distance in it) from training
        ``rows``: ``dc_weight`` resolved (:func:`auto_dc_weight` for ``"auto"``), M its fixed metric."""
        kernel = self._make_kernel(None, None, 1.0, image_shape)
        T = kernel.patch_features(rows)
        dc_weight = self.dc_weight
        if isinstance(dc_weight, str):  # "auto"
            dc_weight = auto_dc_weight(dc_distance_share(T))
        M = fixed_metric(kernel.geometry.patch_dim, dc_weight)
        if dc_weight is not None:
            T = self._make_kernel(M, None, 1.0, image_shape).patch_features(rows)
        measurable = T.shape[1] > 1 or self.sigma == "median"  # one training row has no pairs (σ given: no need)
        return dc_weight, M, median_patch_distance(T) if measurable else math.nan

    def _warn_degenerate(self, kernel, rows, median: float) -> None:
        """Warn when the iteration-0 kernel matrix on ``rows`` is numerically diagonal or
        constant (:func:`degeneracy`), naming σ and the median aligned-patch distance."""
        if not kernel.base.uses_sigma or rows.shape[0] < 2:
            return
        rows = rows[:DEGENERATE_ROWS]
        shape = degeneracy(kernel(rows, rows))
        if shape is None:
            return
        cause = "too small: every image looks unrelated to every other" if shape == "diagonal" else \
            "too large: every pair of images looks the same"
        advice = ("this is the median aligned-patch distance, so the images themselves are degenerate "
                  "(check the preprocessing)" if math.isclose(self.sigma_, median, rel_tol=1e-6) or not median > 0
                  else f"try sigma={median:.4g}, the median aligned-patch distance (sigma='median')")
        warn(f"The iteration-0 kernel matrix on {rows.shape[0]} training rows is numerically {shape} with "
             f"sigma={self.sigma_:.4g} ({cause}); {advice}")

    def _score_key(self):
        return "accuracy" if self.task_ == "classification" else "r2"

    def _tune(self, data, image_shape, M):
        """(σ, λ) with the best validation score at the fixed metric, from the grids."""
        Xtr, Ytr, Xval, Yval, centre_idx = data
        sigmas = [self.sigma_ * f for f in self.sigma_grid] if BASE_KERNELS[self.kernel].uses_sigma else [self.sigma_]
        best = None
        grid = [(sigma, self.penalty * f) for sigma in sigmas for f in self.penalty_grid]
        for sigma, penalty in steps(grid, "tune σ, λ", unit="fit"):
            kernel = self._make_kernel(M, None, sigma, image_shape)
            centres, alpha = self._solve(kernel, Xtr, Ytr, centre_idx, penalty)
            score = evaluate(self.task_, kernel.mmv(Xval, centres, alpha), Yval)[self._score_key()]
            self.tuning_.append({"sigma": sigma, "penalty": penalty, "val_" + self._score_key(): score})
            if best is None or score > best[0]:
                best = (score, sigma, penalty)
        return best[1], best[2]

    # ------------------------------------------------------------------ fit
    def _check_image_shape(self, image_shape):
        """Geometry errors early; warnings for a grid of few locations and a window wider than it."""
        geometry = PatchGeometry(image_shape, self.patch_size, self.stride, self.padding)
        warn_few_locations(geometry)
        if self.pool_window > geometry.widest_window:
            ho, wo = geometry.out_shape
            warn(f"pool_window={self.pool_window} is wider than the {ho}×{wo} grid of patch locations: "
                 f"pool_window={geometry.widest_window} compares every pair of locations already and is used "
                 "instead (the same kernel, at a fraction of the cost)")

    def _prepare(self, X, y, X_val, y_val, seed):
        """The shared preparation (:meth:`RFMEstimator._prepare`), then ±1 targets for the
        logistic loss."""
        data = super()._prepare(X, y, X_val, y_val, seed)
        if self.loss == "logistic":
            if self.task_ != "classification" or len(self.classes_) != 2:
                raise ValueError("loss='logistic' needs a binary classification problem (2 classes)")
            data.Ytr, data.Yval = ((2 * t[:, 1:] - 1).contiguous() for t in (data.Ytr, data.Yval))
        return data

    @scoped
    def fit(self, X, y, X_val=None, y_val=None):
        """Fit on images X (see ``image_shape`` / ``channels_last``) and labels or targets y.

        Validation data (for choosing the best iterate and for ``tune``) is ``X_val, y_val``
        if given, else a stratified ``validation_fraction`` of X. Returns self.
        """
        self._check_params()
        store = self._store()
        seed = self._fit_seed(store)
        data = self._prepare(X, y, X_val, y_val, seed)
        Xtr, Ytr, Xval, Yval, image_shape, gen = (data.Xtr, data.Ytr, data.Xval, data.Yval, data.image_shape,
                                                 data.generator)
        n = Xtr.shape[0]
        self._warn_ignored(choose_solver(self.solver, Xtr.device), n, Xval.shape[0])
        centre_idx = torch.randperm(n, generator=gen)[: min(self.n_centres, n)].sort().values.to(Xtr.device)
        agop_idx = torch.randperm(n, generator=gen)[: min(self.agop_samples, n)].sort().values.to(Xtr.device)
        rows = Xtr[torch.randperm(n, generator=gen)[:DATA_ROWS].to(Xtr.device)]
        self.dc_weight_, M, median = self._data_defaults(rows, image_shape)
        weights = None
        self.sigma_ = median_bandwidth(median, "aligned-patch") if self.sigma == "median" else float(self.sigma)
        self.penalty_, self.tuning_ = float(self.penalty), []
        fingerprint = data_fingerprint(Xtr, Ytr, Xval)
        state = store.load(fingerprint)  # tensors on the CPU; the predictor goes to the fit device
        if state is not None:
            start, M, weights, best = state["next"], state["M"], state["weights"], state["best"]
            best["centres"], best["alpha"] = best["centres"].to(Xtr.device), best["alpha"].to(Xtr.device)
            self.history_, self.metrics_ = state["history"], state["metrics"]
            self.sigma_, self.penalty_, self.tuning_ = state["sigma"], state["penalty"], state["tuning"]
        else:
            start, best, self.history_, self.metrics_ = 0, None, [], []
            if self.tune and Xval.shape[0] > 0:
                self.sigma_, self.penalty_ = self._tune((Xtr, Ytr, Xval, Yval, centre_idx), image_shape, M)
            self._warn_degenerate(self._make_kernel(M, weights, self.sigma_, image_shape), rows, median)

        key = self._score_key()
        bar = steps(range(start, self.iterations + 1), "ConvRFM", self.iterations + 1, "iteration", start, leave=True)
        for t in bar:
            record = {"iteration": t, "sigma": self.sigma_, "penalty": self.penalty_}
            tic = time.perf_counter()
            kernel = self._make_kernel(M, weights, self.sigma_, image_shape)
            centres, alpha = self._solve(kernel, Xtr, Ytr, centre_idx, self.penalty_)
            record["time_fit"] = time.perf_counter() - tic
            tic = time.perf_counter()
            Xa = Xtr[agop_idx]
            with phase("evaluate", (Xa.shape[0] + Xval.shape[0]) * centres.shape[0], KERNEL_ENTRIES):
                record.update({"train_" + k: v for k, v in evaluate(self.task_, kernel.mmv(Xa, centres, alpha), Ytr[agop_idx]).items()})
                if Xval.shape[0]:
                    record.update({"val_" + k: v for k, v in evaluate(self.task_, kernel.mmv(Xval, centres, alpha), Yval).items()})
            record["time_eval"] = time.perf_counter() - tic
            record["spectrum"] = spectrum_summary(M)
            self.metrics_.append(M)
            score = record.get("val_" + key, -np.inf if Xval.shape[0] else t)
            if best is None or score > best["score"]:
                best = {"score": score, "iteration": t, "M": M, "weights": weights, "centres": centres, "alpha": alpha}
            if t < self.iterations:
                tic = time.perf_counter()
                G, share = patch_agop(kernel, centres, alpha, Xa, **agop_memory_budget(self.max_memory))
                record["time_agop"] = time.perf_counter() - tic
                tic = time.perf_counter()
                M = update_metric(G, self.agop_power, self.dc_weight_, self.shrinkage)
                if self.location_weights:
                    weights = share.clamp_min(0).pow(self.agop_power).cpu()
                record["time_update"] = time.perf_counter() - tic
                record["location_share"] = share.cpu().tolist()
            self.history_.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k.startswith("val_")})
            store.save(fingerprint, seed, {
                "next": t + 1, "M": M, "weights": weights, "best": best, "history": self.history_,
                "metrics": self.metrics_, "sigma": self.sigma_, "penalty": self.penalty_, "tuning": self.tuning_})
        self._set_best(best)
        warn_tied_iterates(self.history_, self.best_iteration_, key)
        return self

    def _set_best(self, best):
        self.best_iteration_ = best["iteration"]
        self.M_, self.weights_ = best["M"], best["weights"]
        self.centres_, self.alpha_ = best["centres"], best["alpha"]
        self._restore()

    # ------------------------------------------------------------------ fitted model
    def _device(self) -> torch.device:
        return self.alpha_.device

    def _scores(self, rows: torch.Tensor) -> torch.Tensor:
        """f(rows) = K_M(rows, centres) α (n, C), on the model's device."""
        with phase("predict", rows.shape[0] * self.centres_.shape[0], KERNEL_ENTRIES):
            return self.kernel_.mmv(rows, self.centres_.to(rows.dtype), self.alpha_.to(rows.dtype))

    def _to_device(self, device: torch.device) -> None:
        self.centres_, self.alpha_ = self.centres_.to(device), self.alpha_.to(device)

    def _restore(self) -> None:
        self.kernel_ = self._make_kernel(self.M_, self.weights_, self.sigma_, self.image_shape_)
