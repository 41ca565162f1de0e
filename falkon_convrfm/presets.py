"""Named settings chosen from validation experiments (docs/results.md), per model and device kind.

A preset is a dict of estimator parameters; parameters given next to it override its values
(``PatchFeatureRFM.preset("cifar10", iterations=0)`` is the same pipeline with the fixed metric).
"""
from __future__ import annotations

# PRESETS[name][model][kind]: model as the CLI's --model names it, kind "cpu" or "cuda".
# cifar10 / features / cpu: the best one-layer setting whose fit on the 50 000-image training file
# (45 000 train / 5 000 validation) stays within 30 minutes on a 2-core CPU; cuda: more atoms.
# The λ grids bracket the λ the full-file fits chose (1e-3 and 3e-3 with 2 048 atoms).
PRESETS = {
    "cifar10": {
        "features": {
            "cpu": {"patch_size": 6, "n_atoms": 2048, "dictionary": "kmeans", "pooling": 3, "encoding": "triangle",
                    "metric": "whiten", "whiten_eps": 0.1, "iterations": 1, "agop_power": 0.5, "shrinkage": 0.0,
                    "agop_samples": 1000, "penalty": 0.001, "penalty_grid": (0.3, 1.0, 3.0, 10.0)},
            "cuda": {"patch_size": 6, "n_atoms": 4096, "dictionary": "kmeans", "pooling": 3, "encoding": "triangle",
                     "metric": "whiten", "whiten_eps": 0.1, "iterations": 1, "agop_power": 0.5, "shrinkage": 0.0,
                     "agop_samples": 2000, "penalty": 0.001, "penalty_grid": (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)},
        },
        # cifar10 / deep: DeepPatchFeatureRFM, two explicit feature layers, the best deep setting measured
        # on the full file (72.00 %, 11 min on this CPU, docs/results.md, issue 17); cuda: the same (not run on
        # a GPU). The λ grid is the measured one plus 3× below its lowest value, which the measured fit chose.
        "deep": {
            kind: {"layers": ({"patch_size": 3, "n_atoms": 256, "rank": None, "pool": (3, 2), "iterations": 1},
                              {"patch_size": 3, "n_atoms": 1024, "rank": 256, "pool": None, "iterations": 1}),
                   "pooling": 2, "dictionary": "kmeans", "encoding": "triangle", "metric": "whiten",
                   "whiten_eps": 0.1, "agop_samples": 1000, "penalty": 0.003,
                   "penalty_grid": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)}
            for kind in ("cpu", "cuda")
        },
    },
}


def preset_models(name: str) -> tuple:
    """The --model names preset ``name`` has settings for."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return tuple(PRESETS[name])


def preset_params(name: str, device: str = "cpu", model: str = "features") -> dict:
    """The parameters of preset ``name`` for ``model`` on a device (``"cpu"`` or ``"cuda…"``)."""
    models = preset_models(name)
    if model not in models:
        raise ValueError(f"--preset {name} has settings for --model {' / '.join(models)}, not --model {model}")
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return dict(PRESETS[name][model][kind], device=device)
