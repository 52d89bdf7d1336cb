"""Quickstart: a network spec, its NNGP and NTK kernels, and Gaussian-process regression with them.

One spec, ``Dense(512) → Erf → Dense(512) → Erf → Dense(1)``, is used four ways:

1. its infinite-width NNGP kernel K and NTK Θ at three inputs (``net.kernel``), next to a
   Monte-Carlo estimate from random finite networks of width 512 (``ntkgp.finite``);
2. the exact NNGP posterior on 20 noisy samples of a 1-D function (``ntkgp.predict.gp_posterior``);
3. the infinite ensemble of such networks trained by gradient descent for time t
   (``ntkgp.predict.GradientFlow``);
4. a GPyTorch model whose weight/bias variances and noise are learned by maximizing the
   marginal likelihood (``ntkgp.models.NetworkGP`` and ``fit``).

It prints the numbers and saves ``01_quickstart.png`` (posterior mean ± 2σ with the data).

    python examples/01_quickstart.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import ntkgp
from ntkgp.finite import monte_carlo_kernel
from ntkgp.models import NetworkGP, fit
from ntkgp.predict import GradientFlow, gp_posterior

DTYPE = torch.float64


def make_net() -> ntkgp.Serial:
    """The spec: NTK parameterization, σ_w² = 2, σ_b² = 0.5 in every Dense layer."""
    return ntkgp.serial(
        ntkgp.Dense(512, weight_var=2.0, bias_var=0.5), ntkgp.Erf(),
        ntkgp.Dense(512, weight_var=2.0, bias_var=0.5), ntkgp.Erf(),
        ntkgp.Dense(1, weight_var=2.0, bias_var=0.5),
    )


def truth(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * x[:, 0]) + 0.3 * x[:, 0]


def summary(name: str, mean: torch.Tensor, var: torch.Tensor, f_true: torch.Tensor) -> str:
    """Test RMSE against the noise-free function and the share of it inside mean ± 2σ."""
    rmse = float((mean - f_true).pow(2).mean().sqrt())
    inside = float(((mean - f_true).abs() <= 2 * var.clamp_min(0).sqrt()).double().mean())
    return f"{name:<38s} RMSE {rmse:.3f}   truth inside ±2σ: {100 * inside:5.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="much smaller sizes (a smoke test)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "output"),
                        help="folder for the figure (default: examples/output, wherever it is run from)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.set_printoptions(precision=4, sci_mode=False)

    # 1. The kernels of the spec, and finite networks that approach them.
    net = make_net()
    x3 = torch.tensor([[-2.0], [0.5], [2.0]], dtype=DTYPE)
    with torch.no_grad():
        k = net.kernel(x3)                       # one pass: k.nngp and k.ntk, each (3, 3)
        d = net.kernel(x3, diag=True)            # the diagonals alone, without the matrices
    print("inputs x = -2, 0.5, 2")
    print(f"NNGP kernel K (infinite width):\n{k.nngp}")
    print(f"NTK Θ (infinite width):\n{k.ntk}")
    print(f"diag=True agrees with the diagonal: {torch.equal(d.nngp, k.nngp.diagonal())}, "
          f"{torch.equal(d.ntk, k.ntk.diagonal())}")
    n_samples = 8 if args.quick else 128
    est = monte_carlo_kernel(net, x3, n_samples=n_samples, seed=0)
    for name in ("nngp", "ntk"):
        exact, mc = getattr(k, name), getattr(est, name)
        print(f"{name.upper()}: Monte Carlo over {n_samples} networks of width 512, relative Frobenius "
              f"difference {float((mc - exact).norm() / exact.norm()):.4f}")

    # 2. Data: 20 noisy samples of sin(2x) + 0.3x on [-3, 3], noise standard deviation 0.1.
    g = torch.Generator().manual_seed(0)
    x = torch.sort(torch.rand(20, 1, generator=g, dtype=DTYPE) * 6 - 3, dim=0).values
    y = truth(x) + 0.1 * torch.randn(20, generator=g, dtype=DTYPE)
    xt = torch.linspace(-3, 3, 61 if args.quick else 301, dtype=DTYPE).unsqueeze(-1)
    f_true = truth(xt)
    print(f"\ndata: {len(x)} points, noise std 0.1; test: {len(xt)} points on [-3, 3]")

    # 3. Exact NNGP posterior with the variances of the spec and the true noise variance 0.01.
    post = gp_posterior(net, x, y, xt, kernel="nngp", noise=0.01)
    print(summary("NNGP posterior (σ_w²=2, σ_b²=0.5)", post.mean, post.variance, f_true))

    # 4. The infinite ensemble trained by gradient descent (learning rate 1) for time t.
    flow = GradientFlow(net, x, y, kernel="ntk", learning_rate=1.0)
    eig = flow.eigensystem.values                # of the training NTK, computed once
    print(f"training NTK: eigenvalues from {float(eig.min()):.3g} to {float(eig.max()):.3g}")
    times = torch.tensor([1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, math.inf], dtype=DTYPE)
    trained = flow.predict(xt, t=times)          # one eigendecomposition serves every time
    train_fit = flow.predict(None, t=times, compute_cov=False).mean   # x_test=None: the training points
    for i, t in enumerate(times.tolist()):
        train_rmse = float((train_fit[i] - y).pow(2).mean().sqrt())
        print(summary(f"NTK ensemble at t = {t:g}", trained.mean[i], trained.variance[i], f_true)
              + f"   training RMSE {train_rmse:.4f}")

    # 5. A GPyTorch model: variances and noise learned by maximizing the marginal likelihood.
    model = NetworkGP(x, y, make_net(), kernel="nngp").double()
    model.likelihood.noise = 0.01
    steps = 20 if args.quick else 150
    history = fit(model, steps=steps, lr=0.05)
    model.eval()
    with torch.no_grad():
        latent = model(xt)
    print(f"\nNetworkGP + fit ({steps} Adam steps): negative log marginal likelihood per point "
          f"{history[0]:.3f} -> {history[-1]:.3f}")
    dense = [layer for layer in model.net.layers if isinstance(layer, ntkgp.Dense)]
    print("learned σ_w²:", ", ".join(f"{float(layer.weight_var.detach()):.3g}" for layer in dense),
          "  σ_b²:", ", ".join(f"{float(layer.bias_var.detach()):.3g}" for layer in dense),
          f"  noise variance: {float(model.likelihood.noise.detach()):.3g}")
    print(summary("NNGP posterior, learned variances", latent.mean, latent.variance, f_true))

    # The figure: mean ± 2σ of three predictors with the data.
    panels = [
        ("NNGP posterior, σ_w²=2, σ_b²=0.5", post.mean, post.variance),
        ("NTK ensemble trained to t = 10⁶ (line: t = ∞)", trained.mean[5], trained.variance[5]),
        ("NetworkGP, learned variances", latent.mean, latent.variance),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1), sharey=True)
    grid = xt[:, 0].numpy()
    for ax, (title, mean, var) in zip(axes, panels, strict=True):
        sd = var.clamp_min(0).sqrt().numpy()
        ax.fill_between(grid, mean.numpy() - 2 * sd, mean.numpy() + 2 * sd, color="C0", alpha=0.25, label="±2σ")
        ax.plot(grid, mean.numpy(), color="C0", label="mean")
        ax.plot(grid, f_true.numpy(), "k--", lw=1, label="truth")
        ax.scatter(x[:, 0].numpy(), y.numpy(), color="k", s=12, zorder=5, label="data")
        if "t = ∞" in title:
            ax.plot(grid, trained.mean[-1].numpy(), color="C3", lw=0.8, label="mean at t = ∞")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_ylim(-2.5, 2.5)
    fig.tight_layout()
    path = out / "01_quickstart.png"
    fig.savefig(path, dpi=80)
    print(f"\nfigure: {path}   ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
