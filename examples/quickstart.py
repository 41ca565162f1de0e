"""Quickstart: ConvRFM on scikit-learn's 8×8 digits (embedded, no download), seconds on a CPU.

Fits the fixed convolutional kernel (M = I) and ConvRFM (learned patch metric) with the same
settings, reports held-out accuracy and time of the iterate each keeps (the best on a validation
split of the training images; iteration 0 is the fixed M), and draws that kept M's filters.
Uses Falkon when installed, else the exact solver.

    python examples/quickstart.py [--iterations 2] [--out quickstart_filters.png]
"""
import argparse
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import falkon_convrfm as fc
from falkon_convrfm.viz import describe_iterate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2, help="metric updates (default 2)")
    parser.add_argument("--kernel", default="laplace", choices=["laplace", "gaussian", "ntk"])
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--penalty", type=float, default=1e-5)
    parser.add_argument("--out", default="quickstart_filters.png", help="filters PNG")
    args = parser.parse_args(argv)

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]  # (n, 1, 8, 8) in [0, 1]
    X_train, X_test, y_train, y_test = train_test_split(
        X, digits.target, test_size=0.3, stratify=digits.target, random_state=0
    )
    solver = "falkon" if fc.HAS_FALKON else "exact"
    print(f"digits: {len(X_train)} train / {len(X_test)} held-out images, 1×8×8; solver: {solver}")
    common = dict(kernel=args.kernel, sigma=args.sigma, penalty=args.penalty, agop_samples=1000, solver=solver,
                  random_state=0, progress=False, **({"n_centres": 1000} if solver == "falkon" else {}))
    for name, iterations in (("fixed kernel (M = I)", 0), ("ConvRFM", args.iterations)):
        tic = time.perf_counter()
        model = fc.ConvRFM(iterations=iterations, **common).fit(X_train, y_train)
        seconds = time.perf_counter() - tic
        kept = "fixed M" if model.best_iteration_ == 0 else "learned M"
        print(f"{name:20s} held-out accuracy {model.score(X_test, y_test):.4f}  "
              f"(kept iteration {model.best_iteration_} of {iterations}, {kept}; fit {seconds:.1f} s)")
    title = f"digits: top eigenvectors of the {describe_iterate(model.history_, model.best_iteration_)}"
    fc.plot_filters(model.M_, model.image_shape_, model.patch_size, k=8, path=args.out, title=title)
    print(f"filters written to {args.out}")


if __name__ == "__main__":
    main()
