"""Ablations of the explicit patch-feature pipeline below the estimator (docs/results.md, n = 10 000).

Composes the pieces of :mod:`falkon_convrfm.features` directly, so that levers the estimator does
not expose can be switched: the Nyström projection (``--no-projector``: raw pooled κ values), a
multiple of the median bandwidth, feature standardisation, a Gaussian top kernel (``--head
gaussian``), a squared-hinge SVM head (``--head svm``), k-means atoms re-fitted after a metric update (``--refit-atoms``). Split: a fixed permutation of the file (numpy seed 0); its first
``--n`` images train, its last ``--n-val`` validate. Standardised pixels, atoms = random training
patches, ridge head with the penalty chosen on validation from ``--penalties``. Prints one line per
iteration: σ, feature count, validation accuracy, chosen λ, training accuracy (first 5 000
images), encode / solve time, peak memory.

    python examples/feature_ablation.py --n 10000 --n-val 2000 --atoms 1024 --pooling 2
    python examples/feature_ablation.py --pooling 3 --penalties 3e-2,1e-1,3e-1,1
    python examples/feature_ablation.py --iterations 1 --power 0.5 --shrinkage 0.5
    python examples/feature_ablation.py --pooling 3 --kmeans 10 --encoding triangle --head gaussian
"""
import argparse
import dataclasses
import os
import resource
import time

import numpy as np
import torch

from falkon_convrfm.base_kernels import BASE_KERNELS
from falkon_convrfm.features import ENCODINGS, PatchFeatureMap, RidgeStatistics, kmeans_atoms, median_atom_distance, pooling_matrix
from falkon_convrfm.metric import fixed_metric, metric_factor, patch_covariance, refine_metric, whitening_metric
from falkon_convrfm.patches import PatchGeometry


@dataclasses.dataclass(frozen=True)
class NormalisedPatches(PatchGeometry):
    """Patches normalised for brightness and contrast before the metric (Coates & Ng 2011):
    n(x_p) = (x_p − μ_p 1) / sqrt(v_p + ε), μ_p, v_p the mean and variance of the patch's entries.
    By linearity Lᵀn(x_p) = (Lᵀx_p − μ_p Lᵀ1) / sqrt(v_p + ε): two box filters beside the conv."""

    eps: float = 0.01

    def patches(self, rows):
        P = super().patches(rows)
        mu, var = P.mean(-1, keepdim=True), P.var(-1, unbiased=False, keepdim=True)
        return (P - mu) / (var + self.eps).sqrt()

    def transformed_patches(self, rows, factor):
        U = super().transformed_patches(rows, factor)  # (P, n, r)
        ones = torch.ones(1, self.patch_dim, dtype=factor.dtype, device=factor.device)
        box = PatchGeometry.transformed_patches(self, rows, ones.T / self.patch_dim)  # μ_p, (P, n, 1)
        sq = PatchGeometry.transformed_patches(self, rows * rows, ones.T / self.patch_dim)  # mean of x²
        var = (sq - box * box).clamp_min(0)
        return (U - box * (ones @ factor)) / (var + self.eps).sqrt()


def gaussian_head(F, labels, Fv, penalties, centres, sigma_scale, seed=0):
    """Nyström Gaussian kernel ridge regression on the pooled features (a nonlinear top kernel):
    k(f, g) = exp(−‖f − g‖² / (2σ²)), σ² = sigma_scale² · median ‖f − g‖² / 2 over training pairs,
    α = (K_nmᵀK_nm + nλ K_mm)⁻¹ K_nmᵀ Y with m random training rows as centres.
    Yields (penalty, validation scores, training scores of the first 5 000 rows) per penalty."""
    gen = torch.Generator().manual_seed(seed)
    C = F[torch.randperm(F.shape[0], generator=gen)[:centres]]
    sub = F[:2000]
    sq = torch.cdist(sub, sub).pow(2)
    gamma = 1.0 / (sigma_scale**2 * sq[sq > 0].median().item())  # 1/(2σ²)

    def kernel(A):
        return torch.exp(-gamma * torch.cdist(A, C).pow(2)).double()

    Y = 2 * torch.nn.functional.one_hot(labels, 10).double() - 1
    A0 = torch.zeros(centres, centres, dtype=torch.float64)
    B = torch.zeros(centres, 10, dtype=torch.float64)
    for i in range(0, F.shape[0], 2000):
        K = kernel(F[i : i + 2000])
        A0 += K.T @ K
        B += K.T @ Y[i : i + 2000]
    Kmm, Kv, Kt = kernel(C), kernel(Fv), kernel(F[:5000])
    for penalty in penalties:
        alpha = torch.linalg.solve(A0 + F.shape[0] * penalty * Kmm + 1e-10 * torch.eye(centres, dtype=torch.float64) * A0.diagonal().mean(), B)
        yield penalty, Kv @ alpha, Kt @ alpha


