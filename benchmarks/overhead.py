"""Per-call cost of small network kernels, against GPyTorch's Matérn kernel in the same process.

BoTorch loops (``fit_gpytorch_mll``, ``optimize_acqf``) evaluate kernels of a few to a few hundred
points thousands of times, where the time per call is mostly fixed overhead (Python, torch's
dispatch of a few hundred small operations, checks) rather than arithmetic. For each size ``N``,
depth, activation and dtype this prints microseconds per call (the median over ``--repeats``
rounds of a round's median call; the timed functions' calls alternate one by one) of:

* ``kernel``: ``net.kernel(x)`` of ``N`` points in ``[0, 1]^3`` under ``torch.no_grad()`` (NNGP
  and NTK) of ``mlp(depth, activation, 2.0, 0.1)``,
* ``mll NNGP``, ``mll NTK``, ``mll Matern``: an ``ExactGP`` (constant mean, Gaussian likelihood) on
  ``N`` points: the negative marginal log-likelihood and its backward pass, as each step of
  ``fit_gpytorch_mll`` does, with ``NNGPKernel(net)``, ``NTKKernel(net)`` and
  ``ScaleKernel(MaternKernel(nu=2.5))``,
* ``post NTK``, ``post Matern``: the posterior mean and variance at 5 test points with their
  gradient with respect to those points (an acquisition function's inner step), prediction
  caches warm,

and ``NTK/Matern``, the ratio of the two ``mll`` columns. With BoTorch installed it then times one
small end-to-end loop per kernel (``SingleTaskGP`` on 20 points in ``[0, 1]^3``, fixed seed:
``fit_gpytorch_mll`` and ``optimize_acqf`` of ``qLogExpectedImprovement``).

``--against DIR`` times, interleaved in the same process, a second copy of the package (``DIR`` is
an ``ntkgp`` package directory, e.g. of a checkout of an earlier commit, imported under another
name) and prints ``new/old`` per column: the median of the rounds' ratios and their range. The
machine's load moves both alike, so the ratios are steadier than the times.

    python benchmarks/overhead.py                       # one thread (torch.set_num_threads(1))
    python benchmarks/overhead.py --sizes 5 20 --depths 3 --activations relu --dtypes float64
    git worktree add /tmp/old HEAD~1 && python benchmarks/overhead.py --against /tmp/old/ntkgp
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import gpytorch
import torch

import ntkgp

COLUMNS = ("kernel", "mll NNGP", "mll NTK", "mll Matern", "post NTK", "post Matern")


def import_copy(directory: str, name: str = "ntkgp_against"):
    """The ``ntkgp`` package in ``directory`` imported as ``name``: copied into a temporary folder
    with its absolute imports of ``ntkgp`` renamed, so that both copies live in one process."""
    root = pathlib.Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for source in pathlib.Path(directory).rglob("*"):
        target = root / name / source.relative_to(directory)
        if source.is_dir() or "__pycache__" in source.parts:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        text = source.read_bytes()
        if source.suffix == ".py":
            text = re.sub(rb"\b(from|import) ntkgp\b", rb"\1 " + name.encode(), text)
            text = re.sub(rb"(f?[\"'])ntkgp\.", rb"\1" + name.encode() + rb".", text)   # importlib's names
        target.write_bytes(text)
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


class Setting:
    """The models of one size, depth, activation and dtype, built with one copy of the package."""

    def __init__(self, package, n: int, depth: int, activation: str, dtype: torch.dtype) -> None:
        generator = torch.Generator().manual_seed(n * 100 + depth)
        self.x = torch.rand(n, 3, generator=generator, dtype=dtype)
        self.y = torch.sin(6 * self.x).sum(-1) + 0.05 * torch.randn(n, generator=generator, dtype=dtype)
        self.test = torch.rand(5, 3, generator=generator, dtype=dtype)
        self.net = package.mlp(depth, activation, weight_var=2.0, bias_var=0.1).to(dtype)
        make = {"NNGP": lambda: package.NNGPKernel(package.mlp(depth, activation, 2.0, 0.1)),
                "NTK": lambda: package.NTKKernel(package.mlp(depth, activation, 2.0, 0.1)),
                "Matern": lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))}
        self.models = {name: _GP(self.x, self.y, kernel()).to(dtype) for name, kernel in make.items()}
        # models of their own for the posterior, whose caches are filled once (as an acquisition loop has
        # them) and which a training step would clear
        self.posteriors = {name: _GP(self.x, self.y, make[name]()).to(dtype) for name in ("NTK", "Matern")}
        for model in self.posteriors.values():
            model.eval()
            with torch.no_grad(), gpytorch.settings.fast_pred_var():
                model(self.test)

    def calls(self) -> dict[str, Callable[[], object]]:
        def kernel():
            with torch.no_grad():
                return self.net.kernel(self.x)

        def mll(name: str):
            model = self.models[name]
            loss = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)

            def step():
                (-loss(model(self.x), self.y)).backward()
            return step

        def posterior(name: str):
            model = self.posteriors[name]

            def step():
                test = self.test.clone().requires_grad_(True)
                with gpytorch.settings.fast_pred_var():
                    out = model(test)
                    (out.mean.sum() + out.variance.sum()).backward()
            return step

        return {"kernel": kernel, "mll NNGP": mll("NNGP"), "mll NTK": mll("NTK"), "mll Matern": mll("Matern"),
                "post NTK": posterior("NTK"), "post Matern": posterior("Matern")}


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, kernel: gpytorch.kernels.Kernel) -> None:
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def timed(fns: list[Callable[[], object]], repeats: int, seconds: float) -> list[list[float]]:
    """Microseconds per call of each of ``fns`` in ``repeats`` rounds: the median of a round's calls,
    the functions' calls alternating one by one (so that the machine's load falls on all alike)."""
    for fn in fns:
        fn()   # warm-up
    start = time.perf_counter()
    fns[0]()
    calls = max(3, int(seconds / max(time.perf_counter() - start, 1e-7)))
    rounds: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(calls):
            for out, fn in zip(times, fns, strict=True):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
        for out, each in zip(rounds, times, strict=True):
            out.append(statistics.median(each) * 1e6)
    return rounds


def botorch_loop(package, kernel: str) -> tuple[float, float]:
    """Seconds of ``fit_gpytorch_mll`` + ``optimize_acqf`` (qLogEI, q = 1) on a fixed problem, and
    the best acquisition value found (the same for two copies that compute the same kernels)."""
    from botorch.acquisition import qLogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.optim import optimize_acqf

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(20, 3, generator=generator, dtype=torch.float64)
    y = (torch.sin(6 * x).sum(-1, keepdim=True) + 0.05 * torch.randn(20, 1, generator=generator,
                                                                        dtype=torch.float64))
    covar = {"NTK": lambda: package.NTKKernel(package.mlp(3, "relu", 2.0, 0.1)),
             "Matern": lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))}[kernel]()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = SingleTaskGP(x, y, covar_module=covar)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_gpytorch_mll(gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model))
        bounds = torch.tensor([[0.0] * 3, [1.0] * 3], dtype=torch.float64)
        _, value = optimize_acqf(qLogExpectedImprovement(model, best_f=y.max()), bounds=bounds, q=1,
                                 num_restarts=4, raw_samples=64)
    return time.perf_counter() - start, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 50, 200])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--activations", nargs="+", default=["relu", "erf"])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=5, help="rounds per measurement (medians are printed)")
    parser.add_argument("--seconds", type=float, default=0.05, help="time of one function's calls in a round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--against", default=None, help="an ntkgp package directory to compare with")
    parser.add_argument("--no-botorch", action="store_true", help="skip the end-to-end BoTorch loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")   # GPyTorch's jitter and float32 notices: the times are what is read
    old = import_copy(args.against) if args.against else None
    packages = [ntkgp] if old is None else [ntkgp, old]
    print(f"torch {torch.__version__}, gpytorch {gpytorch.__version__}, {torch.get_num_threads()} thread(s); "
          f"µs per call, the median over {args.repeats} rounds of a round's median call"
          + (f"; new/old against {args.against}" if old else ""))
    header = f"{'dtype':8} {'act':5} {'depth':>5} {'N':>4} " + " ".join(f"{c:>14}" for c in COLUMNS)
    print(header + f" {'NTK/Matern':>11}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for activation in args.activations:
            for depth in args.depths:
                for n in args.sizes:
                    settings = [Setting(p, n, depth, activation, dtype) for p in packages]
                    row, ratios = [], []
                    for column in COLUMNS:
                        rounds = timed([s.calls()[column] for s in settings], args.repeats, args.seconds)
                        row.append(statistics.median(rounds[0]))
                        if old is not None:
                            ratios.append([a / b for a, b in zip(rounds[0], rounds[1], strict=True)])
                    label = f"{dtype_name:8} {activation:5} {depth:>5} {n:>4} "
                    print(label + " ".join(f"{t:>14.0f}" for t in row) + f" {row[2] / row[3]:>10.2f}")
                    if ratios:
                        print(f"{'  new/old, range':24} " + " ".join(
                            f"{statistics.median(r):.2f} {min(r):.2f}-{max(r):.2f}".rjust(14)
                            for r in ratios))
    if args.no_botorch:
        return
    with contextlib.suppress(ImportError):
        import botorch  # noqa: F401
        print("\nBoTorch loop (SingleTaskGP, 20 points in [0, 1]^3: fit_gpytorch_mll + optimize_acqf of qLogEI):")
        for kernel in ("NTK", "Matern"):
            for package in packages if kernel == "NTK" else [ntkgp]:
                seconds, value = botorch_loop(package, kernel)
                name = kernel + (" (old)" if package is old else "")
                print(f"  {name:10} {seconds:7.2f} s   best acquisition value {value:.6g}")


if __name__ == "__main__":
    main()
