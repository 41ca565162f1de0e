"""Pictures: the learned filters (top eigenvectors of M), where the model looks, training curves."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .patches import PatchGeometry
from .persistence import atomic_file
from .validation import positive_int


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Write ``fig`` to exactly ``path`` (format from its suffix, else png; a file object as png)
    through :func:`~falkon_convrfm.persistence.atomic_file`: a failure leaves no partial picture."""
    suffix = os.path.splitext(os.fspath(path))[1][1:].lower() if isinstance(path, (str, os.PathLike)) else ""
    with atomic_file(path, "figure") as f:
        fig.savefig(f, format=suffix or None, dpi=120)


def top_filters(M, image_shape, patch_size: int, k: int = 8):
    """Top-k eigenpairs of M as filters: (eigenvalues (k,), filters (k, c, q, q)), with each
    eigenvector's sign fixed so that its largest-magnitude entry is positive."""
    M = torch.as_tensor(M, dtype=torch.float64)
    c, q = tuple(image_shape)[0], patch_size
    d = c * q * q
    if M.shape != (d, d):
        raise ValueError(f"M has shape {tuple(M.shape)}, expected ({d}, {d}) for c={c}, q={q}")
    if positive_int("k", k) > d:
        raise ValueError(f"k must be in 1..{d} (the patch dimension c·q²), got {k}")
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    return evals, (evecs * sign).T.reshape(-1, c, q, q)


def describe_iterate(history, best_iteration: int, iteration: int | None = None) -> str:
    """Which iterate a picture shows: "M of iteration 2 (best on validation)", "M of iteration 0
    (fixed; the last, no validation data)", "M of iteration 1 (not the kept iterate 2)".
    ``iteration`` defaults to the kept one, ``best_iteration``."""
    iteration = best_iteration if iteration is None else iteration
    notes = ["fixed"] if iteration == 0 else []
    if iteration != best_iteration:
        notes.append(f"not the kept iterate {best_iteration}")
    elif any(k.startswith("val_") for h in history for k in h):
        notes.append("best on validation")
    else:
        notes.append("the last, no validation data")
    return f"M of iteration {iteration} ({'; '.join(notes)})"


def filter_image(f: torch.Tensor):
    """(image, ``imshow`` options) of one filter (c, q, q): RGB scaled to [0, 1] when c = 3,
    otherwise its c channels as q×q tiles in a near-square grid (blank gaps between them) on one
    diverging scale symmetric about 0."""
    c, q = f.shape[0], f.shape[1]
    if c == 3:
        img = f.permute(1, 2, 0).numpy()
        lo, hi = img.min(), img.max()
        return (img - lo) / (hi - lo + 1e-12), {}
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    grid = np.full((rows * (q + 1) - 1, cols * (q + 1) - 1), np.nan)
    for i in range(c):
        r, s = divmod(i, cols)
        grid[r * (q + 1) : r * (q + 1) + q, s * (q + 1) : s * (q + 1) + q] = f[i].numpy()
    lim = float(np.nanmax(np.abs(grid))) or 1.0
    return grid, {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}


def plot_filters(M, image_shape, patch_size: int, k: int = 8, path=None, title: str | None = None):
    """Top-k eigenvectors of M as filters (see :func:`filter_image`), each on its own scale and
    titled with its eigenvalue. Saves a figure when ``path`` is given; returns it."""
    plt = _pyplot()
    evals, filters = top_filters(M, image_shape, patch_size, k)
    k = filters.shape[0]
    side = 1.6 if filters.shape[1] in (1, 3) else 2.2
    fig, axes = plt.subplots(1, k, figsize=(side * k, side + 0.6), squeeze=False, layout="constrained")
    for ax, lam, f in zip(axes[0], evals.tolist(), filters):
        img, options = filter_image(f)
        ax.imshow(img, interpolation="nearest", **options)
        ax.set_title(f"λ={lam:.3g}", fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_location_map(share, image_shape, patch_size: int, stride: int = 1, padding: int = 0, path=None,
                      title: str = "AGOP share per patch location"):
    """Per-location AGOP share tr_p (where the model looks) on the grid of patch locations."""
    plt = _pyplot()
    geo = PatchGeometry(tuple(image_shape), patch_size, stride, padding)
    grid = np.asarray(share, dtype=float).reshape(geo.out_shape)
    fig, ax = plt.subplots(figsize=(3.6, 3.4), layout="constrained")
    im = ax.imshow(grid / grid.sum(), cmap="viridis", interpolation="nearest")
    ax.set_title(title, fontsize=8, wrap=True)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_history(history, path=None, best_iteration: int | None = None, title: str | None = None):
    """Train / validation metric per iteration from a ``history_`` list; a dashed line marks
    ``best_iteration`` (the kept iterate) when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 3.2), layout="constrained")
    its = [h["iteration"] for h in history]
    for key in sorted({k for h in history for k in h if k.startswith(("train_", "val_"))}):
        ax.plot(its, [h.get(key, np.nan) for h in history], marker="o", label=key)
    if best_iteration is not None:
        ax.axvline(best_iteration, color="grey", linestyle="--", label=f"kept: iteration {best_iteration}")
    ax.set_xticks(its)
    ax.set_xlabel("iteration (0 = fixed kernel)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig
