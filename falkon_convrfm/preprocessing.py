r"""Train-fitted image preprocessing (scale, per-channel standardisation, ZCA) and the estimators' factory of it.

Statistics are computed on the training images only and reused, unchanged, on validation and
test images; :meth:`Preprocessor.state_dict` holds only tensors and plain Python data, so a
fitted preprocessor is saved and restored with ``torch.save`` / ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import numpy as np
import torch

from .inputs import pixels_as_float
from .validation import check_choice, positive_int, positive_number

__all__ = ["Preprocessor", "make_preprocessor", "preprocess_rows", "zca_whitening"]

PREPROCESSING = (None, "standardize", "zca")


def zca_whitening(x: torch.Tensor, eps: float, rows_per_chunk: int = 4096):
    r"""ZCA whitening of the rows of x (n, D): returns (μ, W) for x ↦ (x − μ) W.

    .. math::  C = \tfrac1n \sum_i (x_i − μ)(x_i − μ)^T = U Λ U^T, \qquad
               W = U (Λ + ε\,\bar λ\, I)^{-1/2} U^T, \quad \bar λ = \operatorname{tr}(C) / D

    The ridge is relative to the mean eigenvalue λ̄, so ``eps`` is scale-free: small ``eps``
    whitens fully (covariance → I), larger ``eps`` damps the low-variance (noisy) directions.
    C is accumulated in float64 over row chunks (no float64 copy of x) and diagonalised with
    ``torch.linalg.eigh``; μ and W are float64.
    """
    n = x.shape[0]
    mean = sum(chunk.double().sum(0) for chunk in x.split(rows_per_chunk)) / n
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in x.split(rows_per_chunk):
        centred = chunk.double() - mean
        cov.addmm_(centred.T, centred)
    evals, evecs = torch.linalg.eigh(cov / n)
    evals = evals.clamp_min(0)
    return mean, (evecs * (evals + eps * evals.mean()).rsqrt()) @ evecs.T


class Preprocessor:
    r"""Train-fitted image preprocessing: scale, per-channel standardisation, ZCA whitening.

    Applied in that order by :meth:`transform`:

    * ``scale``: uint8 input is divided by 255 (other dtypes are left as they are);
    * ``standardize``: x_c ↦ (x_c − m_c) / s_c with the mean m_c and standard deviation s_c of
      channel c over the training images and pixels (a constant channel is only centred);
    * ``zca``: full-image ZCA, x ↦ (x − μ) W on the flattened c·H·W vectors, with
      W = U (Λ + ε λ̄ I)^{-1/2} Uᵀ from the training covariance, ε = ``zca_eps`` relative to the
      mean eigenvalue λ̄ (see :func:`zca_whitening`); W is a D×D matrix, D = c·H·W.

    Input: (n, c, H, W) tensors or numpy arrays; output: float tensors of the input's dtype and
    device (integer input becomes float32). :meth:`state_dict` holds only tensors, bools, floats,
    lists and None, for ``torch.save`` / ``torch.load(weights_only=True)``.
    """

    def __init__(self, scale: bool = True, standardize: bool = True, zca: bool = False, zca_eps: float = 0.1):
        self.scale, self.standardize, self.zca = bool(scale), bool(standardize), bool(zca)
        self.zca_eps = positive_number("zca_eps", zca_eps)
        self.shape = self.mean = self.std = self.zca_mean = self.zca_matrix = None

    def _scaled(self, images) -> torch.Tensor:
        x = torch.as_tensor(images)
        if x.ndim != 4:
            raise ValueError(f"images must be (n, c, H, W), got shape {tuple(x.shape)}")
        if x.is_floating_point():
            return x
        return pixels_as_float(x, torch.float32) if self.scale else x.to(torch.float32)

    def _standardized(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1, 1, 1)
        return (x - self.mean.to(x).view(view)) / self.std.to(x).view(view)

    def fit(self, images) -> "Preprocessor":
        """Compute the statistics of the training images (n, c, H, W)."""
        x = self._scaled(images)
        self.shape = tuple(x.shape[1:])
        if self.standardize:
            std, mean = torch.std_mean(x, dim=(0, 2, 3), correction=0)
            self.mean, self.std = mean, torch.where(std > 0, std, torch.ones_like(std))
            x = self._standardized(x)
        if self.zca:
            self.zca_mean, self.zca_matrix = zca_whitening(x.reshape(len(x), -1), self.zca_eps)
        return self

    def transform(self, images) -> torch.Tensor:
        """Apply the fitted preprocessing to images of the training shape (c, H, W)."""
        if self.shape is None:
            raise RuntimeError("Preprocessor is not fitted: call fit() on the training images first")
        x = self._scaled(images)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"images have shape (c, H, W) = {tuple(x.shape[1:])}, fitted on {self.shape}")
        if self.standardize:
            x = self._standardized(x)
        if self.zca:
            flat = (x.reshape(len(x), -1) - self.zca_mean.to(x)) @ self.zca_matrix.to(x)
            x = flat.reshape(x.shape)
        return x

    def fit_transform(self, images) -> torch.Tensor:
        """:meth:`fit` on ``images``, then :meth:`transform` them."""
        return self.fit(images).transform(images)

    _STATE_KEYS = ("scale", "standardize", "zca", "zca_eps", "shape", "mean", "std", "zca_mean", "zca_matrix")

    def state_dict(self) -> dict:
        """Settings and fitted statistics: tensors, bools, a float, a list of ints or None."""
        state = {k: getattr(self, k) for k in self._STATE_KEYS}
        state["shape"] = None if self.shape is None else list(self.shape)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "Preprocessor":
        """Rebuild a Preprocessor from :meth:`state_dict` output (checked, as it may come from a file)."""
        missing = [k for k in cls._STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"Preprocessor state dict lacks keys {missing}")
        flags = {k: state[k] for k in ("scale", "standardize", "zca") if not isinstance(state[k], bool)}
        if flags:
            raise ValueError(f"Preprocessor state dict: scale, standardize and zca must be bools, got {flags}")
        pre = cls(state["scale"], state["standardize"], state["zca"], state["zca_eps"])
        shape = state["shape"]
        if shape is not None:
            if not (isinstance(shape, (list, tuple)) and len(shape) == 3):
                raise ValueError(f"Preprocessor state dict: 'shape' must be None or [c, H, W], got {shape!r}")
            pre.shape = tuple(positive_int("Preprocessor state dict 'shape' entry", s) for s in shape)
            c, d = pre.shape[0], int(np.prod(pre.shape))
            needed = {"mean": (c,), "std": (c,)} if pre.standardize else {}
            needed.update({"zca_mean": (d,), "zca_matrix": (d, d)} if pre.zca else {})
            for key, size in needed.items():
                value = state[key]
                if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == size):
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"Preprocessor state dict: {key!r} must be a float tensor of shape {size}, got {got}"
                    )
                setattr(pre, key, value)
        return pre


# ---------------------------------------------------------------------------- the estimators' step
def make_preprocessor(preprocess):
    """A :class:`Preprocessor` for the estimators' ``preprocess`` parameter (None: no transform):
    ``"standardize"`` (per-channel) or ``"zca"`` (standardise, then ZCA over whole images)."""
    check_choice("preprocess", preprocess, PREPROCESSING)
    if preprocess is None:
        return None
    return Preprocessor(scale=False, standardize=True, zca=preprocess == "zca")


def preprocess_rows(prep, rows: torch.Tensor, image_shape) -> torch.Tensor:
    """Apply a fitted preprocessor to image rows (identity when ``prep`` is None)."""
    if prep is None or rows.shape[0] == 0:
        return rows
    return prep.transform(rows.reshape(-1, *image_shape)).reshape(rows.shape[0], -1).to(rows.dtype).contiguous()
