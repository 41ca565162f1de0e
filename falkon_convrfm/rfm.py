r"""ConvRFM: learn the patch metric of a convolutional kernel machine from its patch AGOP.

Loop (iteration 0 is the fixed kernel):  fit f = K_M(·, centres) α  →  G = patch AGOP of f
→  M ← update(G)  →  refit. The iterate with the best validation score is kept.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator
from tqdm.auto import tqdm

from ._compat import HAS_FALKON, require_falkon, resolve_device
from ._inputs import (
    encode_labels,
    image_rows,
    make_preprocessor,
    preprocess_rows,
    resolve_dtype,
    resolve_task,
    split_indices,
)
from .agop import patch_agop
from .kernel import ConvMahalanobisKernel
from .metric import fixed_metric, spectrum_summary, update_metric
from .ops import BASE_KERNELS
from .ops.dense import median_patch_distance
from .patches import PatchGeometry
from .solvers import fit_kernel_machine, solver_options

CHECKPOINT_NAME = "convrfm_checkpoint.pt"


def _fingerprint(*tensors) -> str:
    """A cheap content hash of the training data (shapes and a strided sample of values)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        flat = t.reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 100_000)].double().cpu().numpy().tobytes())
    return h.hexdigest()


def evaluate(task: str, scores: torch.Tensor, Y: torch.Tensor) -> dict:
    """Metrics of decision values against targets: accuracy (classification; one-hot or ±1
    targets) or mse and r2 (regression)."""
    if task == "classification":
        if scores.shape[1] == 1:  # binary ±1 coding
            correct = (scores[:, 0] > 0) == (Y[:, 0] > 0)
        else:
            correct = scores.argmax(1) == Y.argmax(1)
        return {"accuracy": correct.double().mean().item()}
    mse = (scores - Y).pow(2).mean().item()
    var = (Y - Y.mean(0)).pow(2).mean().item()
    return {"mse": mse, "r2": 1 - mse / var if var > 0 else float("nan")}


