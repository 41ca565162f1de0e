r"""DeepPatchFeatureRFM: a deep model made of explicit patch-feature layers.

Layer ℓ takes a c_ℓ-channel map x^ℓ (an image: layer 0's input is the picture), encodes every
q_ℓ×q_ℓ patch in its own metric M_ℓ = L_ℓ L_ℓᵀ (L_ℓ of rank r_ℓ) against its k_ℓ atoms
(:class:`~falkon_convrfm.features.PatchFeatureMap`: triangle codes or Nyström features), and
average-pools the code map with the local pooling Π_ℓ:

.. math::  x^{ℓ+1}_{j,r} = Σ_p Π_{ℓ,rp}\, ψ_j(L_ℓᵀ x^ℓ_p), \qquad x^{ℓ+1} ∈ R^{k_ℓ × H_{ℓ+1} × W_{ℓ+1}}

(channel j = atom j, the pooled regions r form the new H×W grid). The head is a ridge regression
on the last map pooled on a g×g grid. Training is greedy, layer by layer: layer ℓ runs the
PatchFeatureRFM iterations on its input maps with the composite pool Π_grid·Π_ℓ (its features are
exactly the grid-pooled output map, so ``transformed_agop`` gives the patch AGOP of the head
fitted on them), keeps the iterate best on the validation split, and is frozen. The last layer's
kept head is the model's head.

Metrics on many-channel patches stay affordable by their rank: the start factor is PCA whitening
on the top r principal directions (:func:`~falkon_convrfm.metric.whitening_factor`) and the update
refines it in those r coordinates (:func:`~falkon_convrfm.metric.refine_factor`): encoding costs
O(P·r·(d + k)) per image, the AGOP is r×r, and no d×d matrix is formed during the fit.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from .base_kernels import BASE_KERNELS
from .estimator import COMMON_PARAMS, LearnedMetric, RFMEstimator, warn_tied_iterates
from .feature_rfm import KMEANS_ITERATIONS, PATCH_FEATURE_PARAMS, check_encoding, code_bandwidth
from .features import PatchFeatureMap, RidgeStatistics, kmeans_atoms, pooling_matrix
from .memory import memory_budget
from .metric import patch_covariance, principal_factor, refine_factor, whitening_factor
from .params import POOLING, AnyOf, Integer, OneOf, Param, check_params, table
from .patches import PatchGeometry
from .persistence import data_fingerprint, plain_dataclass
from .presets import preset_params
from .progress import scoped, steps
from .scoring import evaluate
from .validation import positive_int

CHECKPOINT_NAME = "deep_feature_rfm_checkpoint.pt"
# Training images whose patches give a layer's covariance, atoms and median distance.
DATA_IMAGES = 2000
# Patches sampled per layer (at most; fewer when they would take more than a quarter of the budget).
SAMPLE_PATCHES = 200_000
# Of them, the patches whose covariance gives the start metric (float64 copies of d-dim patches).
COVARIANCE_PATCHES = 50_000
METRICS = ("whiten", "identity")
DEFAULT_MEMORY = 2**30

# The fields of a FeatureLayer (defaults: its own).
LAYER_PARAMS = table(
    Param("patch_size", Integer(1), "patch side q of the layer"),
    Param("padding", Integer(0), "zero padding of the layer's input map"),
    Param("n_atoms", Integer(1), "atoms k: the layer's output channels"),
    Param("rank", AnyOf((OneOf((None,)), Integer(1))), "rank r of the layer's metric (None: full, d = c·q²)", "--rank",
          "R"),
    Param("pool", AnyOf((OneOf((None,)), POOLING)), "local average pooling of the code map: None, g (a g×g map) "
                                                    "or (window, stride)"),
    Param("iterations", Integer(0), "metric updates of the layer"),
)


@plain_dataclass
@dataclasses.dataclass
class FeatureLayer:
    """One explicit feature layer: q×q patches (``padding``) of its input map, k = ``n_atoms``
    codes in a metric of rank ``rank`` (None: full), learned by ``iterations`` AGOP updates, local
    average pooling ``pool`` (None, g or (window, stride)) of the code map."""

    patch_size: int = 3
    padding: int = 0
    n_atoms: int = 256
    rank: int | None = None
    pool: object = (3, 2)
    iterations: int = 1

    def __post_init__(self):
        check_params(LAYER_PARAMS, self)


def layer_ladder(depth: int, width: int = 256, rank: int | None = 256, iterations: int = 1) -> list:
    """``depth`` 3×3 layers of ``width`` atoms and metric rank ``rank``, each pooled (3, 2) but the
    last (the head's grid pooling follows it)."""
    return [FeatureLayer(3, 0, width, rank, None if i == depth - 1 else (3, 2), iterations) for i in range(depth)]


# ---------------------------------------------------------------------------------------------- layer math
def pooled_shape(out_shape: tuple, pool) -> tuple:
    """(H', W') of a (Ho, Wo) grid pooled by ``pool``: None (unchanged), g, or (window, stride)."""
    if pool is None:
        return tuple(out_shape)
    if isinstance(pool, int):
        return (pool, pool)
    window, stride = pool
    return tuple((n - window) // stride + 1 for n in out_shape)


def local_pooling(out_shape: tuple, pool) -> torch.Tensor:
    """Π_ℓ (R, P) float64 of ``pool`` on the (Ho, Wo) grid: the identity for None."""
    if pool is None:
        return torch.eye(out_shape[0] * out_shape[1], dtype=torch.float64)
    return pooling_matrix(out_shape, pool)


def composite_pooling(out_shape: tuple, pool, grid: int) -> torch.Tensor:
    """Π_grid·Π_ℓ (g², P): the g×g grid pooling of the pooled map, as one pooling of the patch grid."""
    return pooling_matrix(pooled_shape(out_shape, pool), grid) @ local_pooling(out_shape, pool)


def output_shape(geometry: PatchGeometry, layer: FeatureLayer) -> tuple:
    """(k, H', W'): the shape of the layer's output map."""
    return (layer.n_atoms, *pooled_shape(geometry.out_shape, layer.pool))


def layer_output(fmap: PatchFeatureMap, rows: torch.Tensor, max_mem: float) -> torch.Tensor:
    """The output maps of ``rows`` through a layer whose feature map pools locally: Φ (n, R·k),
    region-major, as images (n, k·H'·W') (channel j = atom j)."""
    R, k = fmap.pool.shape[0], fmap.atoms.shape[0]
    F = fmap.transform(rows, max_mem)
    return F.view(rows.shape[0], R, k).transpose(1, 2).reshape(rows.shape[0], k * R)


class LayerInputs:
    """Image rows seen through frozen layers (``maps``: their local feature maps), by row chunks of
    at most ``budget`` bytes of maps; the maps of all rows are held when they fit in ``budget``,
    else recomputed chunk by chunk each time they are read."""

    def __init__(self, rows: torch.Tensor, maps: list, budget: float):
        self.rows, self.maps, self.budget = rows, maps, budget
        sizes = [rows.shape[1]] + [fm.num_features for fm in maps]
        per_row = 3 * sum(sizes) * rows.element_size()
        self.step = int(max(1, budget // per_row))
        self.held = None
        if maps and sizes[-1] * rows.shape[0] * rows.element_size() <= budget:
            self.held = rows.new_empty(rows.shape[0], sizes[-1])
            for i in range(0, rows.shape[0], self.step):
                self.held[i : i + self.step] = self._compute(rows[i : i + self.step])

    def _compute(self, rows: torch.Tensor) -> torch.Tensor:
        for fmap in self.maps:
            rows = layer_output(fmap, rows, self.budget)
        return rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def _slice(self, start: int, stop: int) -> torch.Tensor:
        if not self.maps:
            return self.rows[start:stop]
        return self.held[start:stop] if self.held is not None else self._compute(self.rows[start:stop])

    def chunks(self):
        """(start, maps of rows[start : start + step]) for every chunk."""
        for i in range(0, len(self), self.step):
            yield i, self._slice(i, i + self.step)

    def all(self) -> torch.Tensor:
        """The maps of every row."""
        if not self.maps:
            return self.rows
        return self.held if self.held is not None else torch.cat([m for _, m in self.chunks()])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The maps of rows ``index``."""
        if not self.maps:
            return self.rows[index]
        if self.held is not None:
            return self.held[index]
        return torch.cat([self._compute(self.rows[index[i : i + self.step]]) for i in range(0, index.shape[0], self.step)])

    def transform(self, fmap: PatchFeatureMap) -> torch.Tensor:
        """Φ (n, features) of ``fmap`` on the maps, chunk by chunk."""
        out = self.rows.new_empty(len(self), fmap.num_features)
        for i, maps in self.chunks():
            out[i : i + maps.shape[0]] = fmap.transform(maps, self.budget)
        return out


def sample_patches(inputs: LayerInputs, index: torch.Tensor, geometry: PatchGeometry, count: int,
                   generator: torch.Generator) -> torch.Tensor:
    """About ``count`` patches (N, d) of the maps of rows ``index``: the same number of random
    locations from each image, shuffled; the patches of at most ``inputs.budget`` bytes unfolded at once."""
    P, d = geometry.num_locations, geometry.patch_dim
    per_image = max(1, min(P, -(-count // max(index.shape[0], 1))))
    step = int(max(1, inputs.budget // (2 * P * d * inputs.rows.element_size())))
    parts = []
    for i in range(0, index.shape[0], step):
        patches = geometry.patches(inputs.take(index[i : i + step]))  # (b, P, d)
        pick = torch.rand(patches.shape[0], P, generator=generator).argsort(1)[:, :per_image].to(patches.device)
        parts.append(patches.gather(1, pick.unsqueeze(-1).expand(-1, -1, d)).reshape(-1, d))
    patches = torch.cat(parts)
    return patches[torch.randperm(patches.shape[0], generator=generator).to(patches.device)]


# ---------------------------------------------------------------------------------------------- estimator
# DeepPatchFeatureRFM's own parameters (defaults: its signature); the layers are checked by LAYER_PARAMS.
_SHARED = ("dictionary", "encoding", "kernel", "sigma", "whiten_eps", "agop_power", "shrinkage", "agop_samples",
           "penalty", "penalty_grid")
DEEP_FEATURE_PARAMS = table(
    PATCH_FEATURE_PARAMS["image_shape"],
    Param("pooling", Integer(1), "g×g grid pooling of the last map before the head", "--pooling", "G"),
    Param("metric", OneOf(METRICS), "starting metric of every layer: whiten (PCA whitening of rank r) or identity "
                                    "(the projection on the top r principal directions)", "--metric"),
    *(PATCH_FEATURE_PARAMS[name] for name in _SHARED),
)


class DeepPatchFeatureRFM(RFMEstimator):
    """Deep recursive feature machine on explicit patch features: feature layers (patch codes in a
    learned low-rank metric, local pooling) stacked as images, a ridge head on the last map.

    Parameters
    ----------
    image_shape : tuple or None, default None
        (c, H, W); needed only when ``fit`` gets flat rows.
    layers : sequence of FeatureLayer or dict, default ``layer_ladder(2, 256, 256)``
        One :class:`FeatureLayer` per layer (patch_size, padding, n_atoms, rank, pool, iterations).
    pooling : int, default 2
        g×g grid pooling of the last map before the head (also of each layer's map while its
        metric is learned).
    dictionary, encoding, kernel, sigma, whiten_eps, agop_power, shrinkage, agop_samples, penalty, penalty_grid
        As in :class:`~falkon_convrfm.PatchFeatureRFM`, for every layer.
    metric : {'whiten', 'identity'}, default 'whiten'
        Starting metric of every layer, of the layer's rank r: PCA whitening on the top r principal
        directions of the layer's input patches, or the projection on them (the identity at full rank).
    task, validation_fraction, preprocess, dtype, device, max_memory, random_state, checkpoint_dir, channels_last, progress
        As in :class:`~falkon_convrfm.ConvRFM`; ``max_memory`` (default 1 GiB) also bounds the
        layers' intermediate maps held at once. A checkpoint is saved after every iteration of
        every layer.

    Attributes
    ----------
    factors_ : the kept L_ℓ (d_ℓ × r_ℓ) per layer.  atoms_ : per layer (k_ℓ, d_ℓ).  sigmas_ : per layer.
    coef_, intercept_ : the head.  history_ : per layer, the records of its iterations.
    best_iterations_, shapes_ (input shape of each layer, then the last map's), classes_, image_shape_, task_, seed_.
    """

    def __init__(
        self,
        image_shape=None,
        layers=tuple(layer_ladder(2)),
        pooling=2,
        dictionary="kmeans",
        encoding="triangle",
        kernel="laplace",
        sigma="median",
        metric="whiten",
        whiten_eps=0.1,
        agop_power=0.5,
        shrinkage=0.0,
        agop_samples=1000,
        penalty=0.1,
        penalty_grid=(0.1, 0.3, 1.0, 3.0, 10.0),
        task="auto",
        validation_fraction=0.1,
        preprocess="standardize",
        dtype="float32",
        device="cpu",
        max_memory=None,
        random_state=None,
        checkpoint_dir=None,
        channels_last="auto",
        progress=True,
    ):
        self.image_shape = image_shape
        self.layers = layers
        self.pooling = pooling
        self.dictionary = dictionary
        self.encoding = encoding
        self.kernel = kernel
        self.sigma = sigma
        self.metric = metric
        self.whiten_eps = whiten_eps
        self.agop_power = agop_power
        self.shrinkage = shrinkage
        self.agop_samples = agop_samples
        self.penalty = penalty
        self.penalty_grid = penalty_grid
        self.task = task
        self.validation_fraction = validation_fraction
        self.preprocess = preprocess
        self.dtype = dtype
        self.device = device
        self.max_memory = max_memory
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.channels_last = channels_last
        self.progress = progress

    _PARAMS = {**DEEP_FEATURE_PARAMS, **COMMON_PARAMS}
    _FITTED = ("coef_", "intercept_", "factors_", "atoms_", "sigmas_", "history_", "best_iterations_", "shapes_",
               "preprocessor_", "classes_", "image_shape_", "task_", "seed_")
    _CHECKPOINT = CHECKPOINT_NAME

    @classmethod
    def preset(cls, name: str, device: str = "cpu", **overrides) -> "DeepPatchFeatureRFM":
        """The estimator with preset ``name``'s parameters for ``device`` (``--model deep``),
        ``overrides`` replacing any of them."""
        return cls(**{**preset_params(name, device, "deep"), **overrides})

    # ------------------------------------------------------------------ parameters
    def _layers(self) -> list:
        if isinstance(self.layers, (FeatureLayer, dict, str)) or not hasattr(self.layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of FeatureLayer (or dicts of its fields), got {self.layers!r}")
        specs = []
        for index, spec in enumerate(self.layers):
            try:
                specs.append(spec if isinstance(spec, FeatureLayer) else FeatureLayer(**spec))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"layers[{index}]: {exc}") from None
        if not specs:
            raise ValueError("layers is empty: give at least one FeatureLayer")
        return specs

    def _check_params(self):
        super()._check_params()
        check_encoding(self.encoding, self.kernel, self.sigma)
        return self._layers()

    def _check_image_shape(self, image_shape):
        self._shapes(image_shape)  # stride 1: every pixel is in a patch (no few-locations warning to give)

    def _shapes(self, image_shape) -> list:
        """The input shape of every layer, then the last map's; ValueError naming the layer whose
        patches or pooling do not fit its input."""
        shapes = [tuple(image_shape)]
        for index, layer in enumerate(self._layers()):
            _, h, w = shapes[-1]
            q, pad = layer.patch_size, layer.padding
            if q > min(h, w) + 2 * pad:
                raise ValueError(f"layers[{index}]: its {q}×{q} patches do not fit its {h}×{w} input map (padding {pad}): "
                                 "use fewer layers, less pooling or smaller patches")
            geometry = PatchGeometry(shapes[-1], q, 1, pad)
            try:
                composite_pooling(geometry.out_shape, layer.pool, self.pooling)
            except ValueError as exc:
                raise ValueError(f"layers[{index}] on its {h}×{w} input map: {exc}") from None
            shapes.append(output_shape(geometry, layer))
        return shapes

    def _memory(self) -> float:
        return memory_budget(self.max_memory, self.device, default=DEFAULT_MEMORY)

    # ------------------------------------------------------------------ layer maps
    def _map(self, index: int, factor, atoms, sigma, head: bool) -> PatchFeatureMap:
        """Layer ``index``'s feature map: its local output map, or (``head``) the grid-pooled one."""
        layer, shape = self._layers()[index], self.shapes_[index]
        geometry = PatchGeometry(shape, layer.patch_size, 1, layer.padding)
        pool = (composite_pooling(geometry.out_shape, layer.pool, self.pooling) if head
                else local_pooling(geometry.out_shape, layer.pool))
        dtype = atoms.dtype
        return PatchFeatureMap(geometry, factor.to(atoms.device, dtype), atoms, BASE_KERNELS[self.kernel], sigma,
                               pool.to(atoms.device, dtype), encoding=self.encoding)

    def _frozen_maps(self, depth: int) -> list:
        return [self._map(i, self.factors_[i], self.atoms_[i], self.sigmas_[i], head=False) for i in range(depth)]

    def _start_factor(self, patches: torch.Tensor, rank) -> torch.Tensor:
        cov = patch_covariance(patches[:COVARIANCE_PATCHES])
        return whitening_factor(cov, self.whiten_eps, rank) if self.metric == "whiten" else principal_factor(cov, rank)

    def _bandwidth(self, factor, atoms, patches) -> float | None:
        return code_bandwidth(self.encoding, self.sigma, factor, atoms, patches)

    # ------------------------------------------------------------------ fit
    @scoped
    def fit(self, X, y, X_val=None, y_val=None):
        """Fit the layers greedily, then keep the last layer's head; validation data as in
        :class:`~falkon_convrfm.ConvRFM`. Returns self."""
        specs = self._check_params()
        store = self._store()
        data = self._prepare(X, y, X_val, y_val, self._fit_seed(store))
        self.shapes_ = self._shapes(data.image_shape)
        fingerprint = data_fingerprint(data.Xtr, data.Ytr, data.Xval)
        saved = store.load(fingerprint) or {"layers": [], "current": None}
        self.factors_, self.atoms_, self.sigmas_, self.history_, self.best_iterations_ = [], [], [], [], []
        for index in steps(range(len(specs)), "DeepPatchFeatureRFM layers", unit="layer", leave=True):
            if index < len(saved["layers"]):
                done = saved["layers"][index]
            else:
                done = self._fit_layer(index, data, store, fingerprint, saved)
                saved = {"layers": saved["layers"] + [done], "current": None}
                store.save(fingerprint, self.seed_, saved)
            self.factors_.append(done["factor"])
            self.atoms_.append(done["atoms"])
            self.sigmas_.append(done["sigma"])
            self.history_.append(done["history"])
            self.best_iterations_.append(done["iteration"])
            self.coef_, self.intercept_ = done["coef"], done["intercept"]
        self._restore()
        return self

    def _fit_layer(self, index: int, data, store, fingerprint, saved) -> dict:
        """The greedy fit of layer ``index`` on the maps of the frozen layers before it: the kept
        iterate (factor, atoms, sigma, head, iteration) and its history."""
        layer = self._layers()[index]
        setup = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed_ + 1 + index)
        budget, key = self._memory(), ("accuracy" if self.task_ == "classification" else "r2")
        maps = self._frozen_maps(index)
        train, val = LayerInputs(data.Xtr, maps, budget), LayerInputs(data.Xval, maps, budget)
        n = len(train)
        geometry = PatchGeometry(self.shapes_[index], layer.patch_size, 1, layer.padding)
        sample = torch.randperm(n, generator=gen)[:DATA_IMAGES].to(data.Xtr.device)
        count = int(min(SAMPLE_PATCHES, max(layer.n_atoms, budget // (4 * geometry.patch_dim * data.Xtr.element_size()))))
        patches = sample_patches(train, sample, geometry, count, gen)
        if layer.n_atoms > patches.shape[0]:
            raise ValueError(f"layers[{index}].n_atoms={layer.n_atoms} is more than the {patches.shape[0]} training "
                             "patches sampled")
        start = self._start_factor(patches, layer.rank)
        atoms = (patches[: layer.n_atoms].clone() if self.dictionary == "random" else
                 kmeans_atoms(patches, start.to(patches.device, patches.dtype), layer.n_atoms, KMEANS_ITERATIONS))
        agop_idx = torch.randperm(n, generator=gen)[: min(self.agop_samples, n)].sort().values.to(data.Xtr.device)
        agop_maps = train.take(agop_idx)
        current = saved["current"]
        if current is not None and current["layer"] == index:
            t0, factor, best, history = current["next"], current["factor"], current["best"], current["history"]
        else:
            t0, factor, best, history = 0, start, None, []
        for t in steps(range(t0, layer.iterations + 1), f"layer {index}", layer.iterations + 1, "iteration", t0):
            record = {"layer": index, "iteration": t, "rank": factor.shape[1]}
            if setup is not None:  # sampling the patches, the start metric, the dictionary, the input maps
                record["time_setup"], setup = time.perf_counter() - setup, None
            tic = time.perf_counter()
            sigma = self._bandwidth(factor, atoms, patches)
            fmap = self._map(index, factor, atoms, sigma, head=True)
            F, Fval = train.transform(fmap), val.transform(fmap)
            record.update(sigma=sigma, features=fmap.num_features, time_encode=time.perf_counter() - tic)
            tic = time.perf_counter()
            stats = RidgeStatistics.of(F, data.Ytr)
            fits = []
            for penalty in [self.penalty * f for f in self.penalty_grid]:
                W, b = stats.solve(penalty)
                score = evaluate(self.task_, Fval.double() @ W + b, data.Yval)[key] if len(val) else -np.inf
                fits.append((score, penalty, W, b))
            val_score, penalty, W, b = max(fits, key=lambda f: f[0])
            record["penalty"] = penalty
            record.update({"train_" + k: v for k, v in
                           evaluate(self.task_, F[agop_idx].double() @ W + b, data.Ytr[agop_idx]).items()})
            if len(val):
                record["val_" + key] = val_score
            record["time_solve"] = time.perf_counter() - tic
            score = val_score if len(val) else t
            if best is None or score > best["score"]:
                best = {"score": score, "iteration": t, "factor": factor, "sigma": sigma,
                        "coef": W.to(F.dtype), "intercept": b.to(F.dtype)}
            if t < layer.iterations:
                tic = time.perf_counter()
                factor = refine_factor(fmap.factor, fmap.transformed_agop(agop_maps, W.to(F.dtype), budget),
                                       self.agop_power, self.shrinkage)
                record["time_agop"] = time.perf_counter() - tic
            history.append(record)
            store.save(fingerprint, self.seed_, {**saved, "current": {"layer": index, "next": t + 1, "factor": factor,
                                                                      "best": best, "history": history}})
        warn_tied_iterates(history, best["iteration"], key, f"layer {index}: ")
        return {"factor": best["factor"], "atoms": atoms, "sigma": best["sigma"], "coef": best["coef"],
                "intercept": best["intercept"], "iteration": best["iteration"], "history": history}

    # ------------------------------------------------------------------ fitted model
    @scoped
    def transform(self, X, depth: int | None = None):
        """Output maps of X after the first ``depth`` layers (all by default), as rows of
        (k, H', W') maps (numpy for numpy input, torch for torch input): the features of NC1/NC2."""
        self._check_fitted()
        if depth is not None and positive_int("depth", depth, minimum=0) > len(self.factors_):
            raise ValueError(f"depth={depth} is more than the {len(self.factors_)} layers of this model")
        return self._output(LayerInputs(self._rows(X), self.maps_[:depth], self._memory()).all(), X)

    def learned_metric(self, layer: int | None = None) -> LearnedMetric:
        """The kept metric M_ℓ = L_ℓ L_ℓᵀ of layer ``layer`` (default: the last) with its history,
        for the filters picture (:func:`~falkon_convrfm.viz.plot_filters`)."""
        self._check_fitted()
        last = len(self.factors_) - 1
        layer = last if layer is None else positive_int("layer", layer, minimum=0)
        if layer > last:
            raise ValueError(f"layer {layer} is out of range: this {type(self).__name__} has layers 0..{last}")
        spec, L = self._layers()[layer], self.factors_[layer].double().cpu()
        best = self.best_iterations_[layer]
        return LearnedMetric(f"layer {layer}", {best: L @ L.T}, self.history_[layer], best,
                             tuple(self.shapes_[layer]), spec.patch_size, 1, spec.padding)

    def _device(self) -> torch.device:
        return self.coef_.device

    def _scores(self, rows: torch.Tensor) -> torch.Tensor:
        """f(rows) = Φ(maps of rows) W + b (n, C), streamed through the layers."""
        inputs = LayerInputs(rows.to(self.atoms_[0].dtype), self.maps_[:-1], self._memory())
        return inputs.transform(self.head_map_) @ self.coef_ + self.intercept_

    def _to_device(self, device: torch.device) -> None:
        self.atoms_ = [a.to(device) for a in self.atoms_]
        self.coef_, self.intercept_ = self.coef_.to(device), self.intercept_.to(device)
        self._restore()

    def _restore(self) -> None:
        self.maps_ = self._frozen_maps(len(self.factors_))
        last = len(self.factors_) - 1
        self.head_map_ = self._map(last, self.factors_[last], self.atoms_[last], self.sigmas_[last], head=True)
