r"""Explicit pooled patch features: the Nyström form of the pooled convolutional patch kernel.

With a dictionary of k atoms a_1 … a_k (patches) and the patch metric M = L Lᵀ, every patch gets the
features ψ(x_p) = κ(Lᵀx_p, LᵀA) K_AA^{-1/2} ∈ R^k (κ one of :mod:`falkon_convrfm.base_kernels`), and
an image the average of them over each pooling region R_r of the patch grid:

.. math::  Φ_r(x) = Σ_p Π_{rp}\, ψ(x_p) = \Big(Σ_p Π_{rp}\, κ(Lᵀx_p, LᵀA)\Big) K_AA^{-1/2}

(pool the kernel values first, project after). Then
⟨Φ(x), Φ(z)⟩ = Σ_r Σ_{p,p'} Π_{rp} Π_{rp'} κ̂(x_p, z_{p'}) with κ̂ the Nyström approximation of κ,
exact when every patch of x and z is an atom: the explicit form of the implicit pooled kernel of
:class:`~falkon_convrfm.kernel.ConvMahalanobisKernel`, at a cost linear in the pooling region.

The predictor f(x) = Σ_r Φ_r(x) W_r + b is linear in the features, so its patch gradient is

.. math::  ∇_{x_p} f_o(x) = L\, Σ_j β_{pjo}\, ∇_u κ(u, Lᵀa_j)\big|_{u = Lᵀx_p},
           \qquad β_p = Σ_r Π_{rp}\, K_AA^{-1/2} W_r \ (k × C)

and the patch AGOP in the metric's coordinates, G̃ = (1/n) Σ_{i,p,o} g̃ g̃ᵀ with ∇ = L g̃, is what
:func:`falkon_convrfm.metric.refine_metric` turns into the next metric (G = L G̃ Lᵀ in pixel space).

``encoding="triangle"`` replaces ψ by Coates & Ng's (2011) triangle code of the same distances,
ψ_j(u) = max(0, z̄ − z_j) with z_j = ‖u − Lᵀa_j‖ and z̄ = (1/k) Σ_l z_l: a sparse, competitive
code (about half the atoms inactive per patch), no bandwidth and no projector; pooled and solved
the same way. It is not a kernel's feature map, so it has no implicit counterpart.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ._compile import compiled_fn, use_compiled
from .patches import PatchGeometry
from .progress import phase, steps


ENCODINGS = ("nystrom", "triangle")
# Encoding chunks above this size run slower on CPU (allocation and cache misses), docs/performance.md.
CHUNK_BYTES = 2**25


# ---------------------------------------------------------------------------------------------- pooling
def pooling_matrix(out_shape: tuple, pooling) -> torch.Tensor:
    """Π (R, P) float64: average pooling of the (Ho, Wo) patch grid (row-major locations).

    ``pooling`` is an int g (a g×g grid of near-equal regions: 1 = global average, 2 = quadrants,
    boundaries as :func:`numpy.array_split`) or a pair (window, stride) (square windows, no
    padding, as ``avg_pool2d``). Each row of Π averages its region: entries 1/|R_r|."""
    ho, wo = out_shape
    if isinstance(pooling, int):
        rows = [_split(ho, pooling), _split(wo, pooling)]
    else:
        window, stride = pooling
        if window > min(ho, wo):
            raise ValueError(f"pooling window {window} is wider than the {ho}×{wo} grid of patch locations")
        rows = [[(s, s + window) for s in range(0, n - window + 1, stride)] for n in (ho, wo)]
    regions = []
    for a0, a1 in rows[0]:
        for b0, b1 in rows[1]:
            mask = torch.zeros(ho, wo, dtype=torch.float64)
            mask[a0:a1, b0:b1] = 1.0
            regions.append(mask.flatten() / mask.sum())
    return torch.stack(regions)


def _split(n: int, parts: int) -> list:
    if parts > n:
        raise ValueError(f"a {parts}×{parts} pooling grid needs at least {parts} patch locations per side, got {n}")
    bounds = [(n // parts) * i + min(i, n % parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------------------------- kernel values
def atom_kernel(U: torch.Tensor, A: torch.Tensor, base, sigma: float) -> torch.Tensor:
    """κ(U[..., i, :], A[j]) for transformed patches U (b, N, r) and atoms A (k, r): (b, N, k),
    one GEMM per batch in the base kernel's GEMM form."""
    form = base.gemm_form(sigma)
    b, n, r = U.shape
    Ab = A.unsqueeze(0)
    centre = form.context(Ab)
    left = U.new_empty(b, n, r + form.extra_columns)
    right = A.new_empty(1, A.shape[0], r + form.extra_columns)
    row_aux = form.write(U, centre, left, right=False)
    col_aux = form.write(Ab, centre, right, right=True)
    E = torch.matmul(left, right.transpose(1, 2))
    if row_aux is not None:
        col_aux = col_aux.expand(b, -1)
    gemm_map = compiled_fn(base.gemm_map) if use_compiled(E.numel()) else base.gemm_map
    return gemm_map(E, row_aux, col_aux)


