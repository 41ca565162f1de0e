"""ConvRFM vs fixed convolutional kernels on SVHN (``train_32x32.mat``), validation split only.

The first ``--n-train`` images of the .mat file train, the next ``--n-val`` validate (SVHN's
files are not shuffled, so a random permutation with ``--seed`` is applied first). Same
options and outputs as ``examples/cifar10_convrfm.py``.

    python examples/svhn_convrfm.py --data /path/to/train_32x32.mat --small
    python examples/svhn_convrfm.py --data /path/to/train_32x32.mat --full
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cifar10_convrfm import full_preset, parse, run  # noqa: E402

from falkon_convrfm.datasets import load_svhn  # noqa: E402
from falkon_convrfm.preprocessing import Preprocessor  # noqa: E402


def main(argv=None):
    args = parse(argv, __doc__, data_default="train_32x32.mat")
    if args.out_dir == "runs/cifar10_convrfm":
        args.out_dir = "runs/svhn_convrfm"
    data = load_svhn(args.data)
    if args.full and not full_preset(args, len(data.labels), (3, 32, 32)):
        return
    if args.n_train + args.n_val > len(data.labels):
        raise SystemExit(f"{args.data} has {len(data.labels)} images, fewer than n-train + n-val")
    order = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(data.labels)))
    idx = order[: args.n_train + args.n_val]
    X, y = data.images[idx], data.labels[idx]
    prep = Preprocessor(scale=False, standardize=True).fit(X[: args.n_train])
    X = prep.transform(X)
    run(args, X[: args.n_train], y[: args.n_train], X[args.n_train :], y[args.n_train :], "SVHN")


if __name__ == "__main__":
    main()
