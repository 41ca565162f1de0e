"""Memory planner vs measured peak memory of ConvRFM fits on this CPU.

For each size, fits ConvRFM (Falkon solver, CIFAR geometry, one update) on random CIFAR-shaped
data and samples the process RSS every 5 ms, after a warm-up fit that loads and compiles
everything once. The planner's peak (everything except the data,
which is resident before the fit starts) is compared with the measured RSS increase.

    python benchmarks/memory_plan_check.py [--sizes 2000:500 4000:1000]
"""
import argparse

import torch

import falkon_convrfm as fc
from falkon_convrfm.memory import peak_rss
from falkon_convrfm.planning import format_plan, plan_memory


def fit(n: int, centres: int, agop_samples: int, n_val: int):
    torch.manual_seed(0)
    X = torch.rand(n + n_val, 3, 32, 32)
    y = torch.randint(10, (n + n_val,))
    model = fc.ConvRFM(patch_size=3, sigma=4.0, penalty=1e-6, n_centres=centres, iterations=1,
                       agop_samples=agop_samples, solver="falkon", maxiter=10, progress=False, random_state=0)
    with peak_rss() as mem:
        model.fit(X[:n], y[:n], X[n:], y[n:])
    return mem


def check(n: int, centres: int, agop_samples: int, n_val: int = 500) -> dict:
    fit(2 * centres, centres, agop_samples, n_val)  # warm-up: torch.compile and library loading are not the fit's
    mem = fit(n, centres, agop_samples, n_val)
    plan = plan_memory(n, (3, 32, 32), 3, centres=centres, n_val=n_val, agop_samples=agop_samples,
                       device_memory=64 * 2**30)
    predicted = plan["peak"] - plan["phases"]["data"]
    return {"plan": plan, "predicted": predicted, "measured": mem["increase"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["2000:500", "4000:1000"], help="n:centres pairs")
    p.add_argument("--agop-samples", type=int, default=1000)
    args = p.parse_args(argv)
    if not fc.HAS_FALKON:
        raise SystemExit("needs Falkon (the planner models Falkon's fit)")
    for size in args.sizes:
        n, m = (int(v) for v in size.split(":"))
        r = check(n, m, args.agop_samples)
        print(format_plan(r["plan"]))
        err = (r["predicted"] - r["measured"]) / r["measured"]
        print(f"  predicted fit memory (peak − data) {r['predicted'] / 2**30:.2f} GiB, measured RSS increase "
              f"{r['measured'] / 2**30:.2f} GiB: error {100 * err:+.0f} %\n", flush=True)


if __name__ == "__main__":
    main()