def squared_hinge_head(F, labels, Fv, penalties, iterations=100):
    """One-vs-rest L2-SVM on the pooled features (Coates & Ng's head):
    min Σ_ic max(0, 1 − y_ic (f_i·w_c + b_c))² + λ'‖W‖², y_ic = ±1, λ' = λ·tr(FcᵀFc)/D as in ridge.
    L-BFGS in V = Lᵀ W, L the Cholesky factor of FcᵀFc + λ'I (the ridge Hessian up to 2, so the
    problem is well conditioned), started at the ridge solution.
    Yields (penalty, validation scores, training scores of the first 5 000 rows) per penalty."""
    mean = F.double().mean(0)
    Fc, Fvc = F - mean.float(), Fv - mean.float()
    Y = 2 * torch.nn.functional.one_hot(labels, 10).double() - 1
    stats = RidgeStatistics.of(F, Y)
    for penalty in penalties:
        L, ridge = stats.factor(penalty)
        V = (L.T @ torch.cholesky_solve(stats.cross, L)).requires_grad_(True)  # the ridge solution
        b = stats.target_mean.clone().requires_grad_(True)  # the intercept of centred features
        opt = torch.optim.LBFGS([V, b], max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

        def objective():
            opt.zero_grad()
            W = torch.linalg.solve_triangular(L.T, V, upper=True)
            S = (Fc @ W.float()).double() + b
            J = torch.clamp(1 - Y * S, min=0).pow(2).sum() + ridge * (W * W).sum()
            J.backward()
            return J

        opt.step(objective)
        with torch.no_grad():
            W = torch.linalg.solve_triangular(L.T, V, upper=True).float()
            yield penalty, (Fvc @ W).double() + b, (Fc[:5000] @ W).double() + b


def standardised(images: np.ndarray, mean=None, std=None):
    X = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    if mean is None:
        mean, std = X.mean((0, 2, 3), keepdim=True), X.std((0, 2, 3), keepdim=True)
    return (X - mean) / std, mean, std


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10_train.npz")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--patch-size", type=int, default=6)
    p.add_argument("--atoms", type=int, default=1024)
    p.add_argument("--pooling", default="2", help="g (g×g grid) or window,stride")
    p.add_argument("--kernel", default="laplace")
    p.add_argument("--metric", default="whiten", choices=["whiten", "identity", "dc"])
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--sigma-scale", type=float, default=1.0, help="σ = this × the median patch-to-atom distance")
    p.add_argument("--no-projector", action="store_true", help="raw pooled κ values instead of Nyström features")
    p.add_argument("--iterations", type=int, default=0)
    p.add_argument("--power", type=float, default=0.5)
    p.add_argument("--shrinkage", type=float, default=0.0)
    p.add_argument("--agop-samples", type=int, default=1000)
    p.add_argument("--patch-norm", type=float, metavar="EPS",
                   help="normalise each patch's brightness and contrast, (x − μ) / sqrt(var + EPS)")
    p.add_argument("--kmeans", type=int, default=0, metavar="T",
                   help="atoms by T iterations of k-means on the sampled patches (default: random patches)")
    p.add_argument("--encoding", default="nystrom", choices=ENCODINGS, help="patch codes: Nyström κ or Coates & Ng's triangle")
    p.add_argument("--standardise", action="store_true", help="scale every feature to unit variance before ridge")
    p.add_argument("--refit-atoms", action="store_true",
                   help="after a metric update, re-run k-means (--kmeans T) in the new metric's coordinates")
    p.add_argument("--head", default="ridge", choices=["ridge", "gaussian", "svm"],
                   help="ridge regression, a Nyström Gaussian kernel on the pooled features, or a squared-hinge SVM")
    p.add_argument("--centres", type=int, default=5000, help="Nyström centres of --head gaussian")
    p.add_argument("--top-sigma-scale", type=float, default=1.0, help="σ of --head gaussian, × the median distance")
    p.add_argument("--cache", help="file holding the first iteration's features (written if missing, else read)")
    p.add_argument("--penalties", default="1e-4,1e-3,1e-2,1e-1")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    data = np.load(args.data)
    labels = data["labels"]
    perm = np.random.default_rng(0).permutation(len(labels))
    tr, va = perm[: args.n], perm[len(labels) - args.n_val :]
    Xtr, mean, std = standardised(data["images"][tr])
    Xva, _, _ = standardised(data["images"][va], mean, std)
    ytr, yva = torch.tensor(labels[tr]).long(), torch.tensor(labels[va]).long()
    geometry = (PatchGeometry((3, 32, 32), args.patch_size) if args.patch_norm is None
                else NormalisedPatches((3, 32, 32), args.patch_size, eps=args.patch_norm))
    rows, val_rows = Xtr.reshape(len(Xtr), -1), Xva.reshape(len(Xva), -1)
    gen = torch.Generator().manual_seed(1)
    sample = rows[torch.randperm(len(rows), generator=gen)[:2000]]
    patches = geometry.patches(sample).reshape(-1, geometry.patch_dim)
    if args.metric == "whiten":
        M = whitening_metric(patch_covariance(patches), args.eps)
    else:
        M = fixed_metric(geometry.patch_dim, 0.2 if args.metric == "dc" else None)
    atoms = (patches[torch.randperm(len(patches), generator=gen)[: args.atoms]] if not args.kmeans
             else kmeans_atoms(patches[torch.randperm(len(patches), generator=gen)[:200_000]], metric_factor(M).float(),
                               args.atoms, args.kmeans))
    pool_spec = tuple(int(v) for v in args.pooling.split(","))
    pool = pooling_matrix(geometry.out_shape, pool_spec[0] if len(pool_spec) == 1 else pool_spec).float()
    Y = torch.nn.functional.one_hot(ytr, 10).float()
    for t in range(args.iterations + 1):
        tic = time.perf_counter()
        L = metric_factor(M).float()
        sigma = median_atom_distance(patches[:4000] @ L, atoms @ L) * args.sigma_scale
        fmap = PatchFeatureMap(geometry, L, atoms, BASE_KERNELS[args.kernel], sigma, pool, encoding=args.encoding)
        if args.no_projector:
            fmap.projector = torch.eye(args.atoms)
        if t == 0 and args.cache and os.path.exists(args.cache):
            F, Fv = torch.load(args.cache)
        else:
            F, Fv = fmap.transform(rows), fmap.transform(val_rows)
            if t == 0 and args.cache:
                torch.save((F, Fv), args.cache)
        encode = time.perf_counter() - tic
        if args.standardise:
            scale = F.std(0).clamp_min(1e-6 * F.std(0).max())
            F, Fv = F / scale, Fv / scale
        if args.head != "ridge":
            penalties = [float(v) for v in args.penalties.split(",")]
            fits = (gaussian_head(F, ytr, Fv, penalties, args.centres, args.top_sigma_scale) if args.head == "gaussian"
                    else squared_hinge_head(F, ytr, Fv, penalties))
            for penalty, val_scores, train_scores in fits:
                print(f"  {args.head} head, λ {penalty:g}: validation {100 * (val_scores.argmax(1) == yva).double().mean():.2f} %, "
                      f"train {100 * (train_scores.argmax(1) == ytr[:5000]).double().mean():.1f} %, "
                      f"{time.perf_counter() - tic - encode:.0f} s", flush=True)
            continue
        stats = RidgeStatistics.of(F, Y)
        fits = []
        for penalty in (float(v) for v in args.penalties.split(",")):
            W, b = stats.solve(penalty)
            val = ((Fv.double() @ W + b).argmax(1) == yva).double().mean().item()
            fits.append((val, penalty, W, b))
        val, penalty, W, b = max(fits, key=lambda f: f[0])
        train = ((F[:5000].double() @ W + b).argmax(1) == ytr[:5000]).double().mean().item()
        print(f"iteration {t}: sigma {sigma:.3g}, {F.shape[1]} features, validation {100 * val:.2f} % "
              f"(penalty {penalty:g}, train {100 * train:.1f} %), encode {encode:.0f} s, "
              f"solve {time.perf_counter() - tic - encode:.0f} s, "
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB", flush=True)
        if t < args.iterations:
            tic = time.perf_counter()
            G = fmap.transformed_agop(rows[: args.agop_samples], W.float())
            M = refine_metric(L.double(), G, args.power, args.shrinkage)
            if args.refit_atoms:
                atoms = kmeans_atoms(patches[torch.randperm(len(patches), generator=gen)[:200_000]],
                                     metric_factor(M).float(), args.atoms, args.kmeans)
            evals = torch.linalg.eigvalsh(G)
            print(f"  AGOP {time.perf_counter() - tic:.0f} s, effective rank {evals.sum().item() / evals[-1].item():.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
