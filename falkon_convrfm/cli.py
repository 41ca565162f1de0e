"""``convrfm``: fit, predict, evaluate, draw filters, plan memory, show backends."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

DATASETS = ("digits", "local-signal", "cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "npz", "folder")


# ---------------------------------------------------------------------------- data
def load_data(name: str, path: str | None, split: str):
    """(images (n, c, H, W) float in [0, 1], labels) for a dataset name and path."""
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        X = (d.images / 16.0).astype(np.float32)[:, None]
        Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=0.3, stratify=d.target, random_state=0)
        return (torch.from_numpy(Xtr), torch.from_numpy(ytr)) if split == "train" else (torch.from_numpy(Xte), torch.from_numpy(yte))
    if name == "local-signal":
        from .datasets import make_local_signal

        return make_local_signal(2000, random_state=0 if split == "train" else 1)
    if path is None:
        raise SystemExit(f"error: --data PATH is required for dataset {name!r}")
    from .datasets import load_dataset

    data = load_dataset(name, path, split=split)
    return data.images, data.labels


def _subset(X, y, n):
    return (X, y) if n is None or n >= len(y) else (X[:n], y[:n])


# ---------------------------------------------------------------------------- model io
def _load_model(path):
    from .deep import DeepConvRFM
    from .rfm import ConvRFM

    kind = torch.load(path, weights_only=False).get("class")
    cls = {"ConvRFM": ConvRFM, "DeepConvRFM": DeepConvRFM}.get(kind)
    if cls is None:
        raise SystemExit(f"error: {path} is not a saved ConvRFM or DeepConvRFM model")
    return cls.load(path)


def _final(model):
    return getattr(model, "final_", model)


# ---------------------------------------------------------------------------- commands
def cmd_info(args):
    from . import __version__
    from ._compat import FALKON_IMPORT_ERROR, HAS_FALKON, keops_available

    print(f"falkon-convrfm {__version__}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads")
    print(f"Falkon: {'available' if HAS_FALKON else 'not installed (' + FALKON_IMPORT_ERROR + ')'}")
    print(f"KeOps: {'available' if keops_available() else 'not importable'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"CUDA device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
    else:
        print("CUDA: no device")


def _build_model(args, config):
    from .deep import DeepConvRFM, LayerSpec
    from .rfm import ConvRFM

    shared = dict(penalty=args.penalty, n_centres=args.centres, solver=args.solver, maxiter=args.maxiter,
                  validation_fraction=args.val_fraction, preprocess=args.preprocess, dtype=args.dtype,
                  device=args.device, random_state=args.seed,
                  max_memory=None if args.max_memory_gb is None else args.max_memory_gb * 2**30,
                  checkpoint_dir=args.checkpoint_dir, progress=not args.quiet)
    conv = dict(patch_size=args.patch_size, stride=args.stride, padding=args.padding, kernel=args.kernel,
                sigma=args.sigma if args.sigma == "median" else float(args.sigma), iterations=args.iterations,
                agop_samples=args.agop_samples, agop_power=args.agop_power, dc_weight=args.dc_weight)
    if args.model == "conv":
        return ConvRFM(**{**shared, **conv, **config})
    layers = [LayerSpec(**spec) for spec in config.pop("layers", [{"width": args.width}] * args.depth)]
    return DeepConvRFM(layers=layers, final={**conv, **config.pop("final", {})}, **{**shared, **config})


def cmd_fit(args):
    from .viz import plot_filters, plot_history

    config = {}
    if args.config:
        with open(args.config) as f:
            config = json.load(f)
    X, y = _subset(*load_data(args.dataset, args.data, "train"), args.n_train)
    model = _build_model(args, config)
    os.makedirs(args.out_dir, exist_ok=True)
    tic = time.perf_counter()
    model.fit(X, y)
    seconds = time.perf_counter() - tic
    model.save(os.path.join(args.out_dir, "model.pt"))
    final = _final(model)
    with open(os.path.join(args.out_dir, "history.json"), "w") as f:
        json.dump({"params": {k: repr(v) for k, v in model.get_params().items()}, "seconds": seconds,
                   "history": model.history_}, f, indent=1, default=float)
    plot_history(final.history_, os.path.join(args.out_dir, "curves.png"))
    plot_filters(final.metrics_[-1], final.image_shape_, final.patch_size, k=8,
                 path=os.path.join(args.out_dir, "filters.png"))
    best = final.history_[final.best_iteration_]
    print(f"fitted in {seconds:.1f} s; best iteration {final.best_iteration_}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k.startswith("val_")))
    print(f"wrote {args.out_dir}/model.pt, history.json, curves.png, filters.png")


def cmd_predict(args):
    model = _load_model(args.model)
    X, _ = _subset(*load_data(args.dataset, args.data, args.split), args.n)
    pred = model.predict(X).cpu().numpy()
    np.save(args.out, pred)
    print(f"wrote {len(pred)} predictions to {args.out}")


def confusion_matrix(y_true, y_pred, classes) -> np.ndarray:
    """Counts C[i, j] of true class i predicted as class j."""
    index = {int(c): i for i, c in enumerate(classes)}
    C = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(y_true.tolist(), y_pred.tolist()):
        C[index[int(t)], index[int(p)]] += 1
    return C


def cmd_evaluate(args):
    model = _load_model(args.model)
    X, y = _subset(*load_data(args.dataset, args.data, args.split), args.n)
    pred = model.predict(X).cpu()
    y = torch.as_tensor(y)
    acc = (pred == y).double().mean().item()
    classes = _final(model).classes_.tolist()
    C = confusion_matrix(y, pred, classes)
    print(f"{args.dataset} {args.split}: {len(y)} images, accuracy {acc:.4f}")
    print("confusion matrix (rows: true, columns: predicted)")
    print("      " + " ".join(f"{c:>5}" for c in classes))
    for c, row in zip(classes, C):
        print(f"{c:>5} " + " ".join(f"{v:5d}" for v in row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"accuracy": acc, "classes": classes, "confusion": C.tolist()}, f)


def cmd_filters(args):
    from .viz import plot_filters, plot_location_map

    final = _final(_load_model(args.model))
    M = final.metrics_[-1] if args.iteration is None else final.metrics_[args.iteration]
    plot_filters(M, final.image_shape_, final.patch_size, k=args.k, path=args.out)
    print(f"wrote {args.out}")
    shares = [h["location_share"] for h in final.history_ if "location_share" in h]
    if args.locations and shares:
        plot_location_map(shares[-1], final.image_shape_, final.patch_size, final.stride, final.padding,
                          path=args.locations)
        print(f"wrote {args.locations}")


def cmd_plan(args):
    from .planning import format_plan, plan_memory

    plan = plan_memory(args.n, tuple(args.image_shape), args.patch_size, args.stride, args.padding,
                       args.centres, dtype=args.dtype, device_memory=args.device_memory_gb * 2**30,
                       n_outputs=args.outputs, agop_samples=args.agop_samples, n_val=args.n_val)
    print(format_plan(plan))


# ---------------------------------------------------------------------------- parser
def _add_data(p, split_default="train"):
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data", help="dataset path (folder, .mat, .npz); not needed for digits / local-signal")
    p.add_argument("--split", default=split_default, help="train or test (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convrfm", description="Deep ConvRFM with Falkon: learned-metric "
                                     "convolutional kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="train a model and write model.pt, history.json, curves.png, filters.png")
    _add_data(p)
    p.add_argument("--model", choices=["conv", "deep"], default="conv")
    p.add_argument("--config", help="JSON file of extra estimator parameters (deep: 'layers', 'final')")
    p.add_argument("--n-train", type=int, help="use only the first N training images")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--preprocess", choices=["standardize", "zca"], default=None)
    p.add_argument("--patch-size", type=int, default=3)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--padding", type=int, default=0)
    p.add_argument("--kernel", choices=["laplace", "gaussian", "ntk"], default="laplace")
    p.add_argument("--sigma", default="median", help="bandwidth or 'median' (default)")
    p.add_argument("--penalty", type=float, default=1e-6)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--agop-samples", type=int, default=10_000)
    p.add_argument("--agop-power", type=float, default=1.0)
    p.add_argument("--dc-weight", type=float, default=None)
    p.add_argument("--depth", type=int, default=1, help="deep: number of feature-map layers")
    p.add_argument("--width", type=int, default=64, help="deep: filters per layer")
    p.add_argument("--solver", choices=["auto", "falkon", "exact"], default="auto")
    p.add_argument("--maxiter", type=int, default=20)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-memory-gb", type=float, help="memory budget for kernel blocks and AGOP chunks")
    p.add_argument("--checkpoint-dir", help="save after every iteration; rerun to resume")
    p.add_argument("--out-dir", default="convrfm_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="predict labels with a saved model")
    p.add_argument("--model", required=True, help="model.pt written by fit")
    _add_data(p, "test")
    p.add_argument("--n", type=int, help="first N images only")
    p.add_argument("--out", default="predictions.npy")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="accuracy and confusion matrix of a saved model")
    p.add_argument("--model", required=True)
    _add_data(p, "test")
    p.add_argument("--n", type=int, help="first N images only")
    p.add_argument("--out", help="write the figures as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("filters", help="draw the top eigenvectors of M (and the location map)")
    p.add_argument("--model", required=True)
    p.add_argument("--iteration", type=int, help="which iteration's M (default: the last)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--out", default="filters.png")
    p.add_argument("--locations", help="also write the per-location AGOP share map here")
    p.set_defaults(func=cmd_filters)

    p = sub.add_parser("plan", help="memory of each phase and the largest centre count that fits")
    p.add_argument("--n", type=int, required=True, help="training images")
    p.add_argument("--n-val", type=int, default=0)
    p.add_argument("--image-shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    p.add_argument("--patch-size", type=int, default=3)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--padding", type=int, default=0)
    p.add_argument("--centres", type=int, default=10_000)
    p.add_argument("--outputs", type=int, default=10)
    p.add_argument("--agop-samples", type=int, default=10_000)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device-memory-gb", type=float, default=80.0)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("info", help="available backends: Falkon, KeOps, CUDA devices")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
