"""Pictures: the learned filters (top eigenvectors of M), where the model looks, training curves."""
from __future__ import annotations

import numpy as np
import torch

from .patches import PatchGeometry


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def top_filters(M, image_shape, patch_size: int, k: int = 8):
    """Top-k eigenpairs of M as filters: (eigenvalues (k,), filters (k, c, q, q)), with each
    eigenvector's sign fixed so that its largest-magnitude entry is positive."""
    M = torch.as_tensor(M, dtype=torch.float64)
    c, q = tuple(image_shape)[0], patch_size
    if M.shape != (c * q * q, c * q * q):
        raise ValueError(f"M has shape {tuple(M.shape)}, expected ({c * q * q}, {c * q * q}) for c={c}, q={q}")
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    return evals, (evecs * sign).T.reshape(-1, c, q, q)


def plot_filters(M, image_shape, patch_size: int, k: int = 8, path=None, title: str | None = None):
    """Top-k eigenvectors of M as q×q×c images (RGB when c = 3, diverging grey-scale otherwise),
    each scaled to its own range, titled with its eigenvalue. Saves a PNG when ``path`` is given;
    returns the matplotlib figure."""
    plt = _pyplot()
    evals, filters = top_filters(M, image_shape, patch_size, k)
    k = filters.shape[0]
    fig, axes = plt.subplots(1, k, figsize=(1.6 * k, 2.0), squeeze=False)
    for ax, lam, f in zip(axes[0], evals.tolist(), filters):
        if f.shape[0] == 3:
            img = f.permute(1, 2, 0).numpy()
            lo, hi = img.min(), img.max()
            ax.imshow((img - lo) / (hi - lo + 1e-12), interpolation="nearest")
        else:
            lim = float(f.abs().max()) or 1.0
            ax.imshow(f[0].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"λ={lam:.3g}", fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_location_map(share, image_shape, patch_size: int, stride: int = 1, padding: int = 0, path=None):
    """Per-location AGOP share tr_p (where the model looks) on the grid of patch locations."""
    plt = _pyplot()
    geo = PatchGeometry(tuple(image_shape), patch_size, stride, padding)
    grid = np.asarray(share, dtype=float).reshape(geo.out_shape)
    fig, ax = plt.subplots(figsize=(3.2, 3.0))
    im = ax.imshow(grid / grid.sum(), cmap="viridis", interpolation="nearest")
    ax.set_title("AGOP share per patch location", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_history(history, path=None):
    """Train / validation metric per iteration from a ``history_`` list."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    its = [h["iteration"] for h in history]
    for key in sorted({k for h in history for k in h if k.startswith(("train_", "val_"))}):
        ax.plot(its, [h.get(key, np.nan) for h in history], marker="o", label=key)
    ax.set_xlabel("iteration (0 = fixed kernel)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
