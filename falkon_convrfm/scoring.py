"""Scores of predictions, one way for the fit's history, ``score`` and the command line.

Classification: the accuracy of decision codes (:func:`decision_codes`: the sign of a single ±1
column, else the argmax), read the same way from decision values and from encoded targets
(one-hot or ±1); regression: the mean squared error and the R² pooled over outputs,
1 − Σ(ŷ − y)² / Σ(y − ȳ)². Computed by scikit-learn's ``accuracy_score``, ``mean_squared_error``,
``r2_score`` and ``confusion_matrix``.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics


def decision_codes(values: torch.Tensor) -> np.ndarray:
    """Class codes of decision values or encoded targets (n, C): the sign of a single ±1 column
    (1 when > 0), else the argmax."""
    codes = (values[:, 0] > 0).long() if values.shape[1] == 1 else values.argmax(1)
    return codes.cpu().numpy()


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()


def regression_scores(pred: torch.Tensor, Y: torch.Tensor) -> dict:
    """mse (over every entry) and r2 (pooled over outputs; NaN for constant targets)."""
    pred, Y = _numpy(pred).reshape(len(pred), -1), _numpy(Y).reshape(len(Y), -1)
    return {"mse": float(metrics.mean_squared_error(Y, pred)),
            "r2": float(metrics.r2_score(Y, pred, multioutput="variance_weighted", force_finite=False))}


def accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """The share of class codes ``pred`` equal to ``true``."""
    return float(metrics.accuracy_score(true, pred))


def evaluate(task: str, scores: torch.Tensor, Y: torch.Tensor) -> dict:
    """Scores of decision values (n, C) against encoded targets: accuracy (classification;
    one-hot or ±1 targets) or mse and r2 (regression)."""
    if task == "classification":
        return {"accuracy": accuracy(decision_codes(Y), decision_codes(scores))}
    return regression_scores(scores, Y)


def class_scores(true: np.ndarray, pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy and confusion matrix (C[i, j]: true class i predicted as class j) of class codes
    in 0..n_classes − 1."""
    return {"accuracy": accuracy(true, pred),
            "confusion": metrics.confusion_matrix(true, pred, labels=np.arange(n_classes))}
