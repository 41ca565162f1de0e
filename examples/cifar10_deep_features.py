"""Deep explicit patch features on CIFAR-10 (docs/results.md, "Deep explicit features (issue 17)").

Fits :class:`~falkon_convrfm.DeepPatchFeatureRFM` on an honest split of the training file: a fixed
permutation (numpy seed 0), its first ``--n`` images train, its last ``--n-val`` validate (never
seen by the fit but to choose iterates and penalties). Layers as ``--layer q,k,rank,pool`` (rank
``none``: full; pool ``none``, ``g`` or ``window/stride``), in order. Prints every layer's
iterations (validation accuracy, chosen λ, time per phase), the total time and the peak RSS.

    python examples/cifar10_deep_features.py --n 5000 --n-val 2000 \\
        --layer 3,128,none,3/2 --layer 3,512,256,none --pooling 2 --iterations 1
"""
import argparse
import resource
import time

import numpy as np

from falkon_convrfm import DeepPatchFeatureRFM, FeatureLayer


def layer_spec(text: str, iterations: int) -> FeatureLayer:
    q, k, rank, pool = text.split(",")
    pool = None if pool == "none" else tuple(int(v) for v in pool.split("/")) if "/" in pool else int(pool)
    return FeatureLayer(int(q), 0, int(k), None if rank == "none" else int(rank), pool, iterations)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10_train.npz", help="npz with images (N, 32, 32, 3), labels")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--layer", action="append", required=True, metavar="q,k,rank,pool")
    p.add_argument("--iterations", type=int, default=1, help="metric updates of every layer")
    p.add_argument("--pooling", type=int, default=2, help="g×g grid pooling before the head")
    p.add_argument("--dictionary", default="kmeans", choices=["kmeans", "random"])
    p.add_argument("--encoding", default="triangle", choices=["triangle", "nystrom"])
    p.add_argument("--eps", type=float, default=0.1, help="whitening ε")
    p.add_argument("--agop-samples", type=int, default=1000)
    p.add_argument("--penalty", type=float, default=0.1, help="ridge λ; the grid is 0.1, 0.3, 1, 3, 10 times it")
    p.add_argument("--max-memory-gb", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = np.load(args.data)
    images, labels = data["images"], data["labels"]
    order = np.random.default_rng(0).permutation(len(labels))
    train, val = order[: args.n], order[len(order) - args.n_val :]
    model = DeepPatchFeatureRFM(
        layers=[layer_spec(t, args.iterations) for t in args.layer], pooling=args.pooling,
        dictionary=args.dictionary, encoding=args.encoding, whiten_eps=args.eps, agop_samples=args.agop_samples,
        penalty=args.penalty,
        max_memory=args.max_memory_gb * 2**30, random_state=args.seed, progress=False)
    tic = time.perf_counter()
    model.fit(images[train], labels[train], images[val], labels[val])
    total = time.perf_counter() - tic
    for layer, records in enumerate(model.history_):
        for r in records:
            times = ", ".join(f"{k[5:]} {r[k]:.0f} s" for k in ("time_setup", "time_encode", "time_solve", "time_agop")
                              if k in r)
            print(f"layer {layer} iteration {r['iteration']}: val {100 * r['val_accuracy']:.2f} %, rank {r['rank']}, "
                  f"{r['features']} features, λ {r['penalty']:.3g}; {times}")
        print(f"layer {layer}: kept iteration {model.best_iterations_[layer]}, map {model.shapes_[layer + 1]}")
    best = model.history_[-1][model.best_iterations_[-1]]["val_accuracy"]
    print(f"validation accuracy {100 * best:.2f} % (n = {args.n}, {args.n_val} validation); "
          f"total {total:.0f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
