"""Bayesian optimization with a neural tangent kernel in BoTorch.

Maximizes the negated Branin function on [−5, 10] × [0, 15] (maximum −0.397887 at three points)
with a ``SingleTaskGP`` whose covariance is ``ntkgp.NTKKernel`` of a depth-2 ReLU network (its
weight/bias variances are GP hyperparameters, fitted with ``fit_gpytorch_mll``), proposing each
next point by maximizing ``LogExpectedImprovement`` with ``optimize_acqf``. For reference the
same loop runs with BoTorch's default GP (``covar_module=None``: since BoTorch 0.12 an RBF kernel
with ARD and a dimension-scaled lengthscale prior, before that a scaled Matérn-5/2), and a random search gets
the same budget (200 repetitions, median and 10–90% band). All start from the same random
initial design. The plot shows the simple regret (optimum minus best value found) against the
number of evaluations. One BO run per kernel is a single sample: compare over seeds (--seed)
before concluding anything about kernels.

    python examples/05_botorch.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import time
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from gpytorch.mlls import ExactMarginalLogLikelihood

try:
    from botorch.acquisition import LogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from botorch.optim import optimize_acqf
    from botorch.test_functions import Branin
except ModuleNotFoundError as error:   # an optional extra: a bare "No module named 'botorch'" said not how to get it
    if (error.name or "").split(".")[0] != "botorch":
        raise
    raise SystemExit('05_botorch.py needs BoTorch, an optional extra of ntkgp: pip install -e ".[botorch]"') from None

import ntkgp

OPTIMUM = -0.397887


def propose(train_x: torch.Tensor, train_y: torch.Tensor, bounds: torch.Tensor, kernel: str,
            restarts: int, raw_samples: int) -> torch.Tensor:
    """Fit the GP to all data so far and return the maximizer of LogEI, ``(1, d)``."""
    covar = ntkgp.NTKKernel(ntkgp.mlp(2, "relu", weight_var=2.0, bias_var=0.1)) if kernel == "ntk" else None
    model = SingleTaskGP(train_x, train_y, covar_module=covar, input_transform=Normalize(d=train_x.shape[-1]),
                         outcome_transform=Standardize(m=1))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    acq = LogExpectedImprovement(model, best_f=train_y.max())
    candidate, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=restarts, raw_samples=raw_samples)
    return candidate.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a CI smoke test)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "output")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_init, iterations, restarts, raw = (4, 2, 2, 32) if args.quick else (6, 20, 8, 256)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    branin = Branin(negate=True).to(torch.float64)
    bounds = branin.bounds.to(torch.float64)

    def evaluate(x: torch.Tensor) -> torch.Tensor:
        return branin(x).unsqueeze(-1)

    x0 = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n_init, 2, dtype=torch.float64)
    curves, timings = {}, {}
    for kernel in ("ntk", "default"):
        start = time.perf_counter()
        x, y = x0.clone(), evaluate(x0)
        for _ in range(iterations):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # BoTorch's input-scaling hints on tiny data
                candidate = propose(x, y, bounds, kernel, restarts, raw)
            x, y = torch.cat([x, candidate]), torch.cat([y, evaluate(candidate)])
        curves[kernel] = torch.cummax(y[:, 0], 0).values
        timings[kernel] = time.perf_counter() - start
    # One random-search run is mostly luck, so it gets 200 repetitions (from the same initial design),
    # drawn from a generator of its own: from the global one they depended on how many numbers the
    # BO loops above had used (BoTorch's raw samples), which changes with BoTorch's version.
    own = torch.Generator().manual_seed(args.seed + 1)
    draws = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(200, iterations, 2, generator=own, dtype=torch.float64)
    random_y = torch.cat([evaluate(x0)[:, 0].expand(200, -1), branin(draws)], dim=1)
    random_best = torch.cummax(random_y, 1).values                        # (200, n_init + iterations)
    curves["random"] = random_best.median(0).values
    band = torch.quantile(OPTIMUM - random_best, torch.tensor([0.1, 0.9], dtype=torch.float64), dim=0)

    print(f"Branin (negated), {n_init} random initial points + {iterations} evaluations; optimum {OPTIMUM}")
    for name, label in (("ntk", "NTK-GP + LogEI"), ("default", "BoTorch default GP + LogEI"),
                        ("random", "random search (median)")):
        best = float(curves[name][-1])
        took = f" ({timings[name]:.1f} s)" if name in timings else ""
        print(f"{label:>26}: best {best:.4f}, simple regret {OPTIMUM - best:.4f}{took}")

    fig, ax = plt.subplots(figsize=(6, 4))
    evals = torch.arange(1, n_init + iterations + 1)
    for name, label in (("ntk", "NTK-GP + LogEI"), ("default", "BoTorch default GP + LogEI"),
                        ("random", "random search, median of 200")):
        ax.plot(evals, OPTIMUM - curves[name], label=label, marker="o", markersize=3)
    ax.fill_between(evals, band[0], band[1], color="C2", alpha=0.2, label="random search, 10–90%")
    ax.axvline(n_init + 0.5, color="grey", linestyle=":", linewidth=0.8, label="end of initial design")
    ax.set(xlabel="function evaluations", ylabel="simple regret (optimum − best so far)", yscale="log",
           title="Bayesian optimization of −Branin")
    ax.legend()
    fig.tight_layout()
    figure = args.out / "05_botorch.png"
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
