"""PatchFeatureRFM on CIFAR-10's training file with an honest validation split (the ablation driver).

The first ``--n-train`` images of the file train, the last ``--n-val`` validate (the file is
shuffled once, so both are random, class-balanced subsets; the validation images choose the ridge
penalty and the kept iterate and are never trained on). Every other option is a PatchFeatureRFM
parameter. Prints one JSON line: validation accuracy per iteration, the kept one, time per phase
(encode, solve, AGOP; seconds), peak resident memory (GiB); appended to ``--out`` if given.

    python examples/cifar10_features.py --data ../shared/data/cifar10_train.npz --n-train 10000 --n-val 2000
    python examples/cifar10_features.py --data … --n-train 45000 --n-val 5000 --atoms 2048 --iterations 1
"""
import argparse
import json
import resource
import time

import numpy as np

from falkon_convrfm import PatchFeatureRFM


def pooling(text: str):
    """'2' → 2 (a 2×2 grid); '5,3' → (5, 3) (window, stride)."""
    parts = [int(v) for v in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10_train.npz", help="npz with images (N, 32, 32, 3), labels")
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--patch-size", type=int, default=6)
    p.add_argument("--atoms", type=int, default=1024, help="n_atoms (dictionary size)")
    p.add_argument("--pooling", type=pooling, default=3, help="g (g×g grid) or window,stride")
    p.add_argument("--kernel", default="laplace")
    p.add_argument("--metric", default="whiten", choices=["whiten", "identity", "dc"])
    p.add_argument("--eps", type=float, default=0.1, help="whiten_eps")
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--power", type=float, default=0.5, help="agop_power")
    p.add_argument("--shrinkage", type=float, default=0.0)
    p.add_argument("--agop-samples", type=int, default=1000)
    p.add_argument("--augment", default=None, choices=["flip"])
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)

    data = np.load(args.data)
    images, labels = data["images"], data["labels"]
    if args.n_train + args.n_val > len(labels):
        p.error(f"--n-train + --n-val = {args.n_train + args.n_val} is more than the {len(labels)} images of {args.data}")
    X, y = images[: args.n_train], labels[: args.n_train]
    X_val, y_val = images[len(labels) - args.n_val :], labels[len(labels) - args.n_val :]
    params = dict(patch_size=args.patch_size, n_atoms=args.atoms, pooling=args.pooling, kernel=args.kernel,
                  metric=args.metric, whiten_eps=args.eps, iterations=args.iterations, agop_power=args.power,
                  shrinkage=args.shrinkage, agop_samples=args.agop_samples, augment=args.augment, random_state=0)
    tic = time.perf_counter()
    model = PatchFeatureRFM(progress=False, **params).fit(X, y, X_val, y_val)
    result = {
        "n_train": args.n_train, "n_val": args.n_val, "params": params,
        "val_accuracy": [round(h["val_accuracy"], 4) for h in model.history_],
        "kept": model.best_iteration_,
        "time": {key: [round(h[key], 1) for h in model.history_ if key in h]
                 for key in ("time_encode", "time_solve", "time_agop")},
        "seconds": round(time.perf_counter() - tic, 1), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
