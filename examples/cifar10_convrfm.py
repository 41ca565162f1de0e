"""ConvRFM vs fixed convolutional kernels on CIFAR-10, with an honest validation split.

Data: an .npz with ``images`` (N, 32, 32, 3) uint8 and ``labels`` (default: the shared training
file). The first ``--n-train`` images train, the next ``--n-val`` validate (the file is shuffled);
no test data is used. Pixels are standardised per channel with training statistics.

Runs, at the same σ, λ, centres and geometry:
  1. the fixed kernel M = I;
  2. ConvRFM (``--iterations`` updates). With ``--dc-weight w`` its iteration 0 is the fixed
     metric with the patch-brightness (DC) direction weighted w — the honest fixed baseline —
     and the updates project DC out of the AGOP and keep that weight.
Prints a per-iteration table, writes ``history.json`` and the filters PNG to ``--out-dir``.

    python examples/cifar10_convrfm.py --small          # minutes on a 2-core CPU
    python examples/cifar10_convrfm.py --n-train 10000 --n-val 5000 --centres 2000
    python examples/cifar10_convrfm.py --full           # one GPU: full training set, planned centres
    python examples/cifar10_convrfm.py --device cuda --solver nystrom --n-train 45000 --centres 5000 --pool-window 3

``--full`` uses all images but a 5 000-image validation split, and the largest centre count
(capped at 20 000) that the memory planner fits in ``--device-memory-gb`` (80); it prints the
plan, and stops there when no CUDA device is present.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import falkon_convrfm as fc
from falkon_convrfm.datasets import load_npz
from falkon_convrfm.memory import peak_rss
from falkon_convrfm.planning import format_plan, plan_memory
from falkon_convrfm.preprocessing import Preprocessor
from falkon_convrfm.viz import describe_iterate

# The shared CIFAR-10 training file lives beside the repository: <repo>/../shared/data/.
DEFAULT_DATA = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_train.npz")


def existing_data(path) -> str:
    """``path`` if it is a file, else exit with a one-line message saying what to pass."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: data file not found: {path}. The default is ../shared/data/cifar10_train.npz "
                         "beside the repository; pass --data PATH (an .npz with 'images' (N, 32, 32, 3) uint8 "
                         "and 'labels').")
    return path


def bandwidth(text: str):
    """--sigma: 'median' or a positive number."""
    if text == "median":
        return text
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 'median' or a positive number, got {text}")
    return value