def inverse_sqrt(K: torch.Tensor, rcond: float = 1e-6) -> torch.Tensor:
    """K^{-1/2} (pseudo-inverse square root) of a PSD matrix, eigenvalues below rcond·λ_max dropped."""
    evals, evecs = torch.linalg.eigh(K.double())
    keep = evals > rcond * evals[-1].clamp_min(0)
    V = evecs[:, keep]
    return ((V * evals[keep].rsqrt()) @ V.T).to(K.dtype)


def median_atom_distance(U: torch.Tensor, A: torch.Tensor) -> float:
    """Median distance ‖u − a‖ between transformed patches U (N, r) and atoms A (k, r)."""
    return torch.cdist(U.double(), A.double()).median().item()


def triangle_code(U: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """ψ_j(u) = max(0, z̄ − z_j), z_j = ‖u − a_j‖, z̄ = mean_l z_l, for U (b, N, r), A (k, r): (b, N, k)."""
    z = distances(U, A)
    return (z.mean(-1, keepdim=True) - z).clamp_min_(0)


def distances(U: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """‖u − a_j‖ for U (b, N, r), A (k, r), by one GEMM: (b, N, k)."""
    sq = torch.matmul(U, -2 * A.T).add_(U.pow(2).sum(-1, keepdim=True)).add_(A.pow(2).sum(-1))
    return sq.clamp_min_(0).sqrt_()


def triangle_gradient(U: torch.Tensor, A: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    r"""∇_u Σ_j β_jo ψ_j(u) of the triangle code, for U (b, N, r), atoms A (k, r), β (b, k, C): (b, N, C, r).

    With a_j = 1[ψ_j > 0], q_j = 1/z_j and s_o = Σ_j a_j β_jo,

    .. math::  ∇ = \frac{s_o}{k} Σ_l q_l (u − a_l) − Σ_j a_j β_{jo} q_j (u − a_j)

    (the subgradient 0 where z_j = 0)."""
    z = distances(U, A)
    active = (z < z.mean(-1, keepdim=True)).to(U.dtype)
    q = torch.where(z > 0, 1 / z.clamp_min(torch.finfo(z.dtype).tiny), torch.zeros_like(z))
    k, r = A.shape
    C = beta.shape[-1]
    s = torch.bmm(active, beta) / k  # (b, N, C)
    aq = active * q
    mean_dir = U * q.sum(-1, keepdim=True) - q @ A  # Σ_l q_l (u − a_l), (b, N, r)
    weighted = (beta.unsqueeze(-1) * A.unsqueeze(1)).reshape(beta.shape[0], k, C * r)
    own = torch.bmm(aq, weighted).view(U.shape[0], U.shape[1], C, r)  # Σ_j a_j q_j β_jo a_j
    own = torch.bmm(aq, beta).unsqueeze(-1) * U.unsqueeze(2) - own  # Σ_j a_j q_j β_jo (u − a_j)
    return s.unsqueeze(-1) * mean_dir.unsqueeze(2) - own


# ---------------------------------------------------------------------------------------------- dictionary
def kmeans_atoms(patches: torch.Tensor, factor: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    r"""k atoms (k, d) by Lloyd's k-means of ``patches`` (N, d) in the metric's coordinates Lᵀx
    (Coates & Ng 2011), started from the first k patches (pass them shuffled):

    .. math::  c(i) = \arg\min_j ‖Lᵀ(x_i − a_j)‖, \qquad a_j ← \operatorname{mean}\{x_i : c(i) = j\}

    (the mean commutes with Lᵀ, so centroids stay in pixel space); an empty cluster keeps its atom."""
    atoms = patches[:k].clone()
    U = patches @ factor
    for _ in steps(range(iterations), "k-means dictionary"):
        C = atoms @ factor
        nearest = torch.cat([torch.cdist(U[i : i + 8192], C).argmin(1) for i in range(0, U.shape[0], 8192)])
        sums = torch.zeros_like(atoms).index_add_(0, nearest, patches)
        counts = torch.bincount(nearest, minlength=k)
        filled = counts > 0
        atoms[filled] = sums[filled] / counts[filled, None].to(atoms.dtype)
    return atoms


# ---------------------------------------------------------------------------------------------- the feature map
@dataclasses.dataclass
class PatchFeatureMap:
    """Φ: images (rows of c·H·W) → pooled patch codes (R·k), Nyström or triangle, for one metric factor L.

    ``atoms`` (k, d) are patches in pixel space; ``factor`` L (d, r); ``pool`` Π (R, P);
    ``encoding`` one of :data:`ENCODINGS` (``base`` and ``sigma`` serve ``"nystrom"`` only)."""

    geometry: PatchGeometry
    factor: torch.Tensor
    atoms: torch.Tensor
    base: object
    sigma: float
    pool: torch.Tensor
    rcond: float = 1e-6
    encoding: str = "nystrom"

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        self.atoms_t = self.atoms @ self.factor  # LᵀA, (k, r)
        self.projector = None
        if self.encoding == "nystrom":
            K = atom_kernel(self.atoms_t.unsqueeze(0), self.atoms_t, self.base, self.sigma)[0]
            self.projector = inverse_sqrt(K, self.rcond)  # K_AA^{-1/2}

    @property
    def num_features(self) -> int:
        return self.pool.shape[0] * self.atoms.shape[0]

    def rows_per_chunk(self, max_mem: float) -> int:
        """Rows whose kernel values (P·k) and pooled features fit in ``max_mem`` bytes (×3 for
        temporaries), and in CHUNK_BYTES (cache-sized chunks are faster than large ones)."""
        P, k = self.geometry.num_locations, self.atoms.shape[0]
        per_row = 3 * (P * (k + self.factor.shape[1] + 2) + self.num_features) * self.atoms.element_size()
        return int(max(1, min(max_mem, CHUNK_BYTES) // per_row))

    def codes(self, U: torch.Tensor) -> torch.Tensor:
        """Per-patch codes of transformed patches U (b, N, r): κ(u, LᵀA) or the triangle code, (b, N, k)."""
        if self.encoding == "triangle":
            return triangle_code(U, self.atoms_t)
        return atom_kernel(U, self.atoms_t, self.base, self.sigma)

    def pooled_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """Σ_p Π_rp code(Lᵀx_p): (n, R, k)."""
        U = self.geometry.transformed_patches(rows, self.factor).transpose(0, 1)  # (n, P, r)
        codes = self.codes(U)  # (n, P, k)
        return torch.matmul(self.pool.to(codes.dtype), codes)

    def transform(self, rows: torch.Tensor, max_mem: float = 2**30) -> torch.Tensor:
        """Φ(rows): (n, R·k), computed in row chunks within ``max_mem`` bytes."""
        step = self.rows_per_chunk(max_mem)
        out = rows.new_empty(rows.shape[0], self.num_features)
        with phase("patch features", rows.shape[0], "img") as bar:
            for i in range(0, rows.shape[0], step):
                pooled = self.pooled_codes(rows[i : i + step])
                if self.projector is not None:
                    pooled = torch.matmul(pooled, self.projector)
                out[i : i + step] = pooled.reshape(pooled.shape[0], -1)
                bar.update(pooled.shape[0])
        return out

    def location_coefficients(self, weights: torch.Tensor) -> torch.Tensor:
        """β (P, k, C) = Σ_r Π_rp K_AA^{-1/2} W_r (no K_AA^{-1/2} for the triangle code), for linear
        weights W (R·k, C) on Φ."""
        R, k = self.pool.shape[0], self.atoms.shape[0]
        W = weights.reshape(R, k, -1)
        if self.projector is not None:
            W = torch.matmul(self.projector, W.to(self.projector.dtype))  # (R, k, C)
        return torch.einsum("rp,rkc->pkc", self.pool.to(W.dtype), W)

    def transformed_agop(self, rows: torch.Tensor, weights: torch.Tensor, max_mem: float = 2**30) -> torch.Tensor:
        """G̃ (r, r) float64: (1/n) Σ_{i,p,o} g̃ g̃ᵀ with g̃ = Σ_j β_pjo ∇_u ψ_j(u) at u = Lᵀx_{i,p}
        (the patch AGOP of Φ(x)·W in the metric's coordinates; pixel-space AGOP = L G̃ Lᵀ)."""
        beta = self.location_coefficients(weights).to(rows.dtype)  # (P, k, C)
        P, k, C = beta.shape
        r = self.factor.shape[1]
        per_pair = (3 * k + 3 * C * r) * rows.element_size()
        locs = int(max(1, min(P, max_mem // (per_pair * max(rows.shape[0], 1) + k * C * r * rows.element_size()))))
        G = torch.zeros(r, r, dtype=torch.float64, device=rows.device)
        U = self.geometry.transformed_patches(rows, self.factor)  # (P, n, r)
        with phase("patch AGOP", P, "loc") as bar:
            for p0 in range(0, P, locs):
                Up = U[p0 : p0 + locs].contiguous()
                b = beta[p0 : p0 + locs]
                g = (triangle_gradient(Up, self.atoms_t, b) if self.encoding == "triangle"
                     else self._kernel_gradient(Up, b)).reshape(-1, r)
                G += (g.T @ g).double()
                bar.update(Up.shape[0])
        return G / rows.shape[0]

    def _kernel_gradient(self, U: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """∇_u Σ_j β_jo κ(u, Lᵀa_j) for U (b, N, r), β (b, k, C): (b, N, C, r)."""
        k, C, r = beta.shape[1], beta.shape[2], U.shape[-1]
        Ut, At, Q, S = self.base.gradient_weights(U, self.atoms_t.unsqueeze(0).expand(U.shape[0], -1, -1), self.sigma)
        weighted = (beta.unsqueeze(-1) * At.unsqueeze(2)).reshape(beta.shape[0], k, C * r)
        g = torch.bmm(Q, weighted).view(beta.shape[0], -1, C, r)
        coef = torch.bmm(S if S is not None else -Q, beta)  # (b, N, C)
        return g.add_(coef.unsqueeze(3) * Ut.unsqueeze(2))


# ---------------------------------------------------------------------------------------------- linear head
def add_upper_gram_(gram: torch.Tensor, X: torch.Tensor, block: int = 2048) -> None:
    """gram[i:i+b, i:] += (XᵀX)[i:i+b, i:] for column blocks of width b: the block upper triangle of
    XᵀX (about half the GEMM flops of the full product), accumulated in gram's dtype."""
    for i in range(0, X.shape[1], block):
        gram[i : i + block, i:] += (X[:, i : i + block].T @ X[:, i:]).to(gram.dtype)


def mirror_upper_(gram: torch.Tensor, block: int = 2048) -> None:
    """Copy the block upper triangle written by :func:`add_upper_gram_` onto the lower one."""
    for i in range(0, gram.shape[0], block):
        gram[i + block :, i : i + block] = gram[i : i + block, i + block :].T


def ridge_resident_bytes(n_rows: int, n_features: int, itemsize: int) -> int:
    """Bytes that stay resident while the ridge head is fitted: the feature matrix of n rows
    (training and validation) n·D·itemsize, and the Gram matrix and its Cholesky factor 2·D²·8."""
    return n_rows * n_features * itemsize + 2 * n_features**2 * 8


@dataclasses.dataclass
class RidgeStatistics:
    """Centred normal equations of ridge regression on features F (n, D) and targets Y (n, C):
    Fc = F − F̄, gram = Fcᵀ Fc, cross = Fcᵀ (Y − Ȳ), in float64."""

    mean: torch.Tensor
    target_mean: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor

    @classmethod
    def of(cls, F: torch.Tensor, Y: torch.Tensor, rows_per_chunk: int = 4096) -> "RidgeStatistics":
        mean = F.double().mean(0)
        target_mean = Y.double().mean(0)
        gram = torch.zeros(F.shape[1], F.shape[1], dtype=torch.float64, device=F.device)
        cross = torch.zeros(F.shape[1], Y.shape[1], dtype=torch.float64, device=F.device)
        for i in steps(range(0, F.shape[0], rows_per_chunk), "ridge statistics", unit="chunk"):
            Fc = F[i : i + rows_per_chunk] - mean.to(F.dtype)
            add_upper_gram_(gram, Fc)
            cross += Fc.T.double() @ (Y[i : i + rows_per_chunk].double() - target_mean)
        mirror_upper_(gram)
        return cls(mean, target_mean, gram, cross)

    def factor(self, penalty: float):
        """(L, ridge): the lower Cholesky factor of gram + ridge·I, ridge = λ·tr(gram)/D (λ relative
        to the mean feature variance times n, so one grid serves every feature scale)."""
        ridge = penalty * torch.trace(self.gram) / self.gram.shape[0]
        if ridge <= 0:
            raise ValueError("every feature takes one value on all training images (e.g. constant images): "
                             "the head has nothing to fit")
        A = self.gram.clone()
        A.diagonal().add_(ridge)  # gram + ridge·I without a D×D identity beside it
        return torch.linalg.cholesky(A, out=A), ridge  # positive definite; factored in place

    def solve(self, penalty: float):
        """(W, b) minimising ‖Fc W − Yc‖² + ridge·‖W‖² (:meth:`factor`)."""
        W = torch.cholesky_solve(self.cross, self.factor(penalty)[0])
        return W, self.target_mean - self.mean @ W
