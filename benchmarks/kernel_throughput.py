"""Patch-kernel throughput of ConvMahalanobisKernel.mmv, and peak memory of a Falkon fit.

Throughput: the CIFAR geometry (3×32×32, q = 3: P = 900 locations, d = 27) at n = m = 1000,
for each base kernel and each available backend (tiled torch; KeOps, which on a CPU-only
machine runs on the CPU), reported as patch-kernel evaluations per second next to torch's fp32
GEMM flop rate measured in the same run:

    efficiency = patch_evals_per_s × 2d / gemm_flops_per_s

Memory: Falkon fit on n = 20 000 CIFAR-shaped rows with 1 000 centres and max_cpu_mem set;
the RSS increase during the fit (sampled every 5 ms) is compared with the budget.

    python benchmarks/kernel_throughput.py [--threads 2] [--n 1000] [--skip-memory]
"""
import argparse
import time

import torch

import falkon_convrfm as fc
from falkon_convrfm._compat import make_options
from falkon_convrfm.memory import peak_rss


def gemm_flops(size: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    tic = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size**3 / (time.perf_counter() - tic)


def mmv_rate(kind: str, backend: str, n: int, repeats: int) -> float:
    torch.manual_seed(0)
    X, Z = torch.rand(n, 3 * 32 * 32), torch.rand(n, 3 * 32 * 32)
    v = torch.randn(n, 1)
    k = fc.ConvMahalanobisKernel(None, (3, 32, 32), 3, kernel=kind, sigma=4.0,
                                 opt=make_options(keops_active="force" if backend == "keops" else "no"))
    k.mmv(X[:200], Z[:200], v[:200])  # compile (torch.compile / KeOps) outside the timing
    k.mmv(X, Z, v)
    tic = time.perf_counter()
    for _ in range(repeats):
        k.mmv(X, Z, v)
    seconds = (time.perf_counter() - tic) / repeats
    return n * n * k.geometry.num_locations / seconds


def falkon_memory(n: int, centres: int, budget: float) -> dict:
    import falkon

    torch.manual_seed(0)
    X = torch.rand(n, 3 * 32 * 32)
    Y = torch.nn.functional.one_hot(torch.randint(10, (n,)), 10).float()
    opt = falkon.FalkonOptions(max_cpu_mem=budget, keops_active="no", store_kernel_d_threshold=0)
    k = fc.ConvMahalanobisKernel(None, (3, 32, 32), 3, kernel="laplace", sigma=4.0, opt=opt)
    model = falkon.Falkon(kernel=k, penalty=1e-6, M=centres, maxiter=10, seed=0, options=opt)
    tic = time.perf_counter()
    with peak_rss() as mem:
        model.fit(X, Y)
    return {"seconds": time.perf_counter() - tic, **mem}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=1000, help="rows of X and Z (n = m)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kernels", nargs="+", default=["laplace", "gaussian", "ntk"])
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-n", type=int, default=20_000)
    p.add_argument("--memory-centres", type=int, default=1000)
    p.add_argument("--memory-budget-gb", type=float, default=2.0)
    p.add_argument("--gemm-size", type=int, default=4096, help="side of the GEMM that measures the flop rate")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    flops = gemm_flops(args.gemm_size)
    print(f"torch {torch.__version__}, {args.threads} threads; fp32 GEMM: {flops / 1e9:.1f} GFLOP/s")
    backends = ["torch"] + (["keops"] if fc.keops_available() else [])
    d = 27
    print(f"{'kernel':9s} {'backend':7s} {'patch evals/s':>14s} {'efficiency':>10s}")
    for kind in args.kernels:
        for backend in backends:
            rate = mmv_rate(kind, backend, args.n, args.repeats)
            print(f"{kind:9s} {backend:7s} {rate / 1e9:11.3f} G {rate * 2 * d / flops:10.3f}", flush=True)

    if args.skip_memory or not fc.HAS_FALKON:
        print("Falkon memory check skipped" + ("" if fc.HAS_FALKON else " (Falkon not installed)"))
        return
    budget = args.memory_budget_gb * 2**30
    m = falkon_memory(args.memory_n, args.memory_centres, budget)
    inc = m["increase"] / 2**30
    print(f"Falkon fit n={args.memory_n}, centres={args.memory_centres}, max_cpu_mem={args.memory_budget_gb:.2f} GiB: "
          f"{m['seconds']:.1f} s, RSS {m['baseline'] / 2**30:.2f} → peak {m['peak'] / 2**30:.2f} GiB "
          f"(increase {inc:.2f} GiB: {'within' if inc <= args.memory_budget_gb else 'OVER'} budget)")


if __name__ == "__main__":
    main()