def parse(argv=None, doc=__doc__, data_default=DEFAULT_DATA):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=data_default, help="dataset file (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-val", type=int, default=5_000)
    p.add_argument("--centres", type=int, default=2_000)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--kernel", default="laplace", choices=["laplace", "gaussian", "ntk"])
    p.add_argument("--sigma", type=bandwidth, default="median",
                   help="bandwidth on standardised pixels, or 'median' (the median aligned-patch distance)")
    p.add_argument("--penalty", type=float, default=1e-6)
    p.add_argument("--power", type=float, default=1.0, help="AGOP power")
    p.add_argument("--dc-weight", type=float, default=0.2, help="DC weight; negative: keep DC in G")
    p.add_argument("--shrinkage", type=float, default=0.0)
    p.add_argument("--agop-samples", type=int, default=5_000)
    p.add_argument("--maxiter", type=int, default=20, help="Falkon CG iterations")
    p.add_argument("--patch-size", type=int, default=3)
    p.add_argument("--pool-window", type=int, default=1, help="local pooling window (odd; 1: aligned patches)")
    p.add_argument("--solver", default="auto", choices=["auto", "falkon", "nystrom", "exact"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (--full sets cuda)")
    p.add_argument("--max-memory-gb", type=float, default=6.0)
    p.add_argument("--skip-identity", action="store_true", help="do not fit the M = I baseline")
    p.add_argument("--out-dir", default="runs/cifar10_convrfm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="n-train 2000, n-val 1000, 500 centres, 1000 AGOP rows")
    p.add_argument("--full", action="store_true", help="full training set on one GPU, centres from the memory plan")
    p.add_argument("--device-memory-gb", type=float, default=80.0, help="GPU memory for --full")
    if "--small" in (sys.argv[1:] if argv is None else argv):  # explicit sizes still win
        p.set_defaults(n_train=2000, n_val=1000, centres=500, agop_samples=1000)
    return p.parse_args(argv)


def full_preset(args, n_total: int, image_shape) -> bool:
    """Set --full's sizes from the memory planner; print the plan. False if there is no GPU."""
    args.n_val = 5000
    args.n_train = n_total - args.n_val
    plan = plan_memory(args.n_train, image_shape, args.patch_size, centres=20_000, n_val=args.n_val,
                       device_memory=args.device_memory_gb * 2**30, agop_samples=args.agop_samples)
    args.centres = min(20_000, plan["max_centres"])
    plan = plan_memory(args.n_train, image_shape, args.patch_size, centres=args.centres, n_val=args.n_val,
                       device_memory=args.device_memory_gb * 2**30, agop_samples=args.agop_samples)
    print(format_plan(plan))
    if not torch.cuda.is_available():
        print("no CUDA device here: --full stops after printing its plan")
        return False
    args.device = "cuda"
    return True


def reset_gpu_peak(device: str) -> None:
    """Start a new peak-GPU-memory measurement (on CUDA; nothing on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_gb(device: str):
    """Peak GPU memory allocated by torch since the last reset, in GiB (None on the CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def load_split(path, n_train, n_val):
    data = load_npz(path)
    if n_train + n_val > len(data.labels):
        raise ValueError(f"{path} has {len(data.labels)} images, fewer than n_train + n_val")
    X, y = data.images[: n_train + n_val], data.labels[: n_train + n_val]
    prep = Preprocessor(scale=True, standardize=True).fit(X[:n_train])
    X = prep.transform(X)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def main(argv=None):
    args = parse(argv)
    existing_data(args.data)
    if args.full and not full_preset(args, len(np.load(args.data)["labels"]), (3, 32, 32)):
        return
    Xtr, ytr, Xval, yval = load_split(args.data, args.n_train, args.n_val)
    run(args, Xtr, ytr, Xval, yval, "CIFAR-10")


def run(args, Xtr, ytr, Xval, yval, name):
    """Fit M = I and ConvRFM on the split, print the table, write history.json and the PNGs."""
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"{name}: {len(ytr)} train / {len(yval)} validation images; Falkon: {fc.HAS_FALKON}")
    common = dict(
        patch_size=args.patch_size, pool_window=args.pool_window, kernel=args.kernel, sigma=args.sigma,
        penalty=args.penalty, n_centres=args.centres, agop_samples=args.agop_samples, agop_power=args.power,
        maxiter=args.maxiter, max_memory=args.max_memory_gb * 2**30, random_state=args.seed,
        solver=args.solver, device=args.device,
    )
    runs = {}
    if not args.skip_identity:
        tic = time.perf_counter()
        reset_gpu_peak(args.device)
        with peak_rss() as mem:
            ident = fc.ConvRFM(iterations=0, dc_weight=None, **common).fit(Xtr, ytr, Xval, yval)
        runs["identity"] = {"history": ident.history_, "seconds": time.perf_counter() - tic,
                            "peak_rss_gb": mem["peak"] / 2**30, "peak_gpu_gb": gpu_peak_gb(args.device)}
        print(f"fixed kernel M = I (sigma {ident.sigma_:.4g}): val accuracy {ident.history_[0]['val_accuracy']:.4f} "
              f"({runs['identity']['seconds']:.0f} s)")
    dc = None if args.dc_weight < 0 else args.dc_weight
    tic = time.perf_counter()
    reset_gpu_peak(args.device)
    with peak_rss() as mem:
        model = fc.ConvRFM(iterations=args.iterations, dc_weight=dc, shrinkage=args.shrinkage,
                           checkpoint_dir=os.path.join(args.out_dir, "checkpoint"), **common).fit(Xtr, ytr, Xval, yval)
    runs["convrfm"] = {"history": model.history_, "seconds": time.perf_counter() - tic,
                       "peak_rss_gb": mem["peak"] / 2**30, "peak_gpu_gb": gpu_peak_gb(args.device),
                       "best_iteration": model.best_iteration_}

    print(f"\n{'iteration':>9s} {'metric':>16s} {'train acc':>9s} {'val acc':>8s} {'fit s':>7s} {'agop s':>7s} "
          f"{'update s':>8s} {'DC share':>8s}")
    for h in model.history_:
        label = "fixed" if h["iteration"] == 0 else "learned"
        label += f", DC {dc:g}" if dc is not None else ""
        label += " *" if h["iteration"] == model.best_iteration_ else ""
        print(f"{h['iteration']:9d} {label:>16s} {h['train_accuracy']:9.4f} {h['val_accuracy']:8.4f} "
              f"{h['time_fit'] + h['time_eval']:7.1f} {h.get('time_agop', 0):7.1f} {h.get('time_update', 0):8.3f} "
              f"{h['spectrum']['dc_share']:8.3f}")
    gpu = runs["convrfm"]["peak_gpu_gb"]
    print(f"* kept: iteration {model.best_iteration_} (best on validation); "
          f"peak RSS {runs['convrfm']['peak_rss_gb']:.2f} GiB" + (f", peak GPU memory {gpu:.2f} GiB" if gpu else ""))
    with open(os.path.join(args.out_dir, "history.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    kept = describe_iterate(model.history_, model.best_iteration_)
    fc.plot_filters(model.M_, model.image_shape_, args.patch_size, k=8, path=os.path.join(args.out_dir, "filters.png"),
                    title=f"{name}: top eigenvectors of the {kept}")
    source = max(model.best_iteration_ - 1, 0)  # the AGOP that gave the kept M
    if "location_share" in model.history_[source]:
        fc.plot_location_map(model.history_[source]["location_share"], model.image_shape_, args.patch_size,
                             path=os.path.join(args.out_dir, "locations.png"),
                             title=f"AGOP share per location, AGOP of iteration {source}")
    print(f"wrote {args.out_dir}/history.json, filters.png")


if __name__ == "__main__":
    main()
