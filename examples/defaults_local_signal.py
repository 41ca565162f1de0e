"""ConvRFM's data-adaptive defaults on a local-signal task of 32×32×3 noise images (issue 10).

Task (``falkon_convrfm.datasets.make_local_signal``): Gaussian noise (σ = ``--noise``), a plus of
side ``--pattern`` added to every channel of half the images at a uniformly random place; the
first ``--n`` images train, the next ``--n`` validate (seed 0). Every run uses the exact solver,
``patch_size=--patch`` and ``random_state=0``; the rest is ConvRFM's defaults unless a preset
overrides it:

    defaults      ConvRFM() as shipped: standardize, sigma="median", dc_weight="auto", 3 updates
    dc-0.2        the defaults with dc_weight=0.2 (what "auto" picks on natural images)
    raw-median    sigma="median" on raw pixels (preprocess=None)
    sigma-1       sigma=1.0 on standardised pixels
    pre-issue-10  the former defaults: sigma=1.0, preprocess=None, dc_weight=None

Prints one JSON line per run (validation accuracy per iteration; iteration 0 is the fixed
kernel), appended to ``--out`` if given:

    python examples/defaults_local_signal.py defaults dc-0.2 raw-median sigma-1 pre-issue-10
"""
import argparse
import time

import torch
from defaults_cifar10 import emit

from falkon_convrfm import ConvRFM
from falkon_convrfm.datasets import make_local_signal

PRESETS = {
    "defaults": {},
    "dc-0.2": {"dc_weight": 0.2},
    "raw-median": {"preprocess": None},
    "sigma-1": {"sigma": 1.0},
    "pre-issue-10": {"sigma": 1.0, "preprocess": None, "dc_weight": None},
}


def run(preset: str, X, y, n: int, patch: int) -> dict:
    params = dict(patch_size=patch, solver="exact", random_state=0, progress=False, **PRESETS[preset])
    tic = time.perf_counter()
    model = ConvRFM(**params).fit(X[:n], y[:n], X[n:], y[n:])
    val = [h["val_accuracy"] for h in model.history_]
    return {"preset": preset, "params": {k: v for k, v in params.items() if k != "progress"}, "sigma": model.sigma_,
            "dc_weight": model.dc_weight_, "val_accuracy": val, "gain": val[model.best_iteration_] - val[0],
            "seconds": time.perf_counter() - tic}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="+", choices=tuple(PRESETS))
    p.add_argument("--n", type=int, default=300, help="training images (as many validate)")
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--pattern", type=int, default=7, help="side of the plus")
    p.add_argument("--patch", type=int, default=7, help="patch_size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    X, y = make_local_signal(2 * args.n, image_size=32, pattern_size=args.pattern, noise=args.noise,
                             kind="present_vs_absent", channels=3, random_state=0)
    for preset in args.presets:
        emit(run(preset, X, y, args.n, args.patch), args.out)


if __name__ == "__main__":
    main()
