"""What an NTK or NNGP kernel costs in a BoTorch model, against BoTorch's own kernels.

For ``SingleTaskGP`` models on the same data (``n`` points in ``[0, 1]^d``, a smooth function
plus noise, float64, ``Normalize`` + ``Standardize`` as in ``examples/05_botorch.py``) with four
covariance modules, ``NTKKernel`` and ``NNGPKernel`` of ``mlp(2, "relu", 2.0, 0.1)``, BoTorch's
default (RBF with ARD and its lengthscale prior) and a scaled Matérn-5/2 with ARD, it prints, measured
in this run:

* ``kernel``: the ``n × n`` training covariance (``covar_module(x).to_dense()``, no autograd),
* ``fit``: ``fit_gpytorch_mll`` from the same start, and how many marginal-likelihood evaluations
  it took (the optimizer stops at different points for different kernels, so per evaluation is
  the fairer figure),
* ``posterior``: mean and variance at ``m`` test points (the warm-up fills the model's prediction
  caches, so the training factor is not redone),
* ``acqf``: ``optimize_acqf`` of ``LogExpectedImprovement`` (``q = 1``),
* the fitted model's loss (``−mll / n``, priors included), to see that each fit went somewhere,

each the minimum over ``--repeats`` runs after a warm-up, and the ratio to the RBF model's.

    python benchmarks/bayesopt.py [--n 500] [--d 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

try:
    from botorch.acquisition import LogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from botorch.optim import optimize_acqf
except ImportError as error:   # an optional extra: say how to get it instead of a traceback
    raise SystemExit(f"benchmarks/bayesopt.py needs BoTorch: pip install -e '.[botorch]' ({error})") from None
from gpytorch.kernels import MaternKernel, ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood

import ntkgp

MODELS = ("NTK", "NNGP", "RBF (BoTorch default)", "Matern-5/2")
BASELINE = "RBF (BoTorch default)"


def covariance(name: str, d: int):
    if name == "NTK":
        return ntkgp.NTKKernel(ntkgp.mlp(2, "relu", weight_var=2.0, bias_var=0.1))
    if name == "NNGP":
        return ntkgp.NNGPKernel(ntkgp.mlp(2, "relu", weight_var=2.0, bias_var=0.1))
    if name == "Matern-5/2":
        return ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=d))
    return None   # SingleTaskGP's default


def model_for(name: str, x: torch.Tensor, y: torch.Tensor) -> SingleTaskGP:
    return SingleTaskGP(x, y, covar_module=covariance(name, x.shape[-1]), input_transform=Normalize(d=x.shape[-1]),
                        outcome_transform=Standardize(m=1))


def fastest(fn, repeats: int) -> tuple[float, object]:
    """Minimum wall time of ``repeats`` calls of ``fn`` after a warm-up, and the last call's result."""
    fn()
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def fit(name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[SingleTaskGP, int]:
    """A fresh model fitted from its initial hyperparameters, and the marginal-likelihood evaluations."""
    model = model_for(name, x, y)
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    calls = [0]
    forward = mll.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    mll.forward = counted
    with warnings.catch_warnings():   # an optimizer that stops on its iteration budget warns: reported anyway
        warnings.simplefilter("ignore")
        fit_gpytorch_mll(mll)
    return model, calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="training points")
    parser.add_argument("--d", type=int, default=4, help="inputs")
    parser.add_argument("--m", type=int, default=1000, help="test points of the posterior")
    parser.add_argument("--restarts", type=int, default=8, help="optimize_acqf's num_restarts")
    parser.add_argument("--raw-samples", type=int, default=256, help="optimize_acqf's raw_samples")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, args.d, generator=generator, dtype=torch.float64)
    y = (torch.sin(3 * x).sum(-1, keepdim=True) - (x - 0.5).pow(2).sum(-1, keepdim=True)
         + 0.05 * torch.randn(args.n, 1, generator=generator, dtype=torch.float64))
    x_test = torch.rand(args.m, args.d, generator=generator, dtype=torch.float64)
    bounds = torch.stack([torch.zeros(args.d), torch.ones(args.d)]).double()
    print(f"n = {args.n}, d = {args.d}, m = {args.m}, float64, {torch.get_num_threads()} torch threads; "
          f"times in seconds (minimum of {args.repeats} after a warm-up)")
    rows = {}
    for name in MODELS:
        fit_time, (model, evaluations) = fastest(lambda name=name: fit(name, x, y), args.repeats)
        model.train()   # fit_gpytorch_mll leaves it in eval mode, where model(x) is the posterior
        with torch.no_grad():
            loss = -ExactMarginalLogLikelihood(model.likelihood, model)(model(*model.train_inputs),
                                                                        model.train_targets).item()
        model.eval()
        inputs = model.transform_inputs(x)
        with torch.no_grad():
            kernel_time, _ = fastest(lambda m=model, z=inputs: m.covar_module(z).to_dense(), args.repeats)

            def posterior(model=model):
                p = model.posterior(x_test)
                return p.mean, p.variance

            posterior_time, _ = fastest(posterior, args.repeats)
        acq = LogExpectedImprovement(model, best_f=y.max())
        acqf_time, _ = fastest(lambda acq=acq: optimize_acqf(acq, bounds=bounds, q=1, num_restarts=args.restarts,
                                                            raw_samples=args.raw_samples,
                                                            options={"seed": 0}), args.repeats)
        rows[name] = dict(kernel=kernel_time, fit=fit_time, evaluations=evaluations,
                          per_evaluation=fit_time / evaluations, posterior=posterior_time, acqf=acqf_time, loss=loss)
    base = rows[BASELINE]
    print("| model | kernel s | fit s (evaluations) | fit s per evaluation | posterior s | optimize_acqf s | "
          "loss (-mll / n, priors included) | ratios to RBF: kernel / per evaluation / posterior / acqf |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ratios = " / ".join(f"{r[k] / base[k]:.2g}" for k in ("kernel", "per_evaluation", "posterior", "acqf"))
        print(f"| {name} | {r['kernel']:.4f} | {r['fit']:.2f} ({r['evaluations']}) | {r['per_evaluation']:.4f} | "
              f"{r['posterior']:.4f} | {r['acqf']:.2f} | {r['loss']:.3f} | {ratios} |")


if __name__ == "__main__":
    main()
