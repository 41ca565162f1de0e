"""GPU check (issue 9): the kernel backends on one CUDA device, and ConvRFM end to end.

Prints, in this order (each section in its own try/except, so one failure still prints the rest):

1. the environment, and which backend ``backend="auto"`` runs and why;
2. fp32 and TF32 GEMM rates (torch.matmul, 8192², ``torch.backends.cuda.matmul.allow_tf32``);
3. per base kernel, backend (torch, triton) and Triton precision: the max relative error
   (max |error| / max |reference|) of K, K v and the patch AGOP against the CPU float64 path, on
   the CIFAR geometry (3×32×32, q = 3, P = 900, a random rank-27 metric, σ = median);
4. patch evaluations per second of mmv (t = 10) and of K blocks, n = m = 16 384 for Triton (2 048
   for the slow torch backend), next to the GEMM rates (flop-equivalent: 2·d flops per patch
   evaluation, d = 27);
5. ``ConvRFM(device="cuda", solver="nystrom", iterations=1, n_centres=10_000)`` on CIFAR-shaped
   data (``--data``; default ../shared/data/cifar10_train.npz or shared/data/… next to the
   repository, else synthetic uint8 images) at n = 10 000 and 50 000: seconds per phase
   (``history_``), and peak GPU memory (``torch.cuda.max_memory_allocated``) next to
   :func:`falkon_convrfm.planning.plan_memory`.

    python benchmarks/gpu_check.py            # ≤ 8 minutes on one H100
    python benchmarks/gpu_check.py --quick    # tiny sizes: a smoke run
    python benchmarks/gpu_check.py --sections accuracy throughput --kernels laplace --throughput-n 8192

Without a CUDA device it says so and exits 0. The first Triton call of each base kernel,
precision and mode compiles and autotunes (seconds); Triton caches the binaries on disk.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

SECTIONS = ("env", "gemm", "accuracy", "throughput", "convrfm")
SHAPE, Q = (3, 32, 32), 3
D = SHAPE[0] * Q * Q
PRECISIONS = {"laplace": ("ieee", "tf32x3", "tf32"), "gaussian": ("ieee", "tf32x3", "tf32"), "ntk": ("ieee", "tf32x3")}
FULL = dict(gemm=8192, acc_rows=(256, 192), agop_rows=64, triton_n=16384, torch_n=2048, fit_n=(10_000, 50_000),
            centres=10_000)
QUICK = dict(gemm=1024, acc_rows=(48, 32), agop_rows=16, triton_n=1024, torch_n=512, fit_n=(2_000,), centres=500)
REPO = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = [root / "shared" / "data" / "cifar10_train.npz" for root in (REPO.parent, REPO)]


def section(name: str):
    """Decorator: run a section, print its duration, and print (not raise) its failure."""

    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n=== {name} ===", flush=True)
            tic = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except Exception:
                print(f"[{name} failed]\n{traceback.format_exc(limit=6)}", flush=True)
            finally:
                print(f"({name}: {time.perf_counter() - tic:.1f} s)", flush=True)

        return run

    return wrap


def rel_error(result, reference) -> float:
    result, reference = result.detach().double().cpu(), reference.detach().double().cpu()
    return float((result - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


def cuda_seconds(fn, repeats: int) -> float:
    """Mean wall time of ``fn`` over ``repeats`` calls after one warm-up call (compile, autotune)."""
    fn()
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - tic) / repeats


def random_metric(seed: int = 0) -> torch.Tensor:
    """A random full-rank 27×27 PSD metric with trace d."""
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    M = A @ A.T
    return M * (D / torch.trace(M))


def make_kernel(kind, M, sigma, backend, precision="ieee"):
    from falkon_convrfm import ConvMahalanobisKernel
    from falkon_convrfm._compat import make_options

    return ConvMahalanobisKernel(M, SHAPE, Q, 1, 0, kind, sigma, opt=make_options(keops_active="no"),
                                 backend=backend, precision=precision)


def block(kernel, X1, X2):
    """K(X1, X2) through the kernel's block routine (what Falkon calls), bypassing Falkon."""
    return kernel.compute(X1, X2, X1.new_empty(X1.shape[0], X2.shape[0]), diag=False)


def variants(kinds):
    """(kind, backend, precision) rows of the tables, for the base kernels ``kinds``."""
    for kind in kinds:
        yield kind, "torch", "-"
        for precision in PRECISIONS.get(kind, ("ieee",)):
            yield kind, "triton", precision


