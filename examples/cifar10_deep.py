"""Deep ConvRFM on CIFAR-10: 1, 2 and 3 layers vs the fixed kernel, same data and validation split.

Depth L means L − 1 random convolutional feature maps built from learned metrics, then a ConvRFM
classifier on the last maps (L = 1 is plain ConvRFM; its iteration 0 is the fixed kernel).
The first ``--n-train`` images of the npz train, the next ``--n-val`` validate; pixels are
standardised per channel with training statistics. Prints validation accuracy, time per layer
and peak memory, and writes ``deep.json``.

    python examples/cifar10_deep.py --small            # minutes on a 2-core CPU
    python examples/cifar10_deep.py --n-train 10000 --n-val 5000
"""
import argparse
import json
import os
import sys
import time

from cifar10_convrfm import DEFAULT_DATA, bandwidth, existing_data, load_split

from falkon_convrfm.deep import DeepConvRFM, LayerSpec
from falkon_convrfm.memory import peak_rss


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="dataset file (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-val", type=int, default=5_000)
    p.add_argument("--centres", type=int, default=2_000)
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--width", type=int, default=32, help="filters per feature-map layer")
    p.add_argument("--pool", type=int, default=2, help="average pooling of each feature map")
    p.add_argument("--pool-window", type=int, default=1, help="local pooling window of the final ConvRFM (odd)")
    p.add_argument("--nonlinearity", choices=["relu", "none"], default="relu")
    p.add_argument("--iterations", type=int, default=1, help="ConvRFM iterations per layer")
    p.add_argument("--agop-samples", type=int, default=2_000)
    p.add_argument("--dc-weight", type=float, default=0.2, help="first layer's DC weight (negative: none)")
    p.add_argument("--sigma", type=bandwidth, default="median", help="bandwidth, or 'median' (default)")
    p.add_argument("--penalty", type=float, default=1e-6)
    p.add_argument("--max-memory-gb", type=float, default=6.0)
    p.add_argument("--small", action="store_true", help="n-train 2000, n-val 1000, 500 centres")
    p.add_argument("--out", default="runs/cifar10_deep/deep.json")
    p.add_argument("--seed", type=int, default=0)
    if "--small" in (sys.argv[1:] if argv is None else argv):  # explicit sizes still win
        p.set_defaults(n_train=2000, n_val=1000, centres=500, agop_samples=1000)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    Xtr, ytr, Xval, yval = load_split(existing_data(args.data), args.n_train, args.n_val)
    dc = None if args.dc_weight < 0 else args.dc_weight
    final = dict(patch_size=3, pool_window=args.pool_window, sigma=args.sigma, iterations=args.iterations,
                 agop_samples=args.agop_samples)
    rows = []
    for depth in args.depths:
        layers = [LayerSpec(width=args.width, pool=args.pool, nonlinearity=args.nonlinearity, sigma=args.sigma,
                            iterations=args.iterations, agop_samples=args.agop_samples,
                            dc_weight=dc if i == 0 else None) for i in range(depth - 1)]
        model = DeepConvRFM(layers=layers, final={**final, "dc_weight": dc if depth == 1 else None},
                            penalty=args.penalty, n_centres=args.centres,
                            max_memory=args.max_memory_gb * 2**30, random_state=args.seed, progress=False)
        tic = time.perf_counter()
        with peak_rss() as mem:
            model.fit(Xtr, ytr, Xval, yval)
        hist = model.final_.history_
        rows.append({"depth": depth, "fixed_val_accuracy": hist[0]["val_accuracy"] if depth == 1 else None,
                     "val_accuracy": hist[model.final_.best_iteration_]["val_accuracy"],
                     "time_per_layer": [h["time_layer"] for h in model.history_],
                     "seconds": time.perf_counter() - tic, "peak_rss_gb": mem["peak"] / 2**30,
                     "feature_shapes": model.feature_shapes_, "history": model.history_})
        r = rows[-1]
        print(f"depth {depth}: val accuracy {r['val_accuracy']:.4f}"
              + (f" (fixed kernel {r['fixed_val_accuracy']:.4f})" if depth == 1 else "")
              + f", layers {[round(t, 1) for t in r['time_per_layer']]} s, peak {r['peak_rss_gb']:.2f} GiB", flush=True)
    print(f"\n{'depth':>5s} {'val acc':>8s} {'total s':>8s} {'peak GiB':>8s}  feature shapes")
    for r in rows:
        print(f"{r['depth']:5d} {r['val_accuracy']:8.4f} {r['seconds']:8.1f} {r['peak_rss_gb']:8.2f}  {r['feature_shapes']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "runs": rows}, f, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
