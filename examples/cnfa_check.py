"""Convolutional neural feature ansatz on a small CNN trained on CIFAR-10 (CPU, a few minutes).

For every Conv2d layer: Pearson correlation between the entries of WᵀW and of the patch AGOP G
of the network outputs w.r.t. that layer's input patches (and of G^{1/2}), at initialisation and
after training. The AGOP is measured on held-out images.

    python examples/cnfa_check.py [--n-train 10000] [--epochs 3]
"""
import argparse
import time

import torch
import torch.nn as nn

from cifar10_convrfm import DEFAULT_DATA, existing_data

from falkon_convrfm.cnfa import cnfa_correlation
from falkon_convrfm.datasets import load_npz
from falkon_convrfm.preprocessing import Preprocessor


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(256, 10),
    )


def correlations(net, images):
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    return [cnfa_correlation(net, layer, images, chunk=50) for layer in convs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="dataset file (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-agop", type=int, default=500, help="held-out images for the AGOP")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    data = load_npz(existing_data(args.data))
    X = Preprocessor(scale=True, standardize=True).fit(data.images[: args.n_train]).transform(
        data.images[: args.n_train + args.n_agop])
    Xtr, ytr, Xagop = X[: args.n_train], data.labels[: args.n_train], X[args.n_train :]
    net = small_cnn()
    init = correlations(net, Xagop)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    tic = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(net(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (net(Xagop).argmax(1) == data.labels[args.n_train : args.n_train + args.n_agop]).float().mean()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy {acc:.3f} ({time.perf_counter() - tic:.0f} s)")
    trained = correlations(net, Xagop)
    print(f"\n{'layer':>5s} {'init ρ(WᵀW,G)':>14s} {'init ρ(WᵀW,√G)':>15s} {'trained ρ(WᵀW,G)':>17s} {'trained ρ(WᵀW,√G)':>18s}")
    for i, (a, b) in enumerate(zip(init, trained)):
        print(f"{i + 1:5d} {a['G']:14.3f} {a['sqrtG']:15.3f} {b['G']:17.3f} {b['sqrtG']:18.3f}")


if __name__ == "__main__":
    main()
