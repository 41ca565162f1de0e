"""ConvRFM's data-adaptive defaults on CIFAR-10 against the ``tune=True`` grid (issue 10).

Data: the shared training file (``images`` (N, 32, 32, 3) uint8, ``labels``; the file is
shuffled). The first ``--n-train`` images train, the next ``--n-val`` validate; nothing else
is used. Every run uses Falkon with ``--centres`` Nyström centres and ``random_state=0``; the
rest is ConvRFM's defaults unless a preset overrides it:

    defaults     ConvRFM() as shipped: standardize, sigma="median", dc_weight="auto", 3 updates
    tune         the defaults with tune=True (σ × {0.5, 1, 2}, λ × {0.1, 1, 10} chosen on validation)
    dc-none      the defaults with dc_weight=None (DC left in the AGOP)
    dc-0.2       the defaults with dc_weight=0.2 (what "auto" picks on CIFAR-10)
    pre-issue-10 the former defaults: sigma=1.0, preprocess=None, dc_weight=None
    power-0.5    the defaults with agop_power=0.5 (M ∝ G^½: a softer update)
    shrink-0.5   the defaults with shrinkage=0.5 (M halfway back to the fixed metric)

Prints one JSON line per run (validation accuracy per iteration, the kept iterate, σ, the DC
weight, timings) and appends it to ``--out``:

    python examples/defaults_cifar10.py defaults tune dc-none pre-issue-10 --out /tmp/defaults.jsonl
"""
import argparse
import json
import time
from pathlib import Path

import torch

from falkon_convrfm import ConvRFM
from falkon_convrfm.datasets import load_npz

DEFAULT_DATA = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_train.npz")
PRESETS = {
    "defaults": {},
    "tune": {"tune": True},
    "dc-none": {"dc_weight": None},
    "dc-0.2": {"dc_weight": 0.2},
    "pre-issue-10": {"sigma": 1.0, "preprocess": None, "dc_weight": None},
    "power-0.5": {"agop_power": 0.5},
    "shrink-0.5": {"shrinkage": 0.5},
}


def run(preset: str, data, n_train: int, n_val: int, centres: int, patch_size: int, threads: int,
        checkpoint_dir=None) -> dict:
    torch.set_num_threads(threads)
    X, y = data.images, data.labels
    Xtr, ytr, Xval, yval = X[:n_train], y[:n_train], X[n_train:n_train + n_val], y[n_train:n_train + n_val]
    params = dict(patch_size=patch_size, n_centres=centres, solver="falkon", random_state=0, progress=False,
                  **PRESETS[preset])
    if checkpoint_dir is not None:  # a killed run resumes at its last finished iteration
        params["checkpoint_dir"] = str(Path(checkpoint_dir) / preset)
    tic = time.perf_counter()
    model = ConvRFM(**params).fit(Xtr, ytr, Xval, yval)
    seconds = time.perf_counter() - tic
    val = [h["val_accuracy"] for h in model.history_]
    return {"preset": preset, "params": {k: v for k, v in params.items() if k not in ("progress", "checkpoint_dir")},
            "n_train": n_train, "n_val": n_val, "sigma": model.sigma_, "penalty": model.penalty_,
            "dc_weight": model.dc_weight_, "val_accuracy": val, "fixed": val[0], "kept": val[model.best_iteration_],
            "best_iteration": model.best_iteration_, "tuning": model.tuning_, "seconds": seconds,
            "times": [{k: v for k, v in h.items() if k.startswith("time")} for h in model.history_]}


def emit(record: dict, path=None) -> None:
    """Print ``record`` as one JSON line and append it to ``path`` (if given)."""
    line = json.dumps(record)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="+", choices=tuple(PRESETS))
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--centres", type=int, default=1000)
    p.add_argument("--patch-size", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--checkpoint-dir", default=None, help="resume killed runs from checkpoints kept here")
    args = p.parse_args(argv)
    data = load_npz(args.data)
    for preset in args.presets:
        emit(run(preset, data, args.n_train, args.n_val, args.centres, args.patch_size, args.threads,
                 args.checkpoint_dir), args.out)


if __name__ == "__main__":
    main()
