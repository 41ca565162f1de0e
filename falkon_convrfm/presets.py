"""Named settings chosen from validation experiments (docs/results.md), per device kind.

A preset is a dict of estimator parameters; parameters given next to it override its values
(``PatchFeatureRFM.preset("cifar10", iterations=0)`` is the same pipeline with the fixed metric).
"""
from __future__ import annotations

# cifar10, cpu: the best one-layer setting whose fit on the 50 000-image training file (45 000
# train / 5 000 validation) stays within 30 minutes on a 2-core CPU; cuda: more atoms.
PRESETS = {
    "cifar10": {
        "cpu": {"patch_size": 6, "n_atoms": 1024, "pooling": 3, "kernel": "laplace", "metric": "whiten",
                "whiten_eps": 0.1, "iterations": 1, "agop_power": 0.5, "shrinkage": 0.0, "agop_samples": 1000,
                "penalty": 0.1, "penalty_grid": (0.1, 0.3, 1.0, 3.0, 10.0)},
        "cuda": {"patch_size": 6, "n_atoms": 4096, "pooling": 3, "kernel": "laplace", "metric": "whiten",
                 "whiten_eps": 0.1, "iterations": 1, "agop_power": 0.5, "shrinkage": 0.0, "agop_samples": 2000,
                 "penalty": 0.1, "penalty_grid": (0.1, 0.3, 1.0, 3.0, 10.0)},
    },
}


def preset_params(name: str, device: str = "cpu") -> dict:
    """The parameters of preset ``name`` for a device (``"cpu"`` or ``"cuda…"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return dict(PRESETS[name][kind], device=device)