class ConvRFM(BaseEstimator):
    """Convolutional recursive feature machine with a Falkon (or exact) kernel solver.

    Parameters
    ----------
    image_shape : (c, H, W) or None
        Needed only when ``fit`` gets flat rows; inferred from 4-D / 3-D image input.
    patch_size, stride, padding : patch geometry of the kernel.
    kernel : ``"laplace"`` (default), ``"gaussian"`` or ``"ntk"``.
    sigma : bandwidth, or ``"median"`` for the median aligned-patch distance in the iteration-0
        metric (measured on training rows; the grid of ``tune`` multiplies it). The default 1.0 suits per-channel standardised pixels with trace-normalised
        M (tr M = d, so ‖u − v‖_M is on the scale of the Euclidean patch distance); for pixels in
        [0, 1] a smaller σ (≈ 0.3–0.5 for 3×3×3 patches) is the analogue. ``tune=True`` picks it.
    penalty : ridge λ (Falkon's convention, multiplied by n).
    n_centres : Nyström centres (the same rows at every iteration); ignored by ``solver='exact'``.
    iterations : number of metric updates T (T + 1 fits).
    agop_power : M ← normalise(G^power); 1 as in the original ConvRFM, 1/2 as in later RFMs.
    agop_samples : training rows on which the AGOP is estimated (default 10 000).
    dc_weight : None keeps the patch-brightness (DC) direction in G. A float w projects DC out of
        G and gives it the fixed weight w in M (also in the iteration-0 metric), see
        :func:`falkon_convrfm.metric.update_metric`; on natural images w ≈ 0.2 works well.
    shrinkage : λ ∈ [0, 1]; M ← (1 − λ) M + λ M_fixed.
    location_weights : if True, set ω_p ∝ tr_p^agop_power (where the model looks) at each update.
    solver : ``"auto"`` (Falkon when importable, else exact), ``"falkon"`` or ``"exact"``.
    loss : ``"squared"`` (one-hot ridge regression) or ``"logistic"`` (binary, LogisticFalkon).
    task : ``"auto"`` (integer labels → classification, float → regression), or explicit.
    validation_fraction : share of the training data held out (stratified) to select the best
        iterate when ``fit`` is not given validation data. Test data is never needed.
    preprocess : None, ``"standardize"`` (per channel) or ``"zca"`` (standardise, then ZCA
        whitening of whole images), fitted on the training split and applied again by ``predict``.
    tune : choose σ and λ on the validation split at iteration 0 from ``sigma_grid`` ×
        ``penalty_grid`` (factors applied to ``sigma`` / ``penalty``).
    maxiter : conjugate-gradient iterations of Falkon.
    dtype : ``"float32"`` or ``"float64"``.  device : ``"cpu"`` or ``"cuda"``.
    max_memory : bytes allowed for kernel blocks, K_nm storage and AGOP chunks (None: Falkon's
        default for the solver, 1 GiB chunks for the AGOP).
    random_state : int seed for splits, centres and AGOP rows.
    checkpoint_dir : if set, state is saved after every iteration and an interrupted ``fit``
        with the same data and parameters resumes from it.
    channels_last : ``fit``/``predict`` images are (n, H, W, c).
    progress : tqdm progress bars.

    Attributes
    ----------
    M_ : the best metric (by validation score).  weights_ : its location weights.
    kernel_ : the fitted :class:`ConvMahalanobisKernel`.  centres_, alpha_ : the predictor.
    history_ : list of per-iteration dicts (metrics, spectrum, timings).
    metrics_ : the metric M of every iteration (``metrics_[0]`` is the fixed one).
    best_iteration_, classes_, image_shape_, task_, sigma_, penalty_.
    """

    def __init__(
        self,
        image_shape=None,
        patch_size=3,
        stride=1,
        padding=0,
        kernel="laplace",
        sigma=1.0,
        penalty=1e-6,
        n_centres=2000,
        iterations=3,
        agop_power=1.0,
        agop_samples=10_000,
        dc_weight=None,
        shrinkage=0.0,
        location_weights=False,
        solver="auto",
        loss="squared",
        task="auto",
        validation_fraction=0.1,
        preprocess=None,
        tune=False,
        sigma_grid=(0.5, 1.0, 2.0),
        penalty_grid=(0.1, 1.0, 10.0),
        maxiter=20,
        dtype="float32",
        device="cpu",
        max_memory=None,
        random_state=None,
        checkpoint_dir=None,
        channels_last=False,
        progress=True,
    ):
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.stride = stride
        self.padding = padding
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

    # ------------------------------------------------------------------ validation
    def _check_params(self):
        def positive_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")

        if self.kernel not in BASE_KERNELS:
            raise ValueError(f"Unknown base kernel {self.kernel!r}; choose one of {BASE_KERNELS}")
        if self.sigma != "median" and not (isinstance(self.sigma, (int, float)) and np.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive number or 'median', got {self.sigma!r}")
        for name in ("penalty", "agop_power"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        positive_int("n_centres")
        positive_int("agop_samples")
        positive_int("maxiter")
        positive_int("iterations", minimum=0)
        if not 0 <= self.shrinkage <= 1:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage!r}")
        if self.dc_weight is not None and not self.dc_weight >= 0:
            raise ValueError(f"dc_weight must be None or >= 0, got {self.dc_weight!r}")
        if self.solver not in ("auto", "falkon", "exact"):
            raise ValueError(f"solver must be 'auto', 'falkon' or 'exact', got {self.solver!r}")
        if self.loss not in ("squared", "logistic"):
            raise ValueError(f"loss must be 'squared' or 'logistic', got {self.loss!r}")
        if self.solver == "falkon":
            require_falkon()
        resolve_dtype(self.dtype)
        resolve_device(self.device)
        make_preprocessor(self.preprocess)

    # ------------------------------------------------------------------ building blocks
    def _make_kernel(self, M, weights, sigma, image_shape):
        opt = solver_options(self.max_memory, self.device)
        return ConvMahalanobisKernel(
            M, image_shape, self.patch_size, self.stride, self.padding, self.kernel, sigma, weights, opt
        )

    def _solve(self, kernel, X, Y, centre_idx, penalty):
        solver = self.solver if self.solver != "auto" else ("falkon" if HAS_FALKON else "exact")
        options = solver_options(self.max_memory, self.device) if solver == "falkon" else None
        return fit_kernel_machine(kernel, X, Y, centre_idx, penalty, solver, self.loss, self.maxiter, options)

    def _initial_sigma(self, Xtr, M, image_shape, gen) -> float:
        """``sigma``, or with ``sigma='median'`` the median aligned-patch distance in the
        iteration-0 metric over (up to) 512 random training rows."""
        if self.sigma != "median":
            return float(self.sigma)
        rows = Xtr[torch.randperm(Xtr.shape[0], generator=gen)[:512].to(Xtr.device)]
        return median_patch_distance(self._make_kernel(M, None, 1.0, image_shape).transform(rows))

    def _score_key(self):
        return "accuracy" if self.task_ == "classification" else "r2"

    def _tune(self, data, image_shape, M):
        """(σ, λ) with the best validation score at the fixed metric, from the grids."""
        Xtr, Ytr, Xval, Yval, centre_idx = data
        sigmas = [self.sigma_] if self.kernel == "ntk" else [self.sigma_ * f for f in self.sigma_grid]
        best = None
        for sigma in sigmas:
            kernel = self._make_kernel(M, None, sigma, image_shape)
            for penalty in (self.penalty * f for f in self.penalty_grid):
                centres, alpha = self._solve(kernel, Xtr, Ytr, centre_idx, penalty)
                score = evaluate(self.task_, kernel.mmv(Xval, centres, alpha), Yval)[self._score_key()]
                self.tuning_.append({"sigma": sigma, "penalty": penalty, "val_" + self._score_key(): score})
                if best is None or score > best[0]:
                    best = (score, sigma, penalty)
        return best[1], best[2]

    # ------------------------------------------------------------------ fit
    def _prepare(self, X, y, X_val, y_val):
        """Validated, encoded, split, preprocessed data on the device, the image shape and the
        seeded generator for the later random choices."""
        dtype, device = resolve_dtype(self.dtype), resolve_device(self.device)
        rows, image_shape = image_rows(X, self.image_shape, self.channels_last, dtype)
        PatchGeometry(image_shape, self.patch_size, self.stride, self.padding)  # geometry errors early
        y_t = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
        self.task_ = resolve_task(y_t, self.task)
        Y, classes, codes = encode_labels(y_t, rows.shape[0], self.task_, dtype)
        if self.loss == "logistic":
            if self.task_ != "classification" or classes.numel() != 2:
                raise ValueError("loss='logistic' needs a binary classification problem (2 classes)")
            Y = (2 * Y[:, 1:] - 1).contiguous()  # ±1
        gen = torch.Generator().manual_seed(
            int(self.random_state) if self.random_state is not None else int(torch.randint(2**31, ()).item())
        )
        if X_val is None:
            tr, val = split_indices(rows.shape[0], self.validation_fraction, gen, codes)
            Xtr, Ytr, Xval, Yval = rows[tr], Y[tr], rows[val], Y[val]
        else:
            Xtr, Ytr = rows, Y
            Xval, _ = image_rows(X_val, image_shape, self.channels_last, dtype, name="X_val")
            Yval, _, _ = encode_labels(y_val, Xval.shape[0], self.task_, dtype, classes)
            if self.loss == "logistic":
                Yval = 2 * Yval[:, 1:] - 1
        self.preprocessor_ = make_preprocessor(self.preprocess)
        if self.preprocessor_ is not None:
            self.preprocessor_.fit(Xtr.reshape(-1, *image_shape))
            Xtr, Xval = (preprocess_rows(self.preprocessor_, t, image_shape) for t in (Xtr, Xval))
        if Xval.shape[0] == 0:
            warnings.warn("No validation data: the last iterate is kept (best_iteration_ = iterations)", stacklevel=3)
        Xtr, Ytr, Xval, Yval = (t.to(device) for t in (Xtr, Ytr, Xval, Yval))
        self.classes_, self.image_shape_ = classes, image_shape
        return Xtr, Ytr, Xval, Yval, image_shape, gen

    def fit(self, X, y, X_val=None, y_val=None):
        """Fit on images X (see ``image_shape`` / ``channels_last``) and labels or targets y.

        Validation data (for choosing the best iterate and for ``tune``) is ``X_val, y_val``
        if given, else a stratified ``validation_fraction`` of X. Returns self.
        """
        self._check_params()
        Xtr, Ytr, Xval, Yval, image_shape, gen = self._prepare(X, y, X_val, y_val)
        n = Xtr.shape[0]
        centre_idx = torch.randperm(n, generator=gen)[: min(self.n_centres, n)].sort().values
        agop_idx = torch.randperm(n, generator=gen)[: min(self.agop_samples, n)].sort().values
        d = PatchGeometry(image_shape, self.patch_size).patch_dim
        M, weights = fixed_metric(d, self.dc_weight), None
        self.sigma_, self.penalty_, self.tuning_ = self._initial_sigma(Xtr, M, image_shape, gen), float(self.penalty), []
        fingerprint = _fingerprint(Xtr, Ytr, Xval)
        state = self._load_checkpoint(fingerprint)
        if state is not None:
            start, M, weights, best = state["next"], state["M"], state["weights"], state["best"]
            self.history_, self.metrics_ = state["history"], state["metrics"]
            self.sigma_, self.penalty_, self.tuning_ = state["sigma"], state["penalty"], state["tuning"]
        else:
            start, best, self.history_, self.metrics_ = 0, None, [], []
            if self.tune and Xval.shape[0] > 0:
                self.sigma_, self.penalty_ = self._tune((Xtr, Ytr, Xval, Yval, centre_idx), image_shape, M)

        key = self._score_key()
        bar = tqdm(range(start, self.iterations + 1), desc="ConvRFM", disable=not self.progress, initial=start,
                   total=self.iterations + 1)
        for t in bar:
            record = {"iteration": t, "sigma": self.sigma_, "penalty": self.penalty_}
            tic = time.perf_counter()
            kernel = self._make_kernel(M, weights, self.sigma_, image_shape)
            centres, alpha = self._solve(kernel, Xtr, Ytr, centre_idx, self.penalty_)
            record["time_fit"] = time.perf_counter() - tic
            tic = time.perf_counter()
            Xa = Xtr[agop_idx]
            record.update({"train_" + k: v for k, v in evaluate(self.task_, kernel.mmv(Xa, centres, alpha), Ytr[agop_idx]).items()})
            if Xval.shape[0]:
                record.update({"val_" + k: v for k, v in evaluate(self.task_, kernel.mmv(Xval, centres, alpha), Yval).items()})
            record["time_eval"] = time.perf_counter() - tic
            record["spectrum"] = spectrum_summary(M)
            self.metrics_.append(M)
            score = record.get("val_" + key, -np.inf if Xval.shape[0] else t)
            if best is None or score > best["score"]:
                best = {"score": score, "iteration": t, "M": M, "weights": weights, "centres": centres.cpu(), "alpha": alpha.cpu()}
            if t < self.iterations:
                tic = time.perf_counter()
                G, share = patch_agop(kernel, centres, alpha, Xa, **self._agop_mem(), progress=self.progress)
                record["time_agop"] = time.perf_counter() - tic
                tic = time.perf_counter()
                M = update_metric(G, self.agop_power, self.dc_weight, self.shrinkage)
                if self.location_weights:
                    weights = share.clamp_min(0).pow(self.agop_power).cpu()
                record["time_update"] = time.perf_counter() - tic
                record["location_share"] = share.cpu().tolist()
            self.history_.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k.startswith("val_")})
            self._save_checkpoint(fingerprint, t + 1, M, weights, best)
        self._set_best(best)
        return self

    def _agop_mem(self):
        return {} if self.max_memory is None else {"max_mem": float(self.max_memory) / 4}

    def _set_best(self, best):
        self.best_iteration_ = best["iteration"]
        self.M_, self.weights_ = best["M"], best["weights"]
        self.centres_, self.alpha_ = best["centres"], best["alpha"]
        self.kernel_ = self._make_kernel(self.M_, self.weights_, self.sigma_, self.image_shape_)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_path(self):
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, CHECKPOINT_NAME)

    def _save_checkpoint(self, fingerprint, next_iteration, M, weights, best):
        path = self._checkpoint_path()
        if path is None:
            return
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        state = {
            "fingerprint": fingerprint, "params": self._checkpoint_params(), "next": next_iteration,
            "M": M, "weights": weights, "best": best, "history": self.history_, "metrics": self.metrics_,
            "sigma": self.sigma_, "penalty": self.penalty_, "tuning": self.tuning_,
        }
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a kill never leaves a half-written checkpoint

    def _checkpoint_params(self):
        return {k: v for k, v in self.get_params().items() if k not in ("progress", "checkpoint_dir")}

    def _load_checkpoint(self, fingerprint):
        path = self._checkpoint_path()
        if path is None or not os.path.exists(path):
            return None
        state = torch.load(path, weights_only=False)
        if state["fingerprint"] != fingerprint or state["params"] != self._checkpoint_params():
            warnings.warn(f"Ignoring checkpoint {path}: it was made with other data or parameters", stacklevel=3)
            return None
        return state

    # ------------------------------------------------------------------ predict
    def _check_fitted(self):
        if not hasattr(self, "M_"):
            raise RuntimeError("This ConvRFM is not fitted yet: call fit(X, y) first")

    def decision_function(self, X) -> torch.Tensor:
        """f(X) = K_M(X, centres) α (n, C): class scores or regression outputs."""
        self._check_fitted()
        rows, _ = image_rows(X, self.image_shape_, self.channels_last, resolve_dtype(self.dtype))
        rows = preprocess_rows(self.preprocessor_, rows, self.image_shape_).to(self.alpha_.device)
        return self.kernel_.mmv(rows, self.centres_.to(rows.dtype), self.alpha_.to(rows.dtype))

    def predict(self, X) -> torch.Tensor:
        """Class labels (classification) or real predictions (regression)."""
        scores = self.decision_function(X)
        if self.task_ == "regression":
            return scores.squeeze(1) if scores.shape[1] == 1 else scores
        codes = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(1)
        return self.classes_[codes.cpu()]

    def score(self, X, y) -> float:
        """Accuracy (classification) or R² (regression)."""
        pred = self.predict(X)
        y = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
        if self.task_ == "classification":
            return (pred == y.to(pred.dtype)).double().mean().item()
        y = y.to(pred.dtype).reshape(pred.shape)
        return 1 - ((pred - y) ** 2).sum().item() / ((y - y.mean(0)) ** 2).sum().item()

    # ------------------------------------------------------------------ persistence
    _FITTED = ("M_", "weights_", "centres_", "alpha_", "history_", "metrics_", "preprocessor_", "best_iteration_", "classes_",
               "image_shape_", "task_", "sigma_", "penalty_", "tuning_")

    def save(self, path) -> None:
        """Save parameters and fitted state (torch.save)."""
        self._check_fitted()
        torch.save({"class": type(self).__name__, "params": self.get_params(),
                    "fitted": {k: getattr(self, k) for k in self._FITTED}}, path)

    @classmethod
    def load(cls, path) -> "ConvRFM":
        """Load a model written by :meth:`save`."""
        state = torch.load(path, weights_only=False)
        if state.get("class") != cls.__name__:
            raise ValueError(f"{path} holds a {state.get('class')!r}, not a {cls.__name__}")
        model = cls(**state["params"])
        for k, v in state["fitted"].items():
            setattr(model, k, v)
        model.kernel_ = model._make_kernel(model.M_, model.weights_, model.sigma_, model.image_shape_)
        return model