# ---------------------------------------------------------------------------------------------- sections
@section("environment")
def env_section():
    import falkon_convrfm
    from falkon_convrfm.ops.backends import backend_report

    props = torch.cuda.get_device_properties(0)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name}, {props.total_memory / 2**30:.1f} GiB, "
          f"{props.multi_processor_count} SMs; falkon_convrfm {getattr(falkon_convrfm, '__version__', '?')}")
    for line in backend_report():
        print("  " + line)


@section("GEMM rates")
def gemm_section(size: int) -> dict:
    rates = {}
    previous = torch.backends.cuda.matmul.allow_tf32
    a, b = torch.randn(size, size, device="cuda"), torch.randn(size, size, device="cuda")
    try:
        for name, tf32 in (("fp32", False), ("tf32", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            seconds = cuda_seconds(lambda: a @ b, 5)
            rates[name] = 2 * size**3 / seconds
            print(f"{name} GEMM {size}²: {rates[name] / 1e12:7.1f} TFLOP/s", flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return rates


@section("accuracy vs the CPU float64 path")
def accuracy_section(sizes: dict):
    from falkon_convrfm.agop import patch_agop
    from falkon_convrfm.kernel import median_patch_distance

    n1, n2 = sizes["acc_rows"]
    g = torch.Generator().manual_seed(1)
    X1, X2 = (torch.rand(n, math.prod(SHAPE), generator=g, dtype=torch.float64) for n in (n1, n2))
    v = torch.randn(n2, 10, generator=g, dtype=torch.float64)
    Xa = X1[: sizes["agop_rows"]]
    M = random_metric()
    print(f"n = {n1}, m = {n2}, P = 900, t = 10, AGOP on {Xa.shape[0]} rows; error = max|err| / max|ref|")
    print(f"{'kernel':9s} {'backend':7s} {'precision':9s} {'K':>9s} {'K v':>9s} {'AGOP':>9s}")
    refs = {}
    for kind, backend, precision in variants(sizes["kernels"]):
        if kind not in refs:
            sigma = median_patch_distance(make_kernel(kind, M, 1.0, "torch").patch_features(X1[:64]))
            k64 = make_kernel(kind, M, sigma, "torch")
            K = block(k64, X1, X2)
            refs[kind] = (sigma, K, K @ v, patch_agop(k64, X2, v, Xa)[0])
        sigma, K_ref, Kv_ref, G_ref = refs[kind]
        k = make_kernel(kind, M, sigma, backend, "ieee" if precision == "-" else precision)
        X1c, X2c, vc, Xac = (t.float().cuda() for t in (X1, X2, v, Xa))
        cells = []
        for fn, ref in ((lambda: block(k, X1c, X2c), K_ref), (lambda: k.mmv(X1c, X2c, vc), Kv_ref),
                        (lambda: patch_agop(k, X2c, vc, Xac)[0], G_ref)):
            try:
                cells.append(f"{rel_error(fn(), ref):9.1e}")
            except Exception as exc:  # one failing cell must not hide the others
                cells.append(f"{'ERROR':>9s}")
                print(f"  {kind}/{backend}/{precision}: {type(exc).__name__}: {str(exc)[:200]}")
        print(f"{kind:9s} {backend:7s} {precision:9s} " + " ".join(cells), flush=True)


@section("throughput (patch evaluations per second)")
def throughput_section(sizes: dict, gemm: dict):
    from falkon_convrfm.kernel import median_patch_distance

    M = random_metric()
    fp32 = (gemm or {}).get("fp32", float("nan"))
    tf32 = (gemm or {}).get("tf32", float("nan"))
    print(f"CIFAR geometry, P = 900, d = 27; mmv with t = 10. GEMM here: fp32 {fp32 / 1e12:.1f}, "
          f"tf32 {tf32 / 1e12:.1f} TFLOP/s; '% fp32' = best evals/s × 2d / fp32 GEMM rate")
    print(f"{'kernel':9s} {'backend':7s} {'precision':9s} {'n = m':>6s} {'mmv G/s':>9s} {'K G/s':>9s} {'% fp32':>7s}")
    data = {}
    for kind, backend, precision in variants(sizes["kernels"]):
        n = sizes["triton_n"] if backend == "triton" else sizes["torch_n"]
        if n not in data:
            g = torch.Generator(device="cuda").manual_seed(2)
            data[n] = [torch.rand(n, math.prod(SHAPE), device="cuda", generator=g) for _ in range(2)]
        X, Z = data[n]
        sigma = median_patch_distance(make_kernel(kind, M, 1.0, "torch").patch_features(X[:64].double().cpu()))
        k = make_kernel(kind, M, sigma, backend, "ieee" if precision == "-" else precision)
        v = torch.randn(n, 10, device="cuda")
        evals = n * n * 900
        rates = []
        for fn in (lambda: k.mmv(X, Z, v), lambda: block(k, X, Z)):
            try:
                rates.append(evals / cuda_seconds(fn, 2 if backend == "triton" else 1))
            except Exception as exc:
                rates.append(float("nan"))
                print(f"  {kind}/{backend}/{precision}: {type(exc).__name__}: {str(exc)[:200]}")
        share = 100 * max(rates) * 2 * D / fp32
        print(f"{kind:9s} {backend:7s} {precision:9s} {n:6d} {rates[0] / 1e9:9.1f} {rates[1] / 1e9:9.1f} {share:6.1f}%",
              flush=True)
        del k
        torch.cuda.empty_cache()


def load_images(path: Path, n: int):
    """(images (n, 32, 32, 3) uint8, labels (n,)) from the npz, or synthetic ones of that shape."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
        if len(images) >= n:
            return images[:n], labels[:n], f"{path} (first {n})"
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
            f"synthetic uint8 ({path} not found or too small)")


@section("ConvRFM end to end (solver='nystrom', one iteration)")
def convrfm_section(sizes: dict, data_path: Path):
    from falkon_convrfm import ConvRFM
    from falkon_convrfm.planning import plan_memory

    images, labels, source = load_images(data_path, max(sizes["fit_n"]))
    total = torch.cuda.get_device_properties(0).total_memory
    print(f"data: {source}; centres = {sizes['centres']}")
    for n in sizes["fit_n"]:
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = ConvRFM(device="cuda", solver="nystrom", iterations=1, n_centres=sizes["centres"],
                            progress=False, random_state=0)
            tic = time.perf_counter()
            model.fit(images[:n], labels[:n])
            seconds = time.perf_counter() - tic
            peak = torch.cuda.max_memory_allocated()
            n_val = int(round(n * model.validation_fraction))
            plan = plan_memory(n - n_val, SHAPE, Q, centres=sizes["centres"], dtype="float32", device_memory=total,
                               n_outputs=10, agop_samples=min(model.agop_samples, n - n_val), n_val=n_val,
                               solver="nystrom", block_budget=model.max_memory)
            print(f"n = {n}: fit() {seconds:.1f} s; peak GPU memory {peak / 2**30:.2f} GiB, "
                  f"planner {plan['peak'] / 2**30:.2f} GiB (measured/planned {peak / plan['peak']:.2f})", flush=True)
            for rec in model.history_:
                phases = {k[5:]: v for k, v in rec.items() if k.startswith("time_")}
                scores = {k: round(v, 4) for k, v in rec.items() if k.startswith("val_") and isinstance(v, float)}
                core = sum(phases.get(k, 0) for k in ("fit", "eval", "agop"))
                print(f"  iteration {rec['iteration']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
                      + f" (fit+eval+agop {core:.1f} s) {scores}", flush=True)
            del model
        except Exception:
            print(f"n = {n} failed:\n{traceback.format_exc(limit=6)}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--kernels", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS),
                   help="base kernels of the accuracy and throughput tables")
    p.add_argument("--throughput-n", type=int, help="n = m of the Triton throughput rows (default 16384)")
    p.add_argument("--data", type=Path, default=next((c for c in DATA_CANDIDATES if c.is_file()), DATA_CANDIDATES[0]),
                   help="CIFAR-10 training npz (images, labels)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check.")
        return 0
    sizes = dict(QUICK if args.quick else FULL, kernels=args.kernels)
    if args.throughput_n:
        sizes["triton_n"] = args.throughput_n
    tic = time.perf_counter()
    gemm = {}
    if "env" in args.sections:
        env_section()
    if "gemm" in args.sections:
        gemm = gemm_section(sizes["gemm"])
    if "accuracy" in args.sections:
        accuracy_section(sizes)
    if "throughput" in args.sections:
        throughput_section(sizes, gemm)
    if "convrfm" in args.sections:
        convrfm_section(sizes, args.data)
    print(f"\ngpu_check: {time.perf_counter() - tic:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
